"""The dispatch kind: dispatch and combine alone against their references (the local floors at
W = 1, the raw all-to-all at W > 1), and a round-trip check that combine inverts dispatch. Beside the
cost, the routed forward's expert and rank imbalance (load_balance's definitions), so that two routings
of the same workload (e.g. ``[routing] granularity`` token vs sequence) show load and cost side by side."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moebench import metrics as M
from moebench.kinds.equivalence import TOLERANCE
from moebench.measure.common import (
    COLLECTIVE_METRICS,
    collective_metrics,
    collective_timings,
    routing_stats,
    sampler,
    setup,
    timed_window_tokens,
)
from runtime.reference import rel_error

if TYPE_CHECKING:
    from moebench.spec import RunSpec
    from runtime.stack import MoEStack

NAME = "dispatch"
ORDER = 5  # place in listings and "accepted" lists
FEATURES = frozenset()  # what a scenario may ask of it (kinds/__init__.py)
COLUMNS = (
    ("dispatch_time_s", "dispatch (ms)", 1e3, ".3f"),
    ("combine_time_s", "combine (ms)", 1e3, ".3f"),
    ("dispatch_over_floor", "dispatch/floor", 1, ".2f"),
    ("combine_over_floor", "combine/floor", 1, ".2f"),
    ("a2a_time_s", "raw a2a (ms)", 1e3, ".3f"),
    ("a2a_busbw_gbps", "a2a busbw (GB/s)", 1, ".3f"),
    ("dispatch_over_a2a", "dispatch/a2a", 1, ".3f"),
    ("combine_over_a2a", "combine/a2a", 1, ".3f"),
    ("bytes_per_token", "bytes/token", 1, ".0f"),
    ("tokens_dropped", "dropped", 1, ".0f"),
    ("imbalance_max_mean", "imbalance (max/mean)", 1, ".3f"),
    ("rank_imbalance_max_mean", "rank imbalance (max/mean)", 1, ".3f"),
)
METRICS = (*COLLECTIVE_METRICS, "imbalance_max_mean", "rank_imbalance_max_mean")
window_tokens = timed_window_tokens


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Only the collectives (dispatch, combine, their references), no step; then the round trip."""
    stack, group, x_TD = setup(ctx, spec)
    with sampler(ctx, interval) as s:
        out = collective_timings(ctx, spec, stack, x_TD, group)
    out["round_trip_error"] = round_trip_error(stack, x_TD)
    return {**out, "telemetry": s.summary(), **routing_stats(stack, x_TD, spec.record_routing)}


def round_trip_error(stack: MoEStack, x_TD: torch.Tensor) -> float:
    """Relative error of combine(dispatch(x)) against x · Σ kept weights (identity experts), layer 0."""
    layer = stack.layers[0]
    with torch.no_grad():
        plan = layer.plan(x_TD)
        routing = plan.dispatch_args
        x_RD, meta = layer.dispatcher.dispatch(x_TD, *routing, expert_major=layer.experts.expert_major)
        out_TD = layer.dispatcher.combine(x_RD, plan.routing.weights_TK, meta).double()
        kept_weight_T = (plan.routing.weights_TK * plan.keep_TK).sum(1, keepdim=True).double()
        want_TD = x_TD.double() * kept_weight_T
    return rel_error(out_TD, want_TD)


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    worst = max(r["round_trip_error"] for r in per_rank)
    tol = TOLERANCE[spec.model["dtype"]]
    check = {
        "name": "combine_inverts_dispatch",
        "pass": worst <= tol,  # NaN never passes
        "detail": f"combine(dispatch(x)) vs x · kept weights: worst rank {worst:.2e}, tolerance {tol:g}",
    }
    return (
        collective_metrics(spec, per_rank[0]) | balance_metrics(per_rank[0]),
        [check],
        {"layers": spec.model["layers"]},
    )


def balance_metrics(raw: dict) -> dict:
    """The routed forward's worst layer's expert and rank imbalance (max / mean of the copies routed)."""
    experts = [torch.tensor(counts_WE).sum(0).tolist() for counts_WE in raw["counts_WE"]]
    world = len(raw["counts_WE"][0])  # W: the rows of the count matrix, the EP group
    ranks = [M.rank_loads(e, raw["expert_to_rank"], world) for e in experts]
    return {
        "imbalance_max_mean": M.metric([max(map(M.imbalance, experts))], "ratio", "lower", exact=True),
        "rank_imbalance_max_mean": M.metric([max(map(M.imbalance, ranks))], "ratio", "lower", exact=True),
    }
