"""The scenario kinds: one module per kind, and the registry the runner, the result tables and the
scenario loader look them up in.

Each kind module holds what is particular to it:

- ``measure(ctx, spec, interval)``: run on every rank (through ``launch``), returns plain data;
- ``evaluate(spec, per_rank)``: the ranks' data -> (metrics, checks, details), in the parent;
- ``COLUMNS``: its table columns, (metric[:statistic], header with unit, scale, format);
- ``METRICS``: the metric names an [slo] or [compare] key may name;
- ``window_tokens(spec)``: tokens processed, over all ranks, inside the telemetry window;
- optionally ``DEFAULT_SLOS``: gates every run of the kind gets unless its file states them.

Shared measurement helpers live in ``common``. Adding a kind = one module plus one line in
``_MODULES``. Metric names, units and formulas are documented in ``results/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from moebench.kinds import dispatch, equivalence, experts, latency, load_balance, throughput

if TYPE_CHECKING:
    from moebench.scenario import RunSpec


@dataclass(frozen=True)
class Kind:
    """One scenario kind, as its module defines it (see the module docstring)."""

    name: str
    measure: Callable  # (ctx, spec, interval) -> raw dict, on every rank
    evaluate: Callable  # (spec, per_rank) -> (metrics, checks, details)
    columns: tuple[tuple[str, str, float, str], ...]
    metrics: tuple[str, ...]
    window_tokens: Callable  # (spec) -> int
    default_slos: dict = field(default_factory=dict)  # [slo] key -> limit

    @classmethod
    def of(cls, module: ModuleType) -> Kind:
        return cls(
            name=module.NAME,
            measure=module.measure,
            evaluate=module.evaluate,
            columns=module.COLUMNS,
            metrics=module.METRICS,
            window_tokens=module.window_tokens,
            default_slos=getattr(module, "DEFAULT_SLOS", {}),
        )


_MODULES = (throughput, latency, load_balance, equivalence, dispatch, experts)
REGISTRY: dict[str, Kind] = {kind.name: kind for kind in map(Kind.of, _MODULES)}


def get(name: str) -> Kind:
    """The kind called ``name``; a ``ValueError`` naming the known kinds otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"kind = {name!r} is not a known kind: accepted {', '.join(REGISTRY)}") from None


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Run ``spec`` on this rank; ``interval`` is the telemetry period in s (None: no sampler)."""
    if ctx.device.type == "cpu" and spec.parallel["threads_per_rank"]:
        torch.set_num_threads(spec.parallel["threads_per_rank"])
    return get(spec.kind).measure(ctx, spec, interval)


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """Metrics, checks and details of one run from every rank's ``measure`` output."""
    return get(spec.kind).evaluate(spec, per_rank)


def window_tokens(spec: RunSpec) -> int:
    """Tokens processed, over all ranks, inside the telemetry window."""
    return get(spec.kind).window_tokens(spec)
