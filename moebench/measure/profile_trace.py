"""Profiler traces: ``moebench run --trace DIR`` writes a torch.profiler timeline of a few steps per rank.

After a throughput or latency run's timed windows, each rank runs ``WARMUP`` untimed step, then
profiles ``STEPS`` more, each inside a ``step[i]`` range, and writes ``DIR/<run>/rank<r>.json``: a
Chrome trace (open it at https://ui.perfetto.dev or chrome://tracing). The runtime's own ranges
(``route``, ``dispatch[i]``, ``experts[i]``, ``combine[i]``, ``runtime/ranges.py``) nest inside each
step. Profiling only after the timed windows keeps the profiler's cost out of every measured sample.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.profiler import ProfilerActivity, profile

from moebench import atomic
from runtime.ranges import span

if TYPE_CHECKING:
    from collections.abc import Callable

    from moebench.spec import RunSpec

WARMUP = 1  # untimed steps first, so one-time costs (allocator growth, lazy init) stay out of the trace
STEPS = 3  # profiled steps: enough to see the pattern repeat, small enough to open in a browser


def trace_file(folder: str | Path, rank: int) -> Path:
    """Where rank ``rank`` of a run traced into ``folder`` writes its trace."""
    return Path(folder) / f"rank{rank}.json"


def record(ctx, spec: RunSpec, step: Callable) -> dict:
    """Profile ``STEPS`` steps of ``step`` on this rank and write its trace to ``spec.trace_dir``.

    Returns ``{"path": ...}``, or ``{"path": None, "note": why}``: a trace that cannot be written
    costs the trace, never the run's results.
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler's own progress lines, on every rank, say nothing
    for _ in range(WARMUP):
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    about = {"scenario": spec.name, "params": spec.params, "rank": ctx.rank, "world_size": ctx.world_size}
    with profile(activities=activities, record_shapes=False, with_stack=False) as prof:
        prof.add_metadata_json("moebench", json.dumps(about | {"steps": STEPS}))  # only kept while profiling
        for i in range(STEPS):
            with span(f"step[{i}]", ctx.device):  # an NVTX range too on CUDA
                step()
                if ctx.device.type == "cuda":
                    # sync: the step's range ends when its kernels do, so the next step starts on an idle device
                    torch.cuda.synchronize(ctx.device)
    path = trace_file(spec.trace_dir, ctx.rank)
    try:
        atomic.write_file(path, lambda tmp: prof.export_chrome_trace(str(tmp)))
    except OSError as err:
        return {"path": None, "note": f"rank {ctx.rank}: {path} not written: {err.strerror or err}"}
    return {"path": str(path)}
