"""The throughput kind: the step's tokens/s, the collectives against their references, and the
MoE step against a dense stack of the same active FLOPs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moebench import metrics as M
from moebench.measure.common import (
    COLLECTIVE_METRICS,
    collective_metrics,
    finite_check,
    ratios,
    timed_window_tokens,
)
from moebench.measure.eplb import EPLB_COLUMNS, EPLB_METRICS, eplb_checks, eplb_details, eplb_metrics
from moebench.measure.impl import IMPL_COLUMNS, IMPL_METRICS, check_impl, impl_of, impl_results, impl_timed
from moebench.measure.offload import OFFLOAD_COLUMNS, OFFLOAD_METRICS, offload_details, offload_metrics
from moebench.measure.overlap import OVERLAP_COLUMNS, OVERLAP_METRICS, overlap_metrics
from moebench.measure.series import ALERT_COLUMNS, ALERT_METRICS, alert_results
from moebench.measure.timed import measure_timed

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "throughput"
ORDER = 1  # place in listings and "accepted" lists
# what a scenario may ask of it (kinds/__init__.py)
FEATURES = frozenset({"overlap", "offload", "stream", "eplb", "alerts", "impl"})
# (metric[:statistic], header with unit, scale, format); the statistic defaults to median.
COLUMNS = (
    ("tokens_per_s", "tokens/s", 1, ".0f"),
    ("tokens_per_s_per_gpu", "tokens/s/gpu", 1, ".0f"),
    ("step_time_s", "step p50 (ms)", 1e3, ".2f"),
    ("step_time_s:p90", "step p90 (ms)", 1e3, ".2f"),
    *IMPL_COLUMNS,  # only in tables of runs that set [model] impl
    *ALERT_COLUMNS,  # only in tables of runs with [alerts]
    *OVERLAP_COLUMNS,  # only in tables of runs that set overlap_chunks
    *OFFLOAD_COLUMNS,  # only in tables of runs that set [offload] cache_slots
    *EPLB_COLUMNS,  # only in tables of runs that set [eplb] interval
    ("dispatch_time_s", "dispatch (ms)", 1e3, ".2f"),
    ("combine_time_s", "combine (ms)", 1e3, ".2f"),
    ("a2a_busbw_gbps", "a2a busbw (GB/s)", 1, ".3f"),
    ("dispatch_over_a2a", "dispatch/a2a", 1, ".2f"),
    ("dispatch_over_floor", "dispatch/floor", 1, ".2f"),
    ("moe_over_dense", "moe/dense", 1, ".2f"),
    ("bytes_per_token", "bytes/token", 1, ".0f"),
    ("tokens_dropped", "dropped", 1, ".0f"),
)
METRICS = (
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "step_time_s",
    "moe_over_dense",
    *COLLECTIVE_METRICS,
    *OVERLAP_METRICS,
    *OFFLOAD_METRICS,
    *EPLB_METRICS,
    *ALERT_METRICS,
    *IMPL_METRICS,
)
window_tokens = timed_window_tokens


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Time the step, then the collectives and the dense reference."""
    if impl_of(spec) != "runtime":  # another implementation, timed against the runtime's layer
        return impl_timed(ctx, spec, interval)
    return measure_timed(ctx, spec, interval, collectives=True)


validate = check_impl  # [model] impl: one layer, world size 1 (moebench/measure/impl.py)


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    if "impl" in per_rank[0]:
        return impl_results(spec, per_rank, throughput=True)
    world, total = spec.world_size, spec.workload["tokens_per_rank"] * spec.world_size
    raw = per_rank[0]
    step = raw["step"]
    metrics = {
        "step_time_s": M.metric(step, "s", "lower"),
        "tokens_per_s": M.metric([total / t for t in step], "tokens/s", "higher"),
        "tokens_per_s_per_gpu": M.metric([total / t / world for t in step], "tokens/s", "higher"),
        "moe_over_dense": M.metric(ratios(raw["paired_step"], raw["dense"]), "ratio", "lower"),
    }
    metrics |= collective_metrics(spec, raw) | overlap_metrics(raw) | offload_metrics(spec, per_rank)
    metrics |= eplb_metrics(spec, per_rank)
    alerted, series = alert_results(spec, per_rank)
    checks = [finite_check(per_rank), *eplb_checks(per_rank)]
    details = {"layers": spec.model["layers"], **offload_details(per_rank), **eplb_details(spec, per_rank), **series}
    return metrics | alerted, checks, details
