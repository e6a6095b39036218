"""How much of the all-to-all the layer's pipeline hides: the overlapped step against its parts,
timed in alternating rounds (throughput and latency, when ``[parallel] overlap_chunks`` is set).

Not a kind (no ``NAME``): ``measure_timed`` calls ``overlap_timings`` on every rank; the kinds'
``evaluate`` calls ``overlap_metrics`` on rank 0's data. Four functions, one call of each per round
(``time_interleaved``), so round i of each comes from the same moment:

- ``overlapped``   the step at C = ``overlap_chunks`` (the kind's own step);
- ``serial``       the same step with every layer at C = 1: dispatch, experts, combine in turn;
- ``compute_only`` the step at C with every all-to-all a local copy of the same rows (the
                   transport ``local_copy``, ``runtime/collective.py``): what is left with no
                   communication (the count all-gather, a few bytes per layer, still runs);
- ``a2a_alone``    the raw ``all_to_all_single`` calls the overlapped step makes, with their exact
                   splits on random rows, synchronous, back to back: per layer and chunk the
                   dispatch and the combine exchange, and for a train step the backward's reverse
                   pair of each.

The metrics are ratios and differences of those, round by round (formulas: ``docs/results.md``).
A run with ``overlap_chunks`` uses the all-to-all dispatcher even at one rank (over a one-rank
group), so a single GPU measures NCCL overlap; the layer's local dispatcher has no collective.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch

from moebench import metrics as M
from moebench.measure.common import dispatch_jobs, progress_after_warmup, ratios, raw_a2a_fn, step_fn
from moebench.measure.timing import time_interleaved
from runtime.dispatch import DispatchMeta

if TYPE_CHECKING:
    from moebench.spec import RunSpec
    from runtime.stack import MoEStack

FUNCTIONS = ("overlapped", "serial", "compute_only", "a2a_alone")
OVERLAP_METRICS = (
    "overlap_speedup",
    "exposed_comm_s",
    "overlap_efficiency",
    "serial_step_time_s",
    "compute_only_time_s",
    "a2a_alone_time_s",
)
# Table columns (a table leaves out a column that no run of its file measured).
OVERLAP_COLUMNS = (
    ("overlap_speedup", "overlap speedup", 1, ".2f"),
    ("overlap_efficiency", "overlap eff", 1, ".2f"),
    ("exposed_comm_s", "exposed comm (ms)", 1e3, ".2f"),
    ("serial_step_time_s", "serial (ms)", 1e3, ".2f"),
    ("compute_only_time_s", "compute only (ms)", 1e3, ".2f"),
    ("a2a_alone_time_s", "a2a alone (ms)", 1e3, ".2f"),
)


# -------------------------------------------------------------------------------------------
# Rank side


@contextlib.contextmanager
def stack_mode(stack: MoEStack, chunks: int | None = None, transport: str | None = None):
    """Run every layer of ``stack`` at ``chunks`` and/or over ``transport`` inside the block; the
    layers' own settings come back afterwards, also when the block raises."""
    saved = [(layer, layer.overlap_chunks, layer.transport) for layer in stack.layers]
    try:
        for layer, _, _ in saved:
            layer.set_schedule(overlap_chunks=chunks, transport=transport)
        yield stack
    finally:
        for layer, own_chunks, own_transport in saved:
            layer.set_schedule(overlap_chunks=own_chunks, transport=own_transport)


def in_mode(fn, stack: MoEStack, **mode):
    """``fn`` called with the stack in ``stack_mode(stack, **mode)``."""

    def call():
        with stack_mode(stack, **mode):
            return fn()

    return call


def a2a_exchanges(metas: list[DispatchMeta], train: bool) -> list[tuple[list[int], list[int]]]:
    """(output_splits, input_splits) of every ``all_to_all_single`` one step makes with these
    dispatch plans (one per layer): each chunk's dispatch, then its combine (splits swapped); with
    ``train``, then the backward's reverse of each, in reverse order."""
    forward = [
        pair
        for meta in metas
        for chunk in meta.chunks
        for pair in ((chunk.output_splits, chunk.input_splits), (chunk.input_splits, chunk.output_splits))
    ]
    backward = [(inputs, outputs) for outputs, inputs in reversed(forward)] if train else []
    return forward + backward


def overlap_plans(stack: MoEStack, x_TD: torch.Tensor, dtype: torch.dtype) -> list[DispatchMeta]:
    """Each layer's dispatch plan at its ``overlap_chunks``, on the input it sees in a forward pass."""
    return [
        layer.dispatcher.plan(*plan.dispatch_args, layer.overlap_chunks)
        for layer, plan, *_ in dispatch_jobs(stack, x_TD, dtype)
    ]


def overlap_functions(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor) -> dict:
    """The four timed functions (module docstring), in ``FUNCTIONS`` order."""
    moe = spec.moe_config()
    step = step_fn(ctx, spec, stack, x_TD)
    exchanges = a2a_exchanges(overlap_plans(stack, x_TD, moe.torch_dtype), spec.workload["train"])
    group = stack.layers[0].group  # the dispatcher's: a one-rank group at W = 1
    return {
        "overlapped": step,
        "serial": in_mode(step, stack, chunks=1),
        "compute_only": in_mode(step, stack, transport="local_copy"),
        "a2a_alone": raw_a2a_fn(exchanges, moe.hidden_size, moe.torch_dtype, ctx.device, group),
    }


def overlap_timings(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor, group) -> dict:
    """The four functions timed in alternating rounds; ``{"overlap": {name: samples}}``."""
    fns = overlap_functions(ctx, spec, stack, x_TD)
    timing = time_interleaved(
        fns,
        warmup=spec.scenario["warmup"],
        repeats=spec.scenario["repeats"],
        device=ctx.device,
        group=group,
        on_warm=progress_after_warmup(ctx, spec, "the overlapped step against serial, compute-only, all-to-alls"),
    )
    return {"overlap": {name: list(t.samples_s) for name, t in timing.items()}}


# -------------------------------------------------------------------------------------------
# Parent side


def overlap_metrics(raw: dict) -> dict:
    """The overlap metrics from rank 0's rounds; none when the run did not set ``overlap_chunks``.

    Round by round: speedup = serial / overlapped; exposed = overlapped − compute_only (may be
    slightly negative from noise: the sign is kept); efficiency = 1 − exposed / a2a_alone.
    """
    rounds = raw.get("overlap")
    if not rounds:
        return {}
    overlapped, serial, compute, a2a = (rounds[name] for name in FUNCTIONS)
    exposed = [o - c for o, c in zip(overlapped, compute, strict=True)]
    efficiency = [1 - e / a if a > 0 else math.nan for e, a in zip(exposed, a2a, strict=True)]
    return {
        "overlap_speedup": M.metric(ratios(serial, overlapped), "ratio", "higher"),
        "exposed_comm_s": M.metric(exposed, "s", "lower"),
        "overlap_efficiency": M.metric(efficiency, "ratio", "higher"),
        "serial_step_time_s": M.metric(serial, "s", "lower"),
        "compute_only_time_s": M.metric(compute, "s", "lower"),
        "a2a_alone_time_s": M.metric(a2a, "s", "lower"),
    }
