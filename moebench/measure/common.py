"""Measurement helpers every kind shares: the stack and its inputs, the timed step, the collectives
and their floors, routing counts, the telemetry sampler and progress lines; and the collectives'
metrics (reported by throughput and dispatch).

Rank side: functions of ``(ctx, spec, ...)`` run inside ``measure`` on every rank. Parent side:
``collective_metrics`` and friends turn rank 0's raw data into metrics. Formulas are documented in
``docs/results.md``.

Shape legend: T = tokens on this rank, D = hidden, W = ranks, E = experts, R = dispatched rows.
"""

from __future__ import annotations

import functools
import itertools
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from moebench import metrics as M
from moebench.measure import slowdown
from moebench.measure.telemetry import Sampler
from moebench.measure.timing import time_interleaved
from moebench.workload import trace as routing_trace
from moebench.workload.tokens import DenseStack, layer_weights, token_stream, tokens
from runtime.stack import MoEStack

if TYPE_CHECKING:
    from moebench.spec import RunSpec

# The collectives' metrics, reported by throughput and dispatch runs.
COLLECTIVE_METRICS = (
    "dispatch_time_s",
    "combine_time_s",
    "dispatch_over_floor",
    "combine_over_floor",
    "a2a_time_s",
    "a2a_algbw_gbps",
    "a2a_busbw_gbps",
    "dispatch_over_a2a",
    "combine_over_a2a",
    "bytes_per_token",
    "tokens_dropped",
)

# -------------------------------------------------------------------------------------------
# Rank side


NO_TELEMETRY = "telemetry switched off (--no-telemetry)"  # the reason a run made without telemetry records


class _NoSampler:
    """Stands in for ``Sampler`` when telemetry is switched off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def summary(self) -> dict:
        return {"available": False, "reason": NO_TELEMETRY}


def progress(ctx, message: str, expected_s: float) -> None:
    """Rank 0 says what it is doing when that will take a while (long runs show progress)."""
    if ctx.rank == 0 and expected_s > 10:
        print(f"    {message}, about {expected_s:.0f} s", file=sys.stderr, flush=True)


def progress_after_warmup(ctx, spec: RunSpec, what: str):
    """An ``on_warm`` hook for the timing helpers: after the warm-up, say how long the
    ``repeats`` timed rounds of ``what`` will take (``progress``), from the warm-up's typical round."""
    repeats = spec.scenario["repeats"]
    return lambda round_s: progress(ctx, f"timing {what}: {repeats} rounds", round_s * repeats)


def sampler(ctx, interval: float | None):
    """The telemetry sampler for a measurement window (``interval`` None: telemetry off)."""
    return _NoSampler() if interval is None else Sampler(ctx.device, interval_s=interval)


def build_stack(ctx, spec: RunSpec, **features) -> MoEStack:
    """This rank's part of the scenario's MoE stack (seeded global weights, calibrated router skew;
    with ``skew = "trace"``, routers that replay batch 0 of the trace). ``features``: ``MoEStack``'s
    keyword arguments (offload, redundancy, on_loss); the test-only slowdown wraps the dispatchers
    when its knob is set (moebench/measure/slowdown.py)."""
    wl = spec.workload
    weights = layer_weights(spec.moe_config(), spec.model["layers"], wl["seed"], wl["skew"], wl["skew_param"])
    dispatcher = "all_to_all" if spec.parallel.get("overlap_chunks") else "auto"  # overlap: collective even at W = 1
    stack = MoEStack(
        spec.moe_config(),
        spec.parallel_config(),
        weights,
        ctx.group,
        ctx.device,
        dispatcher,
        wrap_dispatcher=slowdown.wrapper(),
        wrap_router=routing_trace.ReplayRouter if wl["skew"] == "trace" else None,
        **features,
    )
    use_batch(ctx, spec, stack, 0)
    return stack


@functools.lru_cache(maxsize=4)
def _trace(path: str) -> routing_trace.RoutingTrace:
    return routing_trace.load(path)


def use_batch(ctx, spec: RunSpec, stack: MoEStack, batch: int) -> None:
    """With ``skew = "trace"``: make the stack replay this rank's rows of ``batch``; else nothing."""
    if spec.workload["skew"] != "trace":
        return
    found = _trace(str(routing_trace.trace_file(spec.path, spec.workload["trace"])))
    tokens_per_rank = spec.workload["tokens_per_rank"]
    routing_trace.replay(stack, routing_trace.batch_rows(found, batch, ctx.rank, ctx.world_size, tokens_per_rank))


def setup(ctx, spec: RunSpec) -> tuple[MoEStack, object, torch.Tensor]:
    """This rank's stack, its group (None at W = 1), and its seeded input tokens."""
    moe = spec.moe_config()
    x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], ctx.rank)
    group = ctx.group if ctx.world_size > 1 else None
    return build_stack(ctx, spec), group, x_TD.to(ctx.device, moe.torch_dtype)


def stream_inputs(ctx, spec: RunSpec, x_TD: torch.Tensor) -> list[torch.Tensor]:
    """This rank's token stream (``[workload] steps``, ``correlation``; ``token_stream``) on the
    device, built before any timing; step 0 is ``x_TD``."""
    wl = spec.workload
    if wl.get("steps", 1) == 1:
        return [x_TD]
    steps = token_stream(wl["steps"], wl["tokens_per_rank"], x_TD.shape[1], wl["seed"], ctx.rank, wl["correlation"])
    return [x_TD, *(x.to(x_TD) for x in steps[1:])]


def stream_routes(ctx, spec: RunSpec) -> list[list[torch.Tensor]] | None:
    """With ``skew = "trace"`` and a stream: per step s, per layer, this rank's rows of the trace's
    batch s (``trace.batch_rows``; the rows wrap around the trace), on the device; else None."""
    if spec.workload["skew"] != "trace" or spec.workload.get("steps", 1) == 1:
        return None
    found = _trace(str(routing_trace.trace_file(spec.path, spec.workload["trace"])))
    tokens_per_rank = spec.workload["tokens_per_rank"]
    return [
        [torch.from_numpy(np.ascontiguousarray(ids_TK)).to(ctx.device) for ids_TK in rows]
        for rows in (
            routing_trace.batch_rows(found, s, ctx.rank, ctx.world_size, tokens_per_rank)
            for s in range(spec.workload["steps"])
        )
    ]


def stream_step(stack: MoEStack, stream: list[torch.Tensor], routes, k: int):
    """Forward call k on a stream: step k mod steps (with ``routes``, replaying that step's batch)."""
    s = k % len(stream)
    if routes is not None:
        for layer, ids_TK in zip(stack.layers, routes[s], strict=True):
            layer.router.use(ids_TK)
    with torch.no_grad():
        return stack(stream[s])


def step_fn(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor, stream: list[torch.Tensor] | None = None):
    """One timed step: the stack's forward, or forward + backward when ``train``. With a
    ``stream`` of several steps, forward call k runs step k mod steps (a decode-like stream;
    with a trace, replaying its batch k mod steps)."""
    if not spec.workload["train"]:
        if stream is not None and len(stream) > 1:
            calls, routes = itertools.count(), stream_routes(ctx, spec)

            def stream_forward():
                return stream_step(stack, stream, routes, next(calls))[0]

            return stream_forward

        def forward():
            with torch.no_grad():
                return stack(x_TD)[0]

        return forward
    x_TD.requires_grad_()
    g_TD = tokens(x_TD.shape[0], x_TD.shape[1], spec.workload["seed"], 500_000 + ctx.rank).to(x_TD)
    params = list(stack.parameters())

    def train_step():
        for p in (*params, x_TD):
            p.grad = None
        out_TD, results = stack(x_TD)
        loss = (out_TD.float() * g_TD.float()).sum() + sum(r.router_loss for r in results)
        loss.backward()
        stack.reduce_replicated_grads()
        return out_TD

    return train_step


def _dense_fn(ctx, spec: RunSpec, x_TD: torch.Tensor):
    """The dense stack's step of the same active FLOPs, forward or forward + backward like the MoE's."""
    moe = spec.moe_config()
    dense = DenseStack(moe, spec.model["layers"], spec.workload["seed"], ctx.device)
    x_TD = x_TD.detach().clone()
    if not spec.workload["train"]:

        def forward():
            with torch.no_grad():
                return dense(x_TD)

        return forward
    x_TD.requires_grad_()
    params = list(dense.parameters())

    def train_step():
        for p in (*params, x_TD):
            p.grad = None
        dense(x_TD).float().sum().backward()

    return train_step


def ratio_timings(ctx, spec: RunSpec, step, x_TD: torch.Tensor, group) -> dict:
    """The MoE step and the dense stack of the same active FLOPs, timed in alternating rounds."""
    dense = _dense_fn(ctx, spec, x_TD)
    timing = time_interleaved(
        {"step": step, "dense": dense},
        warmup=spec.scenario["warmup"],
        repeats=spec.scenario["repeats"],
        device=ctx.device,
        group=group,
        on_warm=progress_after_warmup(ctx, spec, "the step against the dense stack"),
    )
    return {"paired_step": list(timing["step"].samples_s), "dense": list(timing["dense"].samples_s)}


def collective_timings(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor, group) -> dict:
    """Time every layer's dispatch and combine against references of the same bytes, in rounds.

    1. Route each layer on the input it sees in a forward pass; keep its plan, input and dispatch.
    2. Build the timed functions: all layers' dispatches back to back, as one step runs them;
       all layers' combines (of the dispatched rows: the values do not change the cost); and
       the references: at W = 1 the local floors (``floor_fns``), at W > 1 the raw all-to-all
       (``_a2a_fn``).
    3. Time them in alternating rounds (``time_interleaved``), so round i of each is comparable.
       A ratio to a reference of the same mix of work cancels what the machine does to both (a
       slower clock, another job's memory traffic), which absolute times between runs cannot.
    """
    jobs = dispatch_jobs(stack, x_TD, spec.moe_config().torch_dtype)
    with torch.no_grad():
        fns = dispatch_combine_fns(jobs)
        fns |= floor_fns(jobs) if group is None else {"a2a": _a2a_fn(jobs, group)}
        warmup, repeats = spec.scenario["warmup"], spec.scenario["repeats"]
        hook = progress_after_warmup(ctx, spec, "dispatch and combine against their references")
        timing = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ctx.device, group=group, on_warm=hook)
    out = {name: list(t.samples_s) for name, t in timing.items()}
    for name in ("a2a", "dispatch_floor", "combine_floor"):
        out.setdefault(name, None)
    return out


def dispatch_combine_fns(jobs: list) -> dict:
    """``dispatch`` and ``combine``: all layers' serial dispatches, then combines (of the dispatched
    rows: the values do not change the cost), back to back, as one step runs them."""

    # everything but the dispatcher's own work looked up once, outside the timed calls
    dispatches = [
        (layer.dispatcher.dispatch, h_in, plan.dispatch_args, layer.experts.expert_major)
        for layer, plan, h_in, _, _ in jobs
    ]
    combines = [(layer.dispatcher.combine, x_RD, plan.routing.weights_TK, meta) for layer, plan, _, x_RD, meta in jobs]

    def dispatch_all():
        for dispatch, h_in, routing, expert_major in dispatches:
            dispatch(h_in, *routing, expert_major=expert_major)

    def combine_all():
        for combine, y_RD, weights_TK, meta in combines:
            combine(y_RD, weights_TK, meta)

    return {"dispatch": dispatch_all, "combine": combine_all}


def dispatch_jobs(stack: MoEStack, x_TD: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
    """Per layer, on the input it sees in a forward pass: (layer, plan, input, dispatched rows, meta)."""
    jobs = []
    with torch.no_grad():
        h_TD = x_TD.detach()
        for layer in stack.layers:
            plan = layer.plan(h_TD)
            h_in = h_TD.to(dtype)
            routing = plan.dispatch_args
            x_RD, meta = layer.dispatcher.dispatch(h_in, *routing, expert_major=layer.experts.expert_major)
            jobs.append((layer, plan, h_in, x_RD, meta))
            h_TD = h_TD + layer(h_TD).out_TD
    return jobs


def floor_fns(jobs: list, sink: list | None = None) -> dict:
    """W = 1: the torch primitives any local dispatch and combine are made of, on the same rows.

    Dispatch: a stable sort of the kept copies' expert ids and a gather of their rows. Combine: a
    weighted ``index_add_`` of the rows back to their tokens. Index arithmetic done once, untimed.
    Each layer's output is dropped, as ``dispatch_all`` drops its, unless ``sink`` collects it
    (tests: it equals the dispatcher's).
    """
    floors = []  # per layer: input, kept copies' expert ids, their token rows; expert rows, weights, token rows
    for _, plan, h_in, x_RD, meta in jobs:
        kept_P = torch.nonzero(plan.keep_TK.reshape(-1)).squeeze(1)
        expert_P = plan.routing.ids_TK.reshape(-1)[kept_P]
        weights_R = plan.routing.weights_TK.reshape(-1)[meta.order_P].to(x_RD.dtype)
        floors.append((h_in, expert_P, kept_P // meta.top_k, x_RD, weights_R, meta.order_P // meta.top_k))

    def dispatch_floor():
        for h_in, expert_P, token_P, *_ in floors:
            x_RD = h_in.index_select(0, token_P[torch.sort(expert_P, stable=True).indices])
            if sink is not None:
                sink.append(x_RD)

    def combine_floor():
        for h_in, _, _, y_RD, weights_R, token_R in floors:
            y_TD = torch.zeros_like(h_in).index_add_(0, token_R, y_RD * weights_R[:, None])
            if sink is not None:
                sink.append(y_TD)

    return {"dispatch_floor": dispatch_floor, "combine_floor": combine_floor}


def _a2a_fn(jobs: list, group):
    """W > 1: ``all_to_all_single`` of random rows with each layer's exact dispatch splits."""
    h_in = jobs[0][2]
    exchanges = [(meta.output_splits, meta.input_splits) for *_, meta in jobs]
    return raw_a2a_fn(exchanges, h_in.shape[1], h_in.dtype, h_in.device, group)


def raw_a2a_fn(exchanges: list, hidden: int, dtype: torch.dtype, device: torch.device, group):
    """``(output_splits, input_splits)`` pairs as raw synchronous ``all_to_all_single`` calls on
    random rows, back to back (the reference a dispatch or an overlapped step is measured against)."""
    buffers = []
    for output_splits, input_splits in exchanges:
        send = torch.empty(sum(input_splits), hidden, dtype=dtype, device=device).normal_()
        recv = torch.empty(sum(output_splits), hidden, dtype=dtype, device=device)
        buffers.append((recv, send, list(output_splits), list(input_splits)))

    def a2a():
        for recv, send, output_splits, input_splits in buffers:
            dist.all_to_all_single(recv, send, output_splits, input_splits, group=group)

    return a2a


def routing_stats(stack: MoEStack, x_TD: torch.Tensor, record: bool = False) -> dict:
    """Per-layer W×E routed and kept counts of one forward (global: the same on every rank); with
    ``record``, also this rank's expert choices [L, T, K] (``moebench run --record-routing``)."""
    with torch.no_grad():
        _, results = stack(x_TD)
    out = {
        "counts_WE": [r.counts_WE.tolist() for r in results],
        "kept_WE": [r.kept_WE.tolist() for r in results],
        "expert_to_rank": list(stack.layers[0].expert_to_rank),
    }
    if record:
        out["routes"] = routing_trace.stack_routes(stack, x_TD)
    return out


def on_rank(measure_fn, ctx, spec: RunSpec, interval: float | None) -> dict:
    """Run a kind's ``measure`` on this rank with the run's CPU threads (``threads_per_rank``; 0: torch's
    default), and record how many threads it had."""
    if ctx.device.type == "cpu" and spec.parallel["threads_per_rank"]:
        torch.set_num_threads(spec.parallel["threads_per_rank"])
    return measure_fn(ctx, spec, interval) | {"threads": torch.get_num_threads()}


# -------------------------------------------------------------------------------------------
# Parent side: raw data -> metrics, checks


def _layer_bytes(spec: RunSpec, kept_WE: list, expert_to_rank: list) -> tuple[list[int], list[int]]:
    row = spec.model["hidden"] * torch.finfo(spec.moe_config().torch_dtype).bits // 8
    return M.a2a_rank_bytes(kept_WE, expert_to_rank, row)


def _total(nested: list) -> int:
    return int(torch.tensor(nested).sum())


def ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Round-by-round ratios of two functions timed in the same rounds (``time_interleaved``)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def collective_metrics(spec: RunSpec, raw: dict) -> dict:
    """throughput and dispatch: dispatch, combine and the raw all-to-all, their ratios, bytes, drops."""
    world, total = spec.world_size, spec.workload["tokens_per_rank"] * spec.world_size
    per_layer = [_layer_bytes(spec, kept, raw["expert_to_rank"]) for kept in raw["kept_WE"]]
    sent = sum(sum(send) for send, _ in per_layer)
    dropped = sum(_total(c) - _total(k) for c, k in zip(raw["counts_WE"], raw["kept_WE"], strict=True))
    out = {
        "dispatch_time_s": M.metric(raw["dispatch"], "s", "lower"),
        "combine_time_s": M.metric(raw["combine"], "s", "lower"),
        "bytes_per_token": M.metric([2 * sent / total], "B", "lower", exact=True),
        "tokens_dropped": M.metric([dropped], "copies", "lower", exact=True),
    }
    if raw.get("dispatch_floor") is not None:  # W = 1 (and results from before the floors have none)
        out["dispatch_over_floor"] = M.metric(ratios(raw["dispatch"], raw["dispatch_floor"]), "ratio", "lower")
        out["combine_over_floor"] = M.metric(ratios(raw["combine"], raw["combine_floor"]), "ratio", "lower")
    if raw["a2a"] is not None:
        size = sum(M.a2a_size_bytes(send, recv) for send, recv in per_layer)
        algbw = [M.algbw_gbps(size, t) for t in raw["a2a"]]
        out["a2a_time_s"] = M.metric(raw["a2a"], "s", "lower")
        out["a2a_algbw_gbps"] = M.metric(algbw, "GB/s", "higher")
        out["a2a_busbw_gbps"] = M.metric([M.busbw_gbps(b, world) for b in algbw], "GB/s", "higher")
        out["dispatch_over_a2a"] = M.metric(ratios(raw["dispatch"], raw["a2a"]), "ratio", "lower")
        out["combine_over_a2a"] = M.metric(ratios(raw["combine"], raw["a2a"]), "ratio", "lower")
    return out


def finite_check(per_rank: list[dict]) -> dict:
    """The check that every rank's output was finite (no NaN or inf)."""
    return {
        "name": "finite_output",
        "pass": all(r["finite"] for r in per_rank),
        "detail": "every rank's output is finite",
    }


def timed_window_tokens(spec: RunSpec) -> int:
    """Tokens processed, over all ranks, inside a telemetry window of ``repeats`` timed steps."""
    return spec.workload["tokens_per_rank"] * spec.world_size * spec.scenario["repeats"]
