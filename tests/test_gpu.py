"""On a CUDA device: NCCL at world size 1 (the all-to-all path over a one-rank group) and the
grouped-GEMM expert path, each against the fp64 reference; the overlapped layer (C = 4) against
the serial one, its all-to-alls on NCCL's stream apart from the compute stream. Skipped without
CUDA."""

from __future__ import annotations

import pytest
import torch

from moebench.kinds.equivalence import TOLERANCE, Case, assemble, compare, run_cases, run_reference
from moebench.launch.spawn import launch
from runtime import MoEConfig
from runtime.experts import expert_ffn, resolve_backend

pytestmark = pytest.mark.gpu


def _moe(**kw) -> MoEConfig:
    base = dict(hidden_size=64, ffn_hidden_size=128, num_experts=8, aux_loss_coef=0.1, z_loss_coef=0.01)
    return MoEConfig(**{**base, **kw})


CASES = [
    Case("nccl-a2a-loop", _moe(top_k=2, capacity_factor=1.25), dispatcher="all_to_all", expert_backend="loop"),
    Case("nccl-a2a-grouped", _moe(top_k=2, activation="swiglu"), dispatcher="all_to_all", expert_backend="grouped_mm"),
    Case("local-grouped-cap", _moe(top_k=1, capacity_factor=1.0), expert_backend="grouped_mm"),
]


def test_nccl_world_size_one_matches_fp64_reference():
    per_rank = launch(run_cases, 1, CASES, device="cuda", backend="nccl")
    for i, case in enumerate(CASES):
        torch.backends.cuda.matmul.allow_tf32 = False
        errors = compare(assemble([r[i] for r in per_rank]), run_reference(case))
        assert max(errors.values()) <= TOLERANCE["float32"], (case.name, errors)


OVERLAP_CASES = [
    Case(
        f"nccl-overlap-C{c}",
        _moe(top_k=2, capacity_factor=1.25),
        par_extra={"overlap_chunks": c},
        dispatcher="all_to_all",
    )
    for c in (1, 4)
]


def test_overlap_chunks_on_cuda_match_the_serial_layer_and_the_reference():
    torch.backends.cuda.matmul.allow_tf32 = False
    serial, chunked = (assemble([r]) for r in launch(run_cases, 1, OVERLAP_CASES, device="cuda", backend="nccl")[0])
    assert max(compare(chunked, serial).values()) <= 1e-6
    assert max(compare(chunked, run_reference(OVERLAP_CASES[1])).values()) <= TOLERANCE["float32"]


def _streams_of_a_pipelined_forward(ctx) -> dict:
    """Kernel names by CUDA stream, profiled over one C = 4 forward on a one-rank NCCL group."""
    from runtime import MoELayer, ParallelConfig, init_weights

    moe = _moe(top_k=2, activation="swiglu")
    layer = MoELayer(moe, ParallelConfig(overlap_chunks=4), ctx.group, ctx.device, dispatcher="all_to_all")
    layer.load_global_weights(init_weights(moe, seed=0))
    x = torch.randn(4096, moe.hidden_size, device=ctx.device)
    with torch.no_grad():
        layer(x)  # warm-up: NCCL's communicator and the kernels
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            layer(x)
            torch.cuda.synchronize()
    streams: dict = {}
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA:
            streams.setdefault(event.device_resource_id(), []).append(event.name())
    return streams


def test_pipelined_all_to_alls_run_on_nccl_stream_beside_the_expert_kernels():
    (streams,) = launch(_streams_of_a_pipelined_forward, 1, device="cuda", backend="nccl")
    nccl = {s for s, names in streams.items() if any("nccl" in n.lower() for n in names)}
    compute = {s for s, names in streams.items() if any("gemm" in n.lower() or "sgemm" in n.lower() for n in names)}
    assert nccl and compute, streams.keys()
    assert not nccl & compute  # the all-to-alls never run on the compute stream
    nccl_kernels = sum("nccl" in n.lower() for names in streams.values() for n in names)
    assert nccl_kernels >= 2 * 4  # every chunk's dispatch and combine


def test_auto_backend_is_grouped_mm_on_hopper():
    device = torch.device("cuda")
    expected = "grouped_mm" if torch.cuda.get_device_capability(device) >= (9, 0) else "loop"
    assert resolve_backend("auto", device, torch.bfloat16) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_agrees_with_loop_on_cuda(dtype):
    if resolve_backend("auto", torch.device("cuda"), dtype) != "grouped_mm":
        pytest.skip("torch._grouped_mm needs compute capability >= 9.0")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 64, generator=gen).cuda().to(dtype)
    w_in = (torch.randn(4, 64, 256, generator=gen) / 8).cuda().to(dtype)
    w_down = (torch.randn(4, 128, 64, generator=gen) / 11).cuda().to(dtype)
    counts = [100, 0, 150, 50]
    ref = expert_ffn(x.double(), w_in.double(), w_down.double(), counts, "swiglu", "loop")
    got = expert_ffn(x, w_in, w_down, counts, "swiglu", "grouped_mm")
    from runtime.reference import rel_error

    rel = rel_error(got, ref)
    assert rel <= (1e-5 if dtype == torch.float32 else 2e-2)


SCENARIO = """
[scenario]
name = "gpu-tiny"
kind = "throughput"
warmup = 3
repeats = 20

[model]
hidden = 256
ffn_hidden = 512
num_experts = 8
top_k = 2
dtype = "bfloat16"
layers = 2

[parallel]
world_size = 1
device = "cuda"

[workload]
tokens_per_rank = 4096
"""


def test_scenario_on_cuda_times_with_events_and_reads_nvml_for_the_right_gpu(tmp_path):
    import json

    from moebench.cli import main

    path = tmp_path / "gpu-tiny.toml"
    path.write_text(SCENARIO)
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--telemetry-interval", "0.02"]) == 0
    (run,) = json.loads((tmp_path / "out" / "gpu-tiny.json").read_text())["runs"]
    assert (run["device"], run["backend"]) == ("cuda", "nccl")
    assert run["metrics"]["step_time_s"]["n"] == 20 and run["metrics"]["step_time_s"]["min"] > 0
    telemetry = run["telemetry"]
    assert telemetry["available"] is True, telemetry.get("reason")
    (rank,) = telemetry["per_rank"]
    props = torch.cuda.get_device_properties(0)
    assert rank["device_name"] and rank["samples"] >= 2
    assert int(rank["pci_bus_id"].split(":")[1], 16) == props.pci_bus_id  # NVML matched by PCI bus id
    assert rank["max_power_w"] > 0 and rank["peak_memory_used_bytes"] > 0


def _offload_on_cuda(prefetch: str) -> tuple:
    """(bitwise equal to resident, copies issued, kernel names by stream) for an offloaded stack on CUDA."""
    from moebench.workload.tokens import layer_weights, token_stream
    from runtime import ParallelConfig
    from runtime.offload import OffloadConfig
    from runtime.stack import MoEStack

    moe = _moe(top_k=2, activation="swiglu", expert_backend="loop")  # the offloaded layer's arithmetic
    weights = layer_weights(moe, 3, 0, "uniform", None)
    device = torch.device("cuda")
    resident = MoEStack(moe, ParallelConfig(), weights, None, device)
    stream = [x.to(device) for x in token_stream(6, 4, moe.hidden_size, 0, 0, 0.8)]
    with torch.no_grad():
        recorded = [resident.needed_experts(resident(x)[1]) for x in stream]
        config = OffloadConfig(2, "belady", prefetch)
        offloaded = MoEStack(moe, ParallelConfig(), weights, None, device, offload=config, recorded=recorded)
        caches = [layer.experts.cache for layer in offloaded.layers]
        assert all(c.host_in_LDH.is_pinned() and c.slot_in_SDH.is_cuda for c in caches)
        same = [torch.equal(offloaded(x)[0], resident(x)[0]) for x in stream]  # every step: Belady's replay
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            offloaded(stream[0])
            torch.cuda.synchronize()
    streams: dict = {}
    for event in prof.profiler.kineto_results.events():
        if event.device_type() == torch.autograd.DeviceType.CUDA:
            streams.setdefault(event.device_resource_id(), []).append(event.name())
    copies = sum(c.stats.copied_experts for c in caches)
    return all(same), copies, sum(c.copy_seconds() for c in caches), streams


@pytest.mark.parametrize("prefetch", ["none", "next_layer"])
def test_offload_on_cuda_is_bitwise_and_copies_on_its_own_stream(prefetch):
    same, copies, copy_s, streams = _offload_on_cuda(prefetch)
    assert same and copies > 0 and copy_s > 0  # the copy events were recorded and timed
    h2d = {s for s, names in streams.items() if any("Pinned -> Device" in n for n in names)}  # the weights
    compute = {s for s, names in streams.items() if any("gemm" in n.lower() for n in names)}
    assert h2d and compute and not h2d & compute  # the expert copies never run on the compute stream


def test_rowwise_experts_are_batch_invariant_on_cuda():
    """The backend rebalance_exact probes with: a row's output is the same bits whatever shares its run."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    w_in = torch.randn(2, 64, 128, device="cuda", generator=gen)
    w_down = torch.randn(2, 128, 64, device="cuda", generator=gen)
    x = torch.randn(40, 64, device="cuda", generator=gen)
    alone = expert_ffn(x[:1], w_in, w_down, [1, 0], "gelu", "rowwise")
    for n in (2, 7, 16, 33):
        assert torch.equal(expert_ffn(x[:n], w_in, w_down, [n, 0], "gelu", "rowwise")[:1], alone)


def _replace_on_one_nccl_rank(ctx) -> dict:
    from runtime import ParallelConfig
    from runtime.eplb import rebalance, static_placement
    from runtime.layer import MoELayer
    from runtime.weights import init_weights

    moe, weights = _moe(top_k=2), init_weights(_moe(top_k=2), seed=3)
    static = static_placement(8, 1, 4)
    layer = MoELayer(moe, ParallelConfig(), ctx.group, ctx.device, "all_to_all", placement=static)
    layer.load_global_weights(weights)
    layer.set_schedule(expert_backend="rowwise")
    x = torch.randn(32, 64, device=ctx.device)
    with torch.no_grad():
        before = layer(x)
        loads = [float(v) for v in before.counts_WE.sum(0)]
        new = rebalance(loads, 1, 4)
        sent = layer.set_placement(new)
        after = layer(x)
    slots_hold_their_experts = all(
        torch.equal(layer.experts.w_in_LDH[l].cpu(), weights.w_in_EDH[e])
        and torch.equal(layer.experts.w_down_LFD[l].cpu(), weights.w_down_EFD[e])
        for l, e in enumerate(layer.experts.experts_L)
    )
    return {"equal": torch.equal(before.out_TD, after.out_TD), "sent": sent, "moved": new != static,
            "slots": slots_hold_their_experts, "copies": layer.replicas.logical_of_P == new.logical_of_P}  # fmt: skip


def test_a_re_placement_over_a_one_rank_nccl_group_keeps_the_outputs_bitwise():
    (rank,) = launch(_replace_on_one_nccl_rank, 1, device="cuda", backend="nccl")
    assert rank["moved"] and rank["copies"]  # the load changed the placement, and the layer took it
    assert rank["slots"]  # every slot holds its logical expert's global weights, bit for bit
    assert rank["equal"] and rank["sent"] == 0  # one rank: every slot is a local copy
