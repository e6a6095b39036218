"""The deployment plan's alerts: what each watches, its default threshold, and which of them a run's
per-step series fired.

Scope: the alert definitions (``ALERTS``), the ``[alerts]`` defaults (``DEFAULTS``, the deployment plan's
figures), and ``evaluate``: per-step series + thresholds -> the alerts that fired. Pure functions of
numbers (no torch): the report page and the Prometheus export read this module too. The series are
recorded by ``moebench/measure/series.py``; definitions and sources are in ``docs/results.md`` ("Alerts").

When an alert fires follows Prometheus's ``for:`` clause, evaluated once per sample:

- the condition (``value > threshold``, or ``value < threshold`` for a floor) is judged at each sample;
- a span is a maximal run of consecutive samples where it holds; a sample that is missing (None) or
  not a number ends a span, as an absent series resets a Prometheus alert;
- a span held for ``t_last − t_first`` seconds (its first and last samples' times): one sample alone
  has held for 0 s. The span fires when that is ``>= for_s``; with ``for_s = 0`` (the alerts the plan
  does not sustain) any one sample past the threshold fires.

Each span that fires is one alert: ``name``, ``first_s`` (the time of the span's first sample: when the
condition began to hold, Prometheus's ``activeAt``; it fires ``for_s`` later), ``duration_s`` (how long
it held, as above), ``peak`` (the worst value in the span: its largest, or smallest for a floor) and
``threshold``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    """One alert of the deployment plan: the series it watches and the [alerts] keys that set it."""

    name: str  # in results and the report: "expert_overload"
    series: str  # the key of the series it is judged on (``details.series`` of a run)
    key: str  # the [alerts] key of its threshold
    for_key: str | None  # the [alerts] key of how long it must hold; None: one sample fires it
    op: str  # ">": fires above the threshold; "<": fires below it (a floor)
    metric: str  # the metric a deployment exports, which the Prometheus rule reads
    rule: str  # the Prometheus alert's name
    what: str  # one line for people, with the unit


ALERTS = (
    Alert(
        "expert_overload",
        "expert_load_ratio",
        "expert_overload",
        "overload_for_s",
        ">",
        "moebench_expert_load_ratio",
        "MoEExpertOverload",
        "the busiest expert's routed copies per step over its capacity (fraction of capacity)",
    ),
    Alert(
        "memory_used",
        "memory_used",
        "memory_used",
        None,
        ">",
        "moebench_memory_used_ratio",
        "MoEMemoryHigh",
        "memory in use over the memory there is (fraction; device memory on a GPU, host memory on the CPU)",
    ),
    Alert(
        "comm_delay",
        "a2a_time_s",
        "comm_delay_s",
        None,
        ">",
        "moebench_all_to_all_seconds",
        "MoECommDelay",
        "the slowest single dispatch all-to-all of a step (s)",
    ),
    Alert(
        "low_throughput",
        "tokens_per_s_per_gpu",
        "min_tokens_per_s_per_gpu",
        "throughput_for_s",
        "<",
        "moebench_tokens_per_second_per_gpu",
        "MoELowThroughput",
        "tokens processed per second per GPU (rank) in a step (tokens/s)",
    ),
)
BY_NAME = {alert.name: alert for alert in ALERTS}

# The [alerts] defaults: the deployment plan's thresholds ("expert overload > 90 % capacity for > 30 s",
# "memory used > 85 %", "communication delay > 5 ms", "throughput < 80,000 tokens/s/GPU"). The plan gives
# no duration for throughput: 30 s, as for overload. capacity_factor: the expert capacity of a dropless
# model (routing capacity_factor 0), the Switch Transformer / GShard value 1.25.
DEFAULTS = {
    "expert_overload": 0.9,
    "overload_for_s": 30.0,
    "memory_used": 0.85,
    "comm_delay_s": 0.005,
    "min_tokens_per_s_per_gpu": 80_000.0,
    "throughput_for_s": 30.0,
    "capacity_factor": 1.25,
}


def _holds(value, threshold: float, op: str) -> bool:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return value > threshold if op == ">" else value < threshold


def spans(times_s: Sequence[float], values: Sequence, threshold: float, op: str) -> list[tuple[int, int]]:
    """(first, last) sample indices of each maximal run of consecutive samples where the condition holds."""
    if len(times_s) != len(values):
        raise ValueError(f"a series needs one time per value: {len(times_s)} times, {len(values)} values")
    if any(b < a for a, b in itertools.pairwise(times_s)):
        raise ValueError("a series' times must not decrease")
    out, start = [], None
    for i, value in enumerate(values):
        if _holds(value, threshold, op):
            start = i if start is None else start
        elif start is not None:
            out.append((start, i - 1))
            start = None
    if start is not None:
        out.append((start, len(values) - 1))
    return out


def fired(times_s: Sequence[float], values: Sequence, threshold: float, op: str, for_s: float, name: str) -> list[dict]:
    """The spans of one series that held for at least ``for_s`` seconds, as alerts (module docstring)."""
    out = []
    for first, last in spans(times_s, values, threshold, op):
        held = float(times_s[last] - times_s[first])
        if held >= for_s:
            span = [float(v) for v in values[first : last + 1]]
            peak = max(span) if op == ">" else min(span)
            out.append(
                {"name": name, "first_s": float(times_s[first]), "duration_s": held, "peak": peak,
                 "threshold": float(threshold)}
            )  # fmt: skip
    return out


def evaluate(series: dict, thresholds: dict) -> list[dict]:
    """Every alert the series fired, in ``ALERTS`` order, then by time. ``series``: ``t_s`` (s from the
    window's start) and one list per watched series (an absent one fires nothing); ``thresholds``: the
    [alerts] keys (``DEFAULTS`` fill the missing ones)."""
    limits = DEFAULTS | dict(thresholds)
    out = []
    for alert in ALERTS:
        values = series.get(alert.series)
        if values is None:
            continue
        for_s = limits[alert.for_key] if alert.for_key else 0.0
        out += fired(series["t_s"], values, limits[alert.key], alert.op, for_s, alert.name)
    return out
