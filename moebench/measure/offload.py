"""What CPU offload of experts costs: the offloaded step against the all-resident one and the copy
peak, timed in alternating rounds (throughput and latency, when ``[offload] cache_slots`` is set).

Not a kind (no ``NAME``): ``measure_timed`` calls ``offload_timings`` on every rank; the kinds'
``evaluate`` calls ``offload_metrics`` on the ranks' data. The run's token stream (``[workload]
steps``, ``correlation``) is first run once through the kind's all-resident stack, untimed, to
record which experts each layer needs at each step (``MoEStack.needed_experts``): Belady replays
that sequence and prefetch "oracle" loads it. Then three functions, one call of each per round
(``time_interleaved``), so round i of each comes from the same moment:

- ``offload``   a second stack, the same weights, its experts offloaded (``MoEStack``'s ``offload``):
                one forward of the next stream step (call k runs step k mod steps);
- ``resident``  the kind's own stack on the same stream step: everything on the device;
- ``h2d_copy``  one expert's weights (both matrices) copied from the cache's host memory (pinned
                on CUDA) to the device: the copy peak at the size a miss copies.

The caches' counters start after the warm-up, so hit rates are those of the timed rounds. The
metrics' formulas are in ``docs/results.md``.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from moebench import metrics as M
from moebench.measure.common import build_stack, progress_after_warmup, ratios, stream_routes, stream_step
from moebench.measure.timing import time_interleaved
from runtime.offload import OffloadConfig

if TYPE_CHECKING:
    from moebench.spec import RunSpec
    from runtime.stack import MoEStack

FUNCTIONS = ("offload", "resident", "h2d_copy")
OFFLOAD_METRICS = (
    "cache_hit_rate",
    "prefetch_accuracy",
    "h2d_bytes_per_token",
    "h2d_gbps",
    "h2d_peak_gbps",
    "offload_over_resident",
    "offload_over_bound",
    "offload_step_time_s",
    "resident_step_time_s",
)
# Table columns (a table leaves out a column that no run of its file measured).
OFFLOAD_COLUMNS = (
    ("cache_hit_rate", "hit rate", 1, ".3f"),
    ("prefetch_accuracy", "prefetch acc", 1, ".3f"),
    ("offload_over_resident", "offload/resident", 1, ".2f"),
    ("offload_over_bound", "offload/bound", 1, ".2f"),
    ("offload_step_time_s", "offload step (ms)", 1e3, ".2f"),
    ("resident_step_time_s", "resident step (ms)", 1e3, ".2f"),
    ("h2d_bytes_per_token", "h2d B/token", 1, ".0f"),
    ("h2d_gbps", "h2d GB/s", 1, ".2f"),
    ("h2d_peak_gbps", "h2d peak GB/s", 1, ".2f"),
)


def offload_config(spec: RunSpec) -> OffloadConfig | None:
    """The run's ``[offload]`` as the runtime takes it; None when ``cache_slots`` is not set."""
    off = spec.offload
    if off.get("cache_slots") is None:
        return None
    return OffloadConfig(off["cache_slots"], off["policy"], off["prefetch"])


def check_offload(spec: RunSpec) -> None:
    """What the scenario loader refuses of ``[offload]`` in a kind that accepts it: with training, with
    ``overlap_chunks``, with a batched expert backend, or with more slots than a rank's experts."""
    off = spec.offload
    slots = off.get("cache_slots")
    if slots is None:
        return
    where = f"[offload] cache_slots = {slots}"
    if spec.workload["train"]:
        raise ValueError(f"{where} is invalid with [workload] train = true: offload is inference-only")
    if spec.parallel.get("overlap_chunks") and spec.parallel["overlap_chunks"] > 1:
        chunks = spec.parallel["overlap_chunks"]
        raise ValueError(f"{where} is invalid with [parallel] overlap_chunks = {chunks}: accepted overlap_chunks 1")
    if spec.model["expert_backend"] not in ("auto", "loop"):
        backend = spec.model["expert_backend"]
        raise ValueError(
            f'{where} is invalid with [model] expert_backend = "{backend}": accepted "auto" or "loop" '
            "(the offloaded layer computes one expert at a time, as loop does)"
        )
    fewest = spec.model["num_experts"] // spec.world_size  # the fewest experts a rank can hold
    if slots > fewest:
        raise ValueError(f"{where} is invalid: accepted 1 to {fewest} (experts per rank)")


def cycling(stack: MoEStack, stream: list[torch.Tensor], routes):
    """A function that runs the stack's forward on the next step of ``stream`` at each call."""
    calls = itertools.count()
    return lambda: stream_step(stack, stream, routes, next(calls))[0]


def record(stack: MoEStack, stream: list[torch.Tensor], routes, calls: int) -> list[list[list[int]]]:
    """Per stream step, per layer, the experts (local indices) an all-resident forward uses: of the
    steps the run's ``calls`` forwards reach (call k runs step k mod steps), so the first
    min(steps, calls): a stream longer than the run is not forwarded past what the run uses. Forward
    call k < calls reads entry k mod len of the result, the step it runs either way."""
    return [stack.needed_experts(stream_step(stack, stream, routes, s)[1]) for s in range(min(len(stream), calls))]


def copy_fn(stack: MoEStack, device: torch.device):
    """One expert's two weight matrices from the cache's host memory to a device buffer."""
    cache = stack.layers[0].experts.cache
    src = (cache.host_in_LDH[0], cache.host_down_LFD[0])
    dst = tuple(torch.empty_like(t, device=device) for t in src)

    def copy():
        for d, s in zip(dst, src, strict=True):
            # CUDA: on the current stream, so the timing's events bracket it (pinned: no host sync)
            d.copy_(s, non_blocking=True)

    return copy


def offload_timings(ctx, spec: RunSpec, stack: MoEStack, stream: list[torch.Tensor], group) -> dict:
    """The three functions in alternating rounds, and the offloaded stack's cache counters."""
    config, routes = offload_config(spec), stream_routes(ctx, spec)
    calls = spec.scenario["warmup"] + spec.scenario["repeats"]  # forwards of each stack: one per round
    recorded = record(stack, stream, routes, calls)
    offloaded = build_stack(ctx, spec, offload=config, recorded=recorded, horizon=calls)
    caches = [layer.experts.cache for layer in offloaded.layers]
    fns = {
        "offload": cycling(offloaded, stream, routes),
        "resident": cycling(stack, stream, routes),
        "h2d_copy": copy_fn(offloaded, ctx.device),
    }
    progress = progress_after_warmup(ctx, spec, "the offloaded step against the resident one and the copy peak")

    def on_warm(round_s: float) -> None:
        for cache in caches:
            cache.reset_stats()
        progress(round_s)

    warmup, repeats = spec.scenario["warmup"], spec.scenario["repeats"]
    if warmup == 0:
        on_warm(0.0)
    timing = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ctx.device, group=group, on_warm=on_warm)
    layers = []
    for cache in caches:
        cache.copy_seconds()
        st = cache.stats
        layers.append(
            {
                "accesses": st.accesses,
                "hits": st.hits,
                "misses_E": list(st.misses_E),
                "copied_experts": st.copied_experts,
                "needed_copies": st.needed_copies,
                "h2d_bytes": st.h2d_bytes,
                "copy_s": st.copy_s,
                "predicted": st.predicted,
                "predicted_used": st.predicted_used,
            }
        )
    return {
        "offload": {name: list(t.samples_s) for name, t in timing.items()},
        "offload_layers": layers,
        "expert_bytes": caches[0].expert_bytes,
    }


# -------------------------------------------------------------------------------------------
# Parent side


def _sum(per_rank: list[dict], key: str) -> float:
    return sum(layer[key] for r in per_rank for layer in r["offload_layers"])


def offload_metrics(spec: RunSpec, per_rank: list[dict]) -> dict:
    """The offload metrics over every rank and layer; none when the run did not set ``cache_slots``.

    Rounds come from rank 0 (its samples are the max over ranks); counters are summed over ranks
    and layers. Per round i: offload_over_resident = offload_i / resident_i; offload_over_bound =
    offload_i / max(needed copy time, resident_i), the needed copy time being the busiest rank's
    needed copies per step (misses, and prefetched experts the step used: not wasted guesses) at
    the median copy peak (expert bytes / median ``h2d_copy``). ``prefetch_accuracy`` is left out
    when no prefetch named an expert, ``h2d_gbps`` when nothing was copied."""
    rounds = per_rank[0].get("offload")
    if not rounds:
        return {}
    offload, resident, copy = (rounds[name] for name in FUNCTIONS)
    repeats = len(offload)
    tokens = spec.workload["tokens_per_rank"] * spec.world_size * repeats
    h2d_bytes, copy_s = _sum(per_rank, "h2d_bytes"), _sum(per_rank, "copy_s")
    accesses, hits = _sum(per_rank, "accesses"), _sum(per_rank, "hits")
    predicted, used = _sum(per_rank, "predicted"), _sum(per_rank, "predicted_used")
    expert_bytes = per_rank[0]["expert_bytes"]
    peak_gbps = [expert_bytes / c / 1e9 if c > 0 else math.nan for c in copy]
    busiest = max(sum(layer["needed_copies"] for layer in r["offload_layers"]) for r in per_rank)
    needed_s = busiest * expert_bytes / repeats / (float(np.nanmedian(peak_gbps)) * 1e9)
    bound = [max(needed_s, r) for r in resident]
    out = {
        "cache_hit_rate": M.metric([hits / accesses if accesses else math.nan], "ratio", "higher"),
        "h2d_bytes_per_token": M.metric([h2d_bytes / tokens], "B", "lower"),
        "h2d_peak_gbps": M.metric(peak_gbps, "GB/s", "higher"),
        "offload_over_resident": M.metric(ratios(offload, resident), "ratio", "lower"),
        "offload_over_bound": M.metric(ratios(offload, bound), "ratio", "lower"),
        "offload_step_time_s": M.metric(offload, "s", "lower"),
        "resident_step_time_s": M.metric(resident, "s", "lower"),
    }
    if predicted:  # a prefetch named experts
        out["prefetch_accuracy"] = M.metric([used / predicted], "ratio", "higher")
    if h2d_bytes and copy_s > 0:  # something was copied
        out["h2d_gbps"] = M.metric([h2d_bytes / copy_s / 1e9], "GB/s", "higher")
    return out


def offload_details(per_rank: list[dict]) -> dict:
    """Per rank and layer: misses per local expert, and the counters, for the result's details."""
    if not per_rank[0].get("offload"):
        return {}
    return {"offload": [r["offload_layers"] for r in per_rank]}
