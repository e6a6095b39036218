"""Telemetry: PCI matching, throttle decoding, window energy, the sampler (fake NVML and real CPU), combining ranks."""

from __future__ import annotations

import json
import sys
import threading
import time
import types

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import FAST

from moebench.measure.telemetry import (
    THROTTLE_REASON_BITS,
    Sample,
    Sampler,
    combine_summaries,
    counter_energy_j,
    decode_throttle_reasons,
    gpu_summary,
    host_rss_bytes,
    is_throttled,
    match_nvml_index,
    parse_pci_bus_id,
    power_integral_j,
    window_energy,
)

MB = 1 << 20

# ---------------------------------------------------------------------------------------------
# PCI bus ids


def test_parse_pci_bus_id_reads_hex_fields_from_str_and_bytes_with_4_and_8_digit_domains():
    assert parse_pci_bus_id("00000000:3B:00.0") == (0, 0x3B, 0)
    assert parse_pci_bus_id(b"0000:af:1f.0") == (0, 0xAF, 0x1F)
    assert parse_pci_bus_id(b"00000001:18:02.1\x00") == (1, 0x18, 2)
    assert parse_pci_bus_id("000A:86:00.0") == (10, 0x86, 0)
    with pytest.raises(ValueError, match=r"3B:00\.0"):
        parse_pci_bus_id("3B:00.0")


@FAST
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.sampled_from([4, 8]), st.booleans())
def test_parse_pci_bus_id_inverts_nvml_formatting(domain, bus, device, domain_digits, as_bytes):
    text = f"{domain:0{domain_digits}X}:{bus:02X}:{device:02X}.0"
    assert parse_pci_bus_id(text.encode() if as_bytes else text.lower()) == (domain, bus, device)


def test_match_nvml_index_finds_each_cuda_device_when_nvml_order_differs():
    cuda_pci = [(0, 0x18, 0), (0, 0x3B, 0), (0, 0x86, 0), (1, 0x3B, 0)]
    nvml_bus_ids = [b"00000000:86:00.0", "0000:18:00.0", "00000001:3B:00.0", "00000000:3B:00.0"]
    assert [match_nvml_index(pci, nvml_bus_ids) for pci in cuda_pci] == [1, 3, 0, 2]
    assert match_nvml_index((0, 0xAF, 0), nvml_bus_ids) is None


# ---------------------------------------------------------------------------------------------
# Throttle reasons


def test_decode_throttle_reasons_names_each_set_bit_in_bit_order():
    assert decode_throttle_reasons(0) == []
    assert decode_throttle_reasons(0x1) == ["gpu_idle"]
    assert decode_throttle_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert decode_throttle_reasons(0x8 | 0x80 | 0x100) == [
        "hw_slowdown",
        "hw_power_brake_slowdown",
        "display_clock_setting",
    ]
    assert decode_throttle_reasons(0x1FF) == list(THROTTLE_REASON_BITS.values()) and len(THROTTLE_REASON_BITS) == 9
    assert decode_throttle_reasons(0x200) == []  # an unknown bit is not misnamed


def test_throttled_is_true_for_power_and_thermal_caps_and_false_for_idle_or_clock_settings():
    assert is_throttled(decode_throttle_reasons(0x4))
    assert not is_throttled(decode_throttle_reasons(0x1))
    for bit in (0x4, 0x8, 0x20, 0x40, 0x80):
        assert is_throttled(decode_throttle_reasons(bit | 0x1)), hex(bit)
    assert not is_throttled(decode_throttle_reasons(0x1 | 0x2 | 0x10 | 0x100))


# ---------------------------------------------------------------------------------------------
# Energy over a window


def test_counter_energy_is_the_delta_in_joules_and_none_on_reset_or_missing_reading():
    assert counter_energy_j(1_000_000, 1_250_500) == 250.5
    assert counter_energy_j(7, 7) == 0.0
    assert counter_energy_j(5_000_000, 1_000) is None  # counter reset
    assert counter_energy_j(None, 1_000) is None


def test_counter_reset_falls_back_to_the_trapezoid_integral_of_sampled_power():
    times, powers = [0.0, 1.0, 3.0], [100.0, 200.0, 100.0]  # 150 J + 300 J
    assert power_integral_j(times, powers) == 450.0
    assert window_energy(1_000_000, 1_250_500, times, powers) == (250.5, "counter")
    assert window_energy(5_000_000, 1_000, times, powers) == (450.0, "power_integral")
    assert window_energy(None, None, times, powers) == (450.0, "power_integral")
    assert window_energy(5_000_000, 1_000, [0.0], [100.0]) == (None, None)


def test_gpu_summary_averages_power_and_unions_throttle_reasons_over_samples():
    samples = [
        Sample(0.0, 100 * MB, power_w=100.0, gpu_util_pct=50, sm_clock_mhz=1500, throttle_mask=0x1, pcie_tx_kbps=10),
        Sample(1.0, 300 * MB, power_w=300.0, gpu_util_pct=100, sm_clock_mhz=1980, throttle_mask=0x4, pcie_tx_kbps=30),
        Sample(2.0, 200 * MB, power_w=200.0, gpu_util_pct=90, sm_clock_mhz=1700, temperature_c=71),
    ]
    s = gpu_summary(samples, None, None, window_s=2.0)
    assert s["avg_power_w"] == 200.0 and s["max_power_w"] == 300.0
    assert s["energy_j"] == 450.0 and s["energy_source"] == "power_integral"  # ½(100+300)·1 + ½(300+200)·1
    assert s["avg_gpu_util_pct"] == pytest.approx(80.0) and s["max_temperature_c"] == 71.0
    assert s["sm_clock_mhz"] == {"min": 1500.0, "median": 1700.0, "max": 1980.0}
    assert s["throttle_reasons_seen"] == ["gpu_idle", "sw_power_cap"] and s["throttled"] is True
    assert s["pcie_tx_kbps_avg"] == 20.0 and s["pcie_rx_kbps_avg"] is None and s["avg_mem_util_pct"] is None
    assert s["short_window"] is False and s["note"] is None
    idle = gpu_summary([Sample(0.0, None, throttle_mask=0x1)], 0, 1_000, window_s=0.5)
    assert idle["throttled"] is False and idle["energy_j"] == 1.0 and idle["energy_source"] == "counter"
    assert idle["short_window"] is True and "moving average" in idle["note"]


# ---------------------------------------------------------------------------------------------
# The GPU path, with a fake pynvml and fake torch.cuda


class FakeNVMLError(Exception):
    pass


def fake_pynvml(bus_ids: list, power_w: list, energy_mj: list[int], first_power_w: float | None = None):
    """A pynvml stand-in: NVML devices at ``bus_ids``, each drawing ``power_w[i]`` (the very first power read
    of a device returns ``first_power_w`` if given); energy reads pop ``energy_mj``; the clocks-event
    query and PCIe throughput are unsupported, so the throttle query falls back to the older name."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNVMLError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM, nvml.NVML_TEMPERATURE_GPU = 1, 2, 0
    nvml.NVML_PCIE_UTIL_TX_BYTES, nvml.NVML_PCIE_UTIL_RX_BYTES = 0, 1
    nvml.calls = {"init": 0, "shutdown": 0, "power": 0}
    energy = list(energy_mj)

    def unsupported(*args):
        raise FakeNVMLError("Not Supported")

    def power(h):
        nvml.calls["power"] += 1
        first = nvml.calls["power"] == 1 and first_power_w is not None
        return int((first_power_w if first else power_w[h]) * 1e3)

    nvml.nvmlInit = lambda: nvml.calls.__setitem__("init", nvml.calls["init"] + 1)
    nvml.nvmlShutdown = lambda: nvml.calls.__setitem__("shutdown", nvml.calls["shutdown"] + 1)
    nvml.nvmlDeviceGetCount = lambda: len(bus_ids)
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=bus_ids[h])
    nvml.nvmlDeviceGetName = lambda h: b"Fake GPU %d" % h
    nvml.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    nvml.nvmlDeviceGetTotalEnergyConsumption = lambda h: energy.pop(0)
    nvml.nvmlDeviceGetPowerUsage = power
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=80, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(h + 1) * 1000 * MB)
    nvml.nvmlDeviceGetClockInfo = lambda h, kind: 1980 if kind == nvml.NVML_CLOCK_SM else 2619
    nvml.nvmlDeviceGetTemperature = lambda h, sensor: 60 + h
    nvml.nvmlDeviceGetCurrentClocksEventReasons = unsupported
    nvml.nvmlDeviceGetCurrentClocksThrottleReasons = lambda h: 0x1 | 0x4
    nvml.nvmlDeviceGetPcieThroughput = unsupported
    return nvml


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA device i sits at PCI bus ``[0x18, 0x3B, 0x86][i]``; records synchronize calls."""
    syncs = []
    props = lambda i: types.SimpleNamespace(pci_domain_id=0, pci_bus_id=[0x18, 0x3B, 0x86][i], pci_device_id=0)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 123 * MB)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return syncs


NVML_BUS_IDS = ["00000000:86:00.0", b"00000000:18:00.0", "00000000:3B:00.0"]  # NVML order ≠ CUDA order


def test_gpu_path_matches_nvml_by_pci_and_reports_counter_energy_power_and_throttling(monkeypatch, fake_cuda):
    nvml = fake_pynvml(NVML_BUS_IDS, power_w=[100.0, 150.0, 200.0], energy_mj=[1_000_000, 1_012_500], first_power_w=300)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    device = torch.device("cuda", 1)  # → NVML index 2
    with Sampler(device, interval_s=0.01) as sampler:
        time.sleep(0.1)
    s = sampler.summary()
    n = s["samples"]
    # n >= 3: the thread woke at least once between the enter and exit samples (a busy host wakes it late)
    assert s["available"] is True and s["reason"] is None and n >= 3 and nvml.calls["power"] == n
    assert (
        s["pci_bus_id"] == "00000000:3B:00.0"
        and s["device_name"] == "Fake GPU 2"
        and s["driver_version"] == "550.54.15"
    )
    assert s["energy_j"] == 12.5 and s["energy_source"] == "counter"
    assert s["max_power_w"] == 300.0 and s["avg_power_w"] == pytest.approx((300 + 200 * (n - 1)) / n)
    assert s["throttle_reasons_seen"] == ["gpu_idle", "sw_power_cap"] and s["throttled"] is True
    assert s["peak_memory_used_bytes"] == 3000 * MB and s["peak_memory_allocated_bytes"] == 123 * MB
    assert s["sm_clock_mhz"] == {"min": 1980.0, "median": 1980.0, "max": 1980.0} and s["max_temperature_c"] == 62.0
    assert s["avg_gpu_util_pct"] == 80.0 and s["avg_mem_util_pct"] == 40.0
    assert s["pcie_tx_kbps_avg"] is None and s["pcie_rx_kbps_avg"] is None  # unsupported → absent, no crash
    assert s["short_window"] is True and s["note"] and s["sampler_error"] is None
    assert fake_cuda == [device, device] and nvml.calls["init"] == nvml.calls["shutdown"] == 1
    json.dumps(s)


def test_gpu_path_counter_reset_integrates_sampled_power_instead(monkeypatch, fake_cuda):
    nvml = fake_pynvml(NVML_BUS_IDS, power_w=[100.0, 250.0, 400.0], energy_mj=[5_000_000, 1_000])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with Sampler(torch.device("cuda", 0), interval_s=0.01) as sampler:  # → NVML index 1, 250 W
        time.sleep(0.1)
    s = sampler.summary()
    assert s["energy_source"] == "power_integral" and s["avg_power_w"] == 250.0
    assert s["energy_j"] == pytest.approx(250.0 * s["window_s"], rel=0.05)


@pytest.mark.parametrize(
    ("break_it", "reason_start"),
    [
        ("no_module", "pynvml import failed"),
        ("init_fails", "NVML init failed"),
        ("no_match", "no NVML device has the PCI address 0000:86:00"),
    ],
)
def test_gpu_path_without_nvml_or_a_match_degrades_to_host_memory_with_a_reason(
    monkeypatch, fake_cuda, break_it, reason_start
):
    nvml = fake_pynvml(["00000000:18:00.0"], power_w=[100.0], energy_mj=[0, 1])
    if break_it == "init_fails":
        nvml.nvmlInit = lambda: (_ for _ in ()).throw(FakeNVMLError("Driver Not Loaded"))
    monkeypatch.setitem(sys.modules, "pynvml", None if break_it == "no_module" else nvml)
    with Sampler(torch.device("cuda", 2), interval_s=0.01) as sampler:
        time.sleep(0.03)
    s = sampler.summary()
    assert s["available"] is False and s["reason"].startswith(reason_start)
    assert s["energy_j"] is None and s["avg_power_w"] is None and s["peak_host_memory_bytes"] > 10 * MB
    assert fake_cuda == []  # no GPU handle: nothing to synchronize
    assert nvml.calls["shutdown"] == nvml.calls["init"]


# ---------------------------------------------------------------------------------------------
# The real CPU path


def _busy(seconds: float) -> None:
    a, b = torch.randn(128, 128), torch.randn(128, 128)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ b)


def test_cpu_sampler_reports_unavailable_with_a_reason_and_samples_host_memory():
    with Sampler(torch.device("cpu"), interval_s=0.01) as sampler:
        _busy(0.2)
    s = sampler.summary()
    assert s["available"] is False and s["reason"] == "no CUDA device: the run used the CPU"
    assert s["samples"] >= 3 and 0.2 <= s["window_s"] < 5.0  # loose upper bound: a busy host stretches it
    assert s["peak_host_memory_bytes"] > 10 * MB and s["peak_sampled_host_memory_bytes"] > 10 * MB
    assert s["energy_j"] is None and s["energy_source"] is None and s["avg_power_w"] is None
    json.dumps(s)


def test_cpu_sampler_sees_a_200mb_tensor_in_sampled_resident_memory():
    def window(allocate: bool) -> dict:
        with Sampler("cpu", interval_s=0.01) as sampler:
            x = torch.ones(50 * MB) if allocate else None  # 200 MiB of fp32, pages touched
            time.sleep(0.05)
            del x
        return sampler.summary()

    without, with_tensor = window(False), window(True)
    grown = with_tensor["peak_sampled_host_memory_bytes"] - without["peak_sampled_host_memory_bytes"]
    assert grown >= 150 * MB
    assert with_tensor["peak_host_memory_bytes"] >= with_tensor["peak_sampled_host_memory_bytes"]


def test_host_rss_agrees_with_vmrss_in_proc_status():
    with open("/proc/self/status") as f:
        vmrss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    assert host_rss_bytes() == pytest.approx(vmrss_kib * 1024, abs=8 * MB)  # RSS, not VmSize (far larger)


def test_sampler_thread_stops_promptly_on_exit_even_with_a_long_interval():
    with Sampler("cpu", interval_s=1.0) as sampler:
        time.sleep(0.05)
        t0 = time.perf_counter()
    exit_s = time.perf_counter() - t0
    assert exit_s < 0.9  # under the 1 s interval: the exit did not wait out a sleep
    assert sampler.summary()["samples"] == 2  # the enter and exit samples only: the thread never woke
    assert not any(t.name == "moebench-telemetry" for t in threading.enumerate())


def test_sampler_rejects_bad_interval_and_early_summary():
    with pytest.raises(ValueError, match="interval_s"):
        Sampler("cpu", interval_s=0)
    with pytest.raises(RuntimeError, match="after"):
        Sampler("cpu").summary()


# ---------------------------------------------------------------------------------------------
# Combining ranks


def _rank(energy_j, avg_w, max_w, used, host, reasons, window_s=2.0, available=True) -> dict:
    return {
        "available": available,
        "reason": None if available else "no CUDA device: the run used the CPU",
        "energy_j": energy_j,
        "energy_source": "counter" if energy_j is not None else None,
        "avg_power_w": avg_w,
        "max_power_w": max_w,
        "peak_memory_used_bytes": used,
        "peak_memory_allocated_bytes": used,
        "peak_host_memory_bytes": host,
        "throttle_reasons_seen": reasons,
        "throttled": is_throttled(reasons) if available else None,
        "window_s": window_s,
    }


def test_combine_sums_energy_and_power_takes_max_of_peaks_and_unions_reasons():
    ranks = [
        _rank(10.0, 100.0, 120.0, 5000 * MB, 900 * MB, ["gpu_idle"], window_s=2.0),
        _rank(30.0, 150.0, 180.0, 7000 * MB, 800 * MB, ["sw_power_cap"], window_s=2.5),
    ]
    run = combine_summaries(ranks, tokens=1000)
    assert run["available"] is True and run["reason"] is None and run["gpus"] == 2
    assert run["energy_j"] == 40.0 and run["energy_j_per_token"] == 0.04 and run["energy_source"] == "counter"
    assert run["avg_power_w"] == 250.0 and run["max_power_w"] == 180.0
    assert run["peak_memory_bytes"] == 7000 * MB and run["peak_host_memory_bytes"] == 900 * MB
    assert run["throttled"] is True and run["throttle_reasons_seen"] == ["gpu_idle", "sw_power_cap"]
    assert run["window_s"] == 2.5 and run["per_rank"] == ranks
    assert json.loads(json.dumps(run))["energy_j"] == 40.0


def test_combine_has_no_energy_when_a_rank_lacks_it_and_no_per_token_without_tokens():
    gpu, cpu = (
        _rank(10.0, 100.0, 120.0, 5000 * MB, 900 * MB, ["gpu_idle"]),
        _rank(None, None, None, None, 3000 * MB, []),
    )
    cpu["available"], cpu["reason"] = False, "no CUDA device: the run used the CPU"
    run = combine_summaries([gpu, cpu], tokens=1000)
    assert run["energy_j"] is None and run["energy_j_per_token"] is None and run["energy_source"] is None
    assert run["available"] is False and run["reason"] == "rank 1: no CUDA device: the run used the CPU"
    assert run["gpus"] == 1 and run["avg_power_w"] is None and run["max_power_w"] == 120.0
    assert run["peak_memory_bytes"] == 5000 * MB and run["throttled"] is False  # GPU 5000 MB vs CPU rank's host 3000 MB
    assert combine_summaries([gpu], tokens=0)["energy_j_per_token"] is None
    with pytest.raises(ValueError, match="empty"):
        combine_summaries([], tokens=1)


def test_combine_of_real_cpu_summaries_is_json_serialisable():
    summaries = []
    for _ in range(2):
        with Sampler("cpu", interval_s=0.01) as sampler:
            time.sleep(0.02)
        summaries.append(sampler.summary())
    run = combine_summaries(summaries, tokens=64)
    assert run["available"] is False and run["gpus"] == 0 and run["energy_j"] is None
    assert run["peak_memory_bytes"] == max(s["peak_host_memory_bytes"] for s in summaries)
    assert json.loads(json.dumps(run))["per_rank"][1]["samples"] == summaries[1]["samples"]


def test_host_peak_covers_only_its_own_window_when_one_process_runs_many():
    from moebench.measure.telemetry import Sampler

    with Sampler(torch.device("cpu"), interval_s=1.0) as big:
        block = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
        del block
    with Sampler(torch.device("cpu"), interval_s=1.0) as small:
        pass
    first, second = big.summary(), small.summary()
    assert first["host_peak_scope"] == second["host_peak_scope"] == "window"
    assert first["peak_host_memory_bytes"] - second["peak_host_memory_bytes"] > 250 * 2**20
