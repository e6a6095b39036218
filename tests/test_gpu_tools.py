"""The two tools ``scripts/gpu-check`` runs, on the CPU: bench_experts' FLOP count, backend choice and dense
references; gpu_telemetry_check's judgement of what NVML returned, and its refusal without CUDA."""

from __future__ import annotations

import json

import pytest
import torch

from moebench.tools import bench_experts as B
from moebench.tools import gpu_telemetry_check as G

# -------------------------------------------------------------------------------------------
# bench_experts


def test_ffn_flops_count_each_gemm_and_its_two_backward_gemms():
    rows, d, f = 2048, 512, 1024
    up = 2 * rows * d * (2 * f)  # [R, D] @ [D, 2F]
    down = 2 * rows * f * d  # [R, F] @ [F, D]
    assert B.ffn_flops(rows, d, f, "swiglu", backward=False) == up + down
    assert B.ffn_flops(rows, d, f, "swiglu") == 3 * (up + down)  # + grad input and grad weight of each
    assert B.ffn_flops(rows, d, f, "gelu") == 3 * (2 * rows * d * f + down)


def test_grouped_mm_is_benched_on_cuda_only_where_auto_would_pick_it(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert B.usable_backends(cuda, torch.bfloat16, (512, 2048, 1024)) == ["grouped_mm", "bmm", "loop"]
    assert B.usable_backends(cuda, torch.float16, (512, 2048, 1024)) == ["bmm", "loop"]  # no fp16 grouped_mm
    assert B.usable_backends(cuda, torch.bfloat16, (500, 2048, 1024)) == ["bmm", "loop"]  # 1000 B rows: unaligned
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert B.usable_backends(cuda, torch.bfloat16, (512, 2048, 1024)) == ["bmm", "loop"]
    assert B.usable_backends(torch.device("cpu"), torch.float32, (512, 2048, 1024)) == ["grouped_mm", "bmm", "loop"]


def test_bench_experts_reports_rates_against_both_dense_references(tmp_path, capsys):
    path = tmp_path / "experts.json"
    args = ["--device", "cpu", "--rows", "64", "--experts", "4", "--repeats", "2", "--peak-size", "128"]
    B.main([*args, "--json", str(path)])
    doc = json.loads(path.read_text())
    flops = B.ffn_flops(64, B.D, B.F)
    assert doc["flops_per_step"] == flops and doc["matmul_peak"]["size"] == 128
    dense = doc["dense_ffn"]
    assert dense["tflops"] == pytest.approx(flops / (dense["median_ms"] / 1e3) / 1e12)
    assert [(r["rows"], r["backend"]) for r in doc["backends"]] == [
        (skew, b) for skew in ("uniform", "zipf") for b in ("grouped_mm", "bmm", "loop")
    ]
    for r in doc["backends"]:
        assert r["tflops"] == pytest.approx(flops / (r["median_ms"] / 1e3) / 1e12)
        assert r["of_dense_ffn"] == pytest.approx(r["tflops"] / dense["tflops"])
        assert r["of_matmul_peak"] == pytest.approx(r["tflops"] / doc["matmul_peak"]["tflops"])
    loop = {r["rows"]: r for r in doc["backends"] if r["backend"] == "loop"}
    assert all(r["vs_loop"] == 1.0 for r in loop.values())
    out = capsys.readouterr().out
    assert "% of matmul peak" in out and "dense FFN (the same rows through one expert)" in out


# -------------------------------------------------------------------------------------------
# gpu_telemetry_check


def _summary(**changes) -> dict:
    good = {
        "available": True,
        "reason": None,
        "pci_bus_id": "00000000:3B:00.0",
        "energy_j": 612.5,
        "energy_source": "counter",
        "max_power_w": 640.0,
        "sm_clock_mhz": {"min": 1755.0, "median": 1980.0, "max": 1980.0},
    }
    return good | changes


PCI = (0, 0x3B, 0)


def test_telemetry_check_passes_a_complete_reading():
    assert G.problems(_summary(), 1_000_000, 1_612_500, PCI) == []


@pytest.mark.parametrize(
    ("summary", "start", "end", "expected"),
    [
        (_summary(available=False, reason="pynvml import failed"), None, None, "NVML not available"),
        (_summary(pci_bus_id="00000000:3C:00.0"), 1, 2, "is not torch's 0000:3b:00"),
        (_summary(), 5_000, 5_000, "did not increase across the burn: 5000 -> 5000"),
        (_summary(), None, 5_000, "could not be read"),
        (_summary(energy_source="power_integral"), 1, 2, "not the counter"),
        (_summary(max_power_w=None), 1, 2, "no board power read"),
        (_summary(sm_clock_mhz=None), 1, 2, "no SM clock read"),
    ],
)
def test_telemetry_check_names_each_missing_reading(summary, start, end, expected):
    (problem,) = G.problems(summary, start, end, PCI)
    assert expected in problem


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_telemetry_check_without_cuda_says_so_and_exits_2(capsys):
    assert G.main([]) == 2
    assert capsys.readouterr().err.strip() == "gpu_telemetry_check: no CUDA device visible"
