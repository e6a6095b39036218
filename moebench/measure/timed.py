"""The timed step of the throughput and latency kinds, with what a run adds to it: the collectives
and their floors (throughput), the overlap timings (``[parallel] overlap_chunks``), the offload
timings (``[offload]``), the static and EPLB passes (``[eplb] interval``), the per-step series of
the alerts (``[alerts]``) and a profiler trace (``moebench run --trace``), each after the step's timed
window."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moebench.measure import profile_trace, series
from moebench.measure.common import (
    collective_timings,
    progress_after_warmup,
    ratio_timings,
    routing_stats,
    sampler,
    setup,
    step_fn,
    stream_inputs,
    use_batch,
)
from moebench.measure.eplb import eplb_timings
from moebench.measure.offload import offload_timings
from moebench.measure.overlap import overlap_timings
from moebench.measure.timing import time_fn

if TYPE_CHECKING:
    from moebench.spec import RunSpec


def measure_timed(ctx, spec: RunSpec, interval: float | None, collectives: bool) -> dict:
    """throughput and latency: time the step (and, for throughput, the collectives); with
    ``moebench run --trace``, then profile a few more steps (``profile_trace``), after every timed window."""
    stack, group, x_TD = setup(ctx, spec)
    stream = stream_inputs(ctx, spec, x_TD)
    step = step_fn(ctx, spec, stack, x_TD, stream)
    hook = progress_after_warmup(ctx, spec, "the step")
    time_fn(step, warmup=spec.scenario["warmup"], repeats=0, device=ctx.device, group=group, on_warm=hook)
    with sampler(ctx, interval) as s:
        step_t = time_fn(step, warmup=0, repeats=spec.scenario["repeats"], device=ctx.device, group=group)
    recorded = {"series": series.record(ctx, spec, stack, stream, step, group)} if spec.alerts else {}
    use_batch(ctx, spec, stack, 0)  # a stream left its trace at another step: the rest is on step 0
    out = {
        "step": list(step_t.samples_s),
        "finite": bool(torch.isfinite(step()).all()),
        "telemetry": s.summary(),
        **routing_stats(stack, x_TD.detach(), spec.record_routing),
        **recorded,
    }
    if collectives:
        out.update(collective_timings(ctx, spec, stack, x_TD, group))
        out.update(ratio_timings(ctx, spec, step, x_TD, group))
    if spec.parallel.get("overlap_chunks"):
        out.update(overlap_timings(ctx, spec, stack, x_TD, group))
    if spec.offload.get("cache_slots") is not None:
        out.update(offload_timings(ctx, spec, stack, stream, group))
    if spec.eplb["interval"]:
        out.update(eplb_timings(ctx, spec, stream, group))
    if spec.trace_dir is not None:  # last: the profiler never runs inside a timed window
        out["profile_trace"] = profile_trace.record(ctx, spec, step)
    return out
