"""What each scenario kind measures: the per-rank measurement, then the metrics from its raw data.

``measure(ctx, spec, interval)`` runs on every rank (through ``launch``) and returns plain data;
``evaluate(spec, per_rank)`` turns the ranks' data into metrics, checks and details in the
parent. Metric names, units and formulas are documented in ``results/README.md``.

Shape legend: T = tokens on this rank, D = hidden, W = ranks, E = experts.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist

from moebench import metrics as M
from moebench.equivalence import TOLERANCE, Case, assemble, compare, run_reference
from moebench.equivalence import run_rank as equivalence_rank
from moebench.scenario import RunSpec
from moebench.telemetry import Sampler
from moebench.timing import time_fn, time_interleaved
from moebench.workload import DenseStack, MoEStack, layer_weights, tokens
from runtime.experts import expert_ffn, resolve_backend

# -------------------------------------------------------------------------------------------
# Rank side


class _NoSampler:
    """Stands in for ``Sampler`` when telemetry is switched off."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def summary(self) -> dict:
        return {"available": False, "reason": "telemetry switched off (--no-telemetry)"}


def _progress(ctx, message: str, expected_s: float) -> None:
    """Rank 0 says what it is doing when that will take a while (long runs show progress)."""
    if ctx.rank == 0 and expected_s > 10:
        print(f"    {message}, about {expected_s:.0f} s", file=sys.stderr, flush=True)


def _sampler(ctx, interval: float | None):
    return _NoSampler() if interval is None else Sampler(ctx.device, interval_s=interval)


def _stack(ctx, spec: RunSpec) -> MoEStack:
    wl = spec.workload
    weights = layer_weights(spec.moe_config(), spec.model["layers"], wl["seed"], wl["skew"], wl["skew_param"])
    return MoEStack(spec.moe_config(), spec.parallel_config(), weights, ctx.group, ctx.device)


def _setup(ctx, spec: RunSpec) -> tuple[MoEStack, object, torch.Tensor]:
    """This rank's stack, its group (None at W = 1), and its seeded input tokens."""
    moe = spec.moe_config()
    x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], ctx.rank)
    group = ctx.group if ctx.world_size > 1 else None
    return _stack(ctx, spec), group, x_TD.to(ctx.device, moe.torch_dtype)


def _step_fn(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor):
    """One timed step: the stack's forward, or forward + backward when ``train``."""
    if not spec.workload["train"]:

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


def _ratio_timings(ctx, spec: RunSpec, step, x_TD: torch.Tensor, group) -> dict:
    """The MoE step and the dense stack of the same active FLOPs, timed in alternating rounds."""
    dense = _dense_fn(ctx, spec, x_TD)
    timing = time_interleaved(
        {"step": step, "dense": dense},
        warmup=spec.scenario["warmup"],
        repeats=spec.scenario["repeats"],
        device=ctx.device,
        group=group,
    )
    return {"paired_step": list(timing["step"].samples_s), "dense": list(timing["dense"].samples_s)}


def _collective_timings(ctx, spec: RunSpec, stack: MoEStack, x_TD: torch.Tensor, group) -> dict:
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

        def dispatch_all():
            for layer, plan, h_in, _, _ in jobs:
                layer.dispatcher.dispatch(h_in, plan.routing.ids_TK, plan.keep_TK, plan.kept_WE)

        def combine_all():
            for layer, plan, _, x_RD, meta in jobs:
                layer.dispatcher.combine(x_RD, plan.routing.weights_TK, meta)

        fns = {"dispatch": dispatch_all, "combine": combine_all}
        fns |= floor_fns(jobs) if group is None else {"a2a": _a2a_fn(jobs, group)}
        warmup, repeats = spec.scenario["warmup"], spec.scenario["repeats"]
        timing = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ctx.device, group=group)
    out = {name: list(t.samples_s) for name, t in timing.items()}
    for name in ("a2a", "dispatch_floor", "combine_floor"):
        out.setdefault(name, None)
    return out


def dispatch_jobs(stack: MoEStack, x_TD: torch.Tensor, dtype: torch.dtype) -> list[tuple]:
    """Per layer, on the input it sees in a forward pass: (layer, plan, input, dispatched rows, meta)."""
    jobs = []
    with torch.no_grad():
        h_TD = x_TD.detach()
        for layer in stack.layers:
            plan = layer.plan(h_TD)
            h_in = h_TD.to(dtype)
            x_RD, meta = layer.dispatcher.dispatch(h_in, plan.routing.ids_TK, plan.keep_TK, plan.kept_WE)
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
    buffers = []
    for _, _, h_in, _, meta in jobs:
        send = h_in.new_empty(sum(meta.input_splits), h_in.shape[1]).normal_()
        recv = h_in.new_empty(sum(meta.output_splits), h_in.shape[1])
        buffers.append((recv, send, meta.output_splits, meta.input_splits))

    def a2a():
        for recv, send, out_splits, in_splits in buffers:
            dist.all_to_all_single(recv, send, out_splits, in_splits, group=group)

    return a2a


def _routing_stats(stack: MoEStack, x_TD: torch.Tensor) -> dict:
    """Per-layer W×E routed and kept counts of one forward (global: the same on every rank)."""
    with torch.no_grad():
        _, results = stack(x_TD)
    return {
        "counts_WE": [r.counts_WE.tolist() for r in results],
        "kept_WE": [r.kept_WE.tolist() for r in results],
        "expert_to_rank": list(stack.layers[0].expert_to_rank),
    }


def _measure_timed(ctx, spec: RunSpec, interval: float | None, collectives: bool) -> dict:
    """throughput and latency: time the step (and, for throughput, the collectives)."""
    stack, group, x_TD = _setup(ctx, spec)
    step = _step_fn(ctx, spec, stack, x_TD)
    start = time.perf_counter()
    time_fn(step, warmup=spec.scenario["warmup"], repeats=0, device=ctx.device, group=group)
    per_step = (time.perf_counter() - start) / max(spec.scenario["warmup"], 1)
    _progress(ctx, f"timing {spec.scenario['repeats']} steps", per_step * spec.scenario["repeats"])
    with _sampler(ctx, interval) as sampler:
        step_t = time_fn(step, warmup=0, repeats=spec.scenario["repeats"], device=ctx.device, group=group)
    out = {
        "step": list(step_t.samples_s),
        "finite": bool(torch.isfinite(step()).all()),
        "telemetry": sampler.summary(),
        **_routing_stats(stack, x_TD.detach()),
    }
    if collectives:
        _progress(ctx, "timing the collectives and the dense reference", per_step * spec.scenario["repeats"] * 2.5)
        out.update(_collective_timings(ctx, spec, stack, x_TD, group))
        out.update(_ratio_timings(ctx, spec, step, x_TD, group))
    return out


def _measure_dispatch(ctx, spec: RunSpec, interval: float | None) -> dict:
    """dispatch: only the collectives (dispatch, combine, raw all-to-all), no step."""
    stack, group, x_TD = _setup(ctx, spec)
    with _sampler(ctx, interval) as sampler:
        out = _collective_timings(ctx, spec, stack, x_TD, group)
    out["round_trip_error"] = _round_trip_error(stack, x_TD)
    return {**out, "telemetry": sampler.summary(), **_routing_stats(stack, x_TD)}


def _measure_experts(ctx, spec: RunSpec, interval: float | None) -> dict:
    """experts: the grouped expert FFN alone, tokens·top_k rows spread evenly over the experts."""
    moe = spec.moe_config()
    weights = layer_weights(moe, 1, spec.workload["seed"], "uniform", None)[0]
    w_in, w_down = (w.to(ctx.device, moe.torch_dtype) for w in (weights.w_in_EDH, weights.w_down_EFD))
    rows = spec.workload["tokens_per_rank"] * moe.top_k
    counts = [rows // moe.num_experts + (e < rows % moe.num_experts) for e in range(moe.num_experts)]
    x_RD = tokens(rows, moe.hidden_size, spec.workload["seed"], ctx.rank).to(ctx.device, moe.torch_dtype)
    backend = resolve_backend(moe.expert_backend, ctx.device, moe.torch_dtype)

    def forward():
        with torch.no_grad():
            return expert_ffn(x_RD, w_in, w_down, counts, moe.activation, backend)

    with _sampler(ctx, interval) as sampler:
        t = time_fn(forward, warmup=spec.scenario["warmup"], repeats=spec.scenario["repeats"], device=ctx.device)
    return {"experts": list(t.samples_s), "finite": bool(torch.isfinite(forward()).all()),
            "telemetry": sampler.summary()}  # fmt: skip


def _round_trip_error(stack: MoEStack, x_TD: torch.Tensor) -> float:
    """Relative error of combine(dispatch(x)) against x · Σ kept weights (identity experts), layer 0."""
    layer = stack.layers[0]
    with torch.no_grad():
        plan = layer.plan(x_TD)
        x_RD, meta = layer.dispatcher.dispatch(x_TD, plan.routing.ids_TK, plan.keep_TK, plan.kept_WE)
        out_TD = layer.dispatcher.combine(x_RD, plan.routing.weights_TK, meta).double()
        kept_weight_T = (plan.routing.weights_TK * plan.keep_TK).sum(1, keepdim=True).double()
        want_TD = x_TD.double() * kept_weight_T
    return float((out_TD - want_TD).norm() / want_TD.norm().clamp_min(1e-30))


def _measure_load(ctx, spec: RunSpec, interval: float | None) -> dict:
    """load_balance: route ``repeats`` fresh batches through the stack; keep every batch's counts."""
    moe = spec.moe_config()
    stack = _stack(ctx, spec)
    batches = []
    with _sampler(ctx, interval) as sampler:
        start = time.perf_counter()
        for batch in range(spec.scenario["repeats"]):
            stream = 1_000 * (batch + 1) + ctx.rank
            x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], stream)
            batches.append(_routing_stats(stack, x_TD.to(ctx.device, moe.torch_dtype)))
            if batch == 0:
                left = spec.scenario["repeats"] - 1
                _progress(ctx, f"routing {left} more batches", (time.perf_counter() - start) * left)
    return {"batches": batches, "telemetry": sampler.summary()}


def _case(spec: RunSpec) -> Case:
    return Case(
        name=spec.name,
        moe=spec.moe_config(),
        placement=spec.parallel["placement"],
        num_tokens=spec.workload["tokens_per_rank"] * spec.world_size,
        seed=spec.workload["seed"],
        layers=spec.model["layers"],
        skew=spec.workload["skew"],
        skew_param=spec.workload["skew_param"],
    )


def _measure_equivalence(ctx, spec: RunSpec, interval: float | None) -> dict:
    with _sampler(ctx, interval) as sampler:
        out = equivalence_rank(ctx, _case(spec))
    out["telemetry"] = sampler.summary()
    return out


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Run ``spec`` on this rank; ``interval`` is the telemetry period in s (None: no sampler)."""
    if ctx.device.type == "cpu" and spec.parallel["threads_per_rank"]:
        torch.set_num_threads(spec.parallel["threads_per_rank"])
    if spec.kind == "throughput":
        return _measure_timed(ctx, spec, interval, collectives=True)
    if spec.kind == "latency":
        return _measure_timed(ctx, spec, interval, collectives=False)
    if spec.kind == "dispatch":
        return _measure_dispatch(ctx, spec, interval)
    if spec.kind == "experts":
        return _measure_experts(ctx, spec, interval)
    if spec.kind == "load_balance":
        return _measure_load(ctx, spec, interval)
    return _measure_equivalence(ctx, spec, interval)


# -------------------------------------------------------------------------------------------
# Parent side: raw data -> metrics, checks, details


def _layer_bytes(spec: RunSpec, kept_WE: list, expert_to_rank: list) -> tuple[list[int], list[int]]:
    row = spec.model["hidden"] * torch.finfo(spec.moe_config().torch_dtype).bits // 8
    return M.a2a_rank_bytes(kept_WE, expert_to_rank, row)


def _total(nested: list) -> int:
    return int(torch.tensor(nested).sum())


def _timed_metrics(spec: RunSpec, raw: dict) -> dict:
    """throughput and latency: the step's metrics, and for throughput the collectives' too."""
    world, total = spec.world_size, spec.workload["tokens_per_rank"] * spec.world_size
    step = raw["step"]
    out = {"step_time_s": M.metric(step, "s", "lower")}
    if spec.kind == "latency":
        return out
    out["tokens_per_s"] = M.metric([total / t for t in step], "tokens/s", "higher")
    out["tokens_per_s_per_gpu"] = M.metric([total / t / world for t in step], "tokens/s", "higher")
    out["moe_over_dense"] = M.metric(_ratios(raw["paired_step"], raw["dense"]), "ratio", "lower")
    return out | _collective_metrics(spec, raw)


def _collective_metrics(spec: RunSpec, raw: dict) -> dict:
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
        out["dispatch_over_floor"] = M.metric(_ratios(raw["dispatch"], raw["dispatch_floor"]), "ratio", "lower")
        out["combine_over_floor"] = M.metric(_ratios(raw["combine"], raw["combine_floor"]), "ratio", "lower")
    if raw["a2a"] is not None:
        size = sum(M.a2a_size_bytes(send, recv) for send, recv in per_layer)
        algbw = [M.algbw_gbps(size, t) for t in raw["a2a"]]
        out["a2a_time_s"] = M.metric(raw["a2a"], "s", "lower")
        out["a2a_algbw_gbps"] = M.metric(algbw, "GB/s", "higher")
        out["a2a_busbw_gbps"] = M.metric([M.busbw_gbps(b, world) for b in algbw], "GB/s", "higher")
        out["dispatch_over_a2a"] = M.metric(_ratios(raw["dispatch"], raw["a2a"]), "ratio", "lower")
        out["combine_over_a2a"] = M.metric(_ratios(raw["combine"], raw["a2a"]), "ratio", "lower")
    return out


def expert_flops(spec: RunSpec) -> float:
    """Forward FLOPs of the experts kind's FFN: 2 · rows · m · D · F (m = 3 for swiglu, else 2)."""
    m = 3 if spec.model["activation"] == "swiglu" else 2
    rows = spec.workload["tokens_per_rank"] * spec.model["top_k"]
    return 2.0 * rows * m * spec.model["hidden"] * spec.model["ffn_hidden"]


def _expert_metrics(spec: RunSpec, raw: dict) -> dict:
    flops = expert_flops(spec)
    rows = spec.workload["tokens_per_rank"] * spec.model["top_k"]
    return {
        "expert_time_s": M.metric(raw["experts"], "s", "lower"),
        "expert_tflops": M.metric([flops / t / 1e12 for t in raw["experts"]], "TFLOP/s", "higher"),
        "rows_per_expert": M.metric([rows / spec.model["num_experts"]], "rows", "higher", exact=True),
    }


def _finite(per_rank: list[dict]) -> dict:
    return {
        "name": "finite_output",
        "pass": all(r["finite"] for r in per_rank),
        "detail": "every rank's output is finite",
    }


def _ratios(numerator: list[float], denominator: list[float]) -> list[float]:
    """Round-by-round ratios of two functions timed in the same rounds (``time_interleaved``)."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def _layer_loads(batch: dict, layer: int, world: int) -> tuple[list[int], list[int], int]:
    counts = torch.tensor(batch["counts_WE"][layer])
    kept = torch.tensor(batch["kept_WE"][layer])
    expert_E = counts.sum(0).tolist()
    return expert_E, M.rank_loads(expert_E, batch["expert_to_rank"], world), int(counts.sum() - kept.sum())


def _load_metrics(spec: RunSpec, raw: dict) -> tuple[dict, dict]:
    """Per batch: the worst layer's imbalance and CV; dropped copies; plus per-layer details."""
    world, layers = spec.world_size, spec.model["layers"]
    copies = spec.workload["tokens_per_rank"] * world * spec.model["top_k"] * layers
    samples = {"imbalance_max_mean": [], "rank_imbalance_max_mean": [], "load_cv": [], "tokens_dropped": []}
    expert_totals = [[0] * spec.model["num_experts"] for _ in range(layers)]
    for batch in raw["batches"]:
        stats = [_layer_loads(batch, layer, world) for layer in range(layers)]
        samples["imbalance_max_mean"].append(max(M.imbalance(e) for e, _, _ in stats))
        samples["rank_imbalance_max_mean"].append(max(M.imbalance(r) for _, r, _ in stats))
        samples["load_cv"].append(max(M.load_cv(e) for e, _, _ in stats))
        samples["tokens_dropped"].append(sum(d for _, _, d in stats))
        for layer, (expert_E, _, _) in enumerate(stats):
            expert_totals[layer] = [a + b for a, b in zip(expert_totals[layer], expert_E, strict=True)]
    out = {name: M.metric(v, "ratio", "lower", exact=True) for name, v in samples.items() if name != "tokens_dropped"}
    out["tokens_dropped"] = M.metric(samples["tokens_dropped"], "copies", "lower", exact=True)
    fractions = [d / copies for d in samples["tokens_dropped"]]
    out["tokens_dropped_fraction"] = M.metric(fractions, "fraction", "lower", exact=True)
    owner = raw["batches"][0]["expert_to_rank"]
    per_layer = []
    for layer, totals in enumerate(expert_totals):
        ranks = M.rank_loads(totals, owner, world)
        per_layer.append(
            {
                "layer": layer,
                "expert_tokens": totals,
                "rank_tokens": ranks,
                "imbalance_max_mean": M.imbalance(totals),
                "rank_imbalance_max_mean": M.imbalance(ranks),
                "load_cv": M.load_cv(totals),
            }
        )
    details = {
        "batches": len(raw["batches"]),
        "expert_to_rank": owner,
        "layers": per_layer,
        "across_layers": {
            "imbalance_max_mean": M.across_layers([p["imbalance_max_mean"] for p in per_layer]),
            "load_cv": M.across_layers([p["load_cv"] for p in per_layer]),
        },
    }
    return out, details


def _equivalence(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict]]:
    case = _case(spec)
    ep, ref = assemble(per_rank), run_reference(case)
    errors = compare(ep, ref)
    forward = errors["out"]
    grad = max(v for k, v in errors.items() if k.startswith("grad_"))
    worst_name = max(errors, key=errors.get)
    tol = TOLERANCE[spec.model["dtype"]]
    metrics = {
        "rel_error_forward": M.metric([forward], "ratio", "lower", exact=True),
        "rel_error_grad": M.metric([grad], "ratio", "lower", exact=True),
        "tokens_dropped": M.metric([ep.tokens_dropped], "copies", "lower", exact=True),
    }
    checks = [
        {
            "name": "rel_error_within_tolerance",
            "pass": errors[worst_name] <= tol,  # NaN or inf never passes
            "detail": f"worst of {len(errors)} (output, aux and z losses, gradients): {worst_name} "
            f"{errors[worst_name]:.2e}, tolerance {tol:g}",
        },
        {
            "name": "tokens_dropped_match_reference",
            "pass": ep.tokens_dropped == ref.tokens_dropped,
            "detail": f"{ep.tokens_dropped} dropped, reference {ref.tokens_dropped}",
        },
    ]
    return metrics, checks


def window_tokens(spec: RunSpec) -> int:
    """Tokens processed, over all ranks, inside the telemetry window."""
    total = spec.workload["tokens_per_rank"] * spec.world_size
    return total if spec.kind == "equivalence" else total * spec.scenario["repeats"]


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """Metrics, checks and details of one run from every rank's ``measure`` output."""
    if spec.kind == "equivalence":
        metrics, checks = _equivalence(spec, per_rank)
        return metrics, checks, {"compared": "output, aux and z losses, every gradient"}  # all in the check
    if spec.kind == "load_balance":
        metrics, details = _load_metrics(spec, per_rank[0])
        return metrics, [], details
    if spec.kind == "dispatch":
        worst = max(r["round_trip_error"] for r in per_rank)
        tol = TOLERANCE[spec.model["dtype"]]
        check = {
            "name": "combine_inverts_dispatch",
            "pass": worst <= tol,  # NaN never passes
            "detail": f"combine(dispatch(x)) vs x · kept weights: worst rank {worst:.2e}, tolerance {tol:g}",
        }
        return _collective_metrics(spec, per_rank[0]), [check], {"layers": spec.model["layers"]}
    if spec.kind == "experts":
        return _expert_metrics(spec, per_rank[0]), [_finite(per_rank)], {"backend": spec.model["expert_backend"]}
    raw = per_rank[0]
    finite = all(r["finite"] for r in per_rank)
    checks = [{"name": "finite_output", "pass": finite, "detail": "every rank's output is finite"}]
    return _timed_metrics(spec, raw), checks, {"layers": spec.model["layers"]}
