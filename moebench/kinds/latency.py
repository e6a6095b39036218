"""The latency kind: the step's time distribution (p50, p90, p99) and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moebench import metrics as M
from moebench.measure.common import finite_check, timed_window_tokens
from moebench.measure.eplb import EPLB_COLUMNS, EPLB_METRICS, eplb_checks, eplb_details, eplb_metrics
from moebench.measure.impl import IMPL_COLUMNS, IMPL_METRICS, check_impl, impl_of, impl_results, impl_timed
from moebench.measure.offload import OFFLOAD_COLUMNS, OFFLOAD_METRICS, offload_details, offload_metrics
from moebench.measure.overlap import OVERLAP_COLUMNS, OVERLAP_METRICS, overlap_metrics
from moebench.measure.series import ALERT_COLUMNS, ALERT_METRICS, alert_results
from moebench.measure.timed import measure_timed

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "latency"
ORDER = 2  # place in listings and "accepted" lists
# what a scenario may ask of it (kinds/__init__.py)
FEATURES = frozenset({"overlap", "offload", "stream", "eplb", "alerts", "impl"})
COLUMNS = (
    ("step_time_s", "p50 (ms)", 1e3, ".3f"),
    ("step_time_s:p90", "p90 (ms)", 1e3, ".3f"),
    ("step_time_s:p99", "p99 (ms)", 1e3, ".3f"),
    ("step_time_s:n", "samples", 1, ".0f"),
    *IMPL_COLUMNS,  # only in tables of runs that set [model] impl
    *ALERT_COLUMNS,  # only in tables of runs with [alerts]
    *OVERLAP_COLUMNS,  # only in tables of runs that set overlap_chunks
    *OFFLOAD_COLUMNS,  # only in tables of runs that set [offload] cache_slots
    *EPLB_COLUMNS,  # only in tables of runs that set [eplb] interval
)
METRICS = ("step_time_s", *OVERLAP_METRICS, *OFFLOAD_METRICS, *EPLB_METRICS, *ALERT_METRICS, *IMPL_METRICS)
window_tokens = timed_window_tokens


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Time the step alone."""
    if impl_of(spec) != "runtime":  # another implementation, timed against the runtime's layer
        return impl_timed(ctx, spec, interval)
    return measure_timed(ctx, spec, interval, collectives=False)


validate = check_impl  # [model] impl: one layer, world size 1 (moebench/measure/impl.py)


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    if "impl" in per_rank[0]:
        return impl_results(spec, per_rank, throughput=False)
    metrics = {"step_time_s": M.metric(per_rank[0]["step"], "s", "lower")} | overlap_metrics(per_rank[0])
    metrics |= offload_metrics(spec, per_rank) | eplb_metrics(spec, per_rank)
    alerted, series = alert_results(spec, per_rank)
    checks = [finite_check(per_rank), *eplb_checks(per_rank)]
    details = {"layers": spec.model["layers"], **offload_details(per_rank), **eplb_details(spec, per_rank), **series}
    return metrics | alerted, checks, details
