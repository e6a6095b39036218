"""The scenario kinds: one module per kind, and the registry the runner, the result tables and the
scenario loader look them up in.

Each kind module holds what is particular to it:

- ``measure(ctx, spec, interval)``: run on every rank (through ``launch``), returns plain data;
- ``evaluate(spec, per_rank)``: the ranks' data -> (metrics, checks, details), in the parent;
- ``COLUMNS``: its table columns, (metric[:statistic], header with unit, scale, format);
- ``METRICS``: the metric names an [slo] or [compare] key may name;
- ``window_tokens(spec)``: tokens processed, over all ranks, inside the telemetry window;
- ``FEATURES``: what a scenario of the kind may ask for, among ``FEATURES`` below (the scenario
  loader refuses the rest, naming the kinds that accept it);
- optionally ``validate(spec)``: the kind's own rules, raising ``ValueError`` with a one-line reason;
- optionally ``DEFAULT_SLOS``: gates every run of the kind gets unless its file states them;
- optionally ``launch(spec, interval, device, backend)``: the per-rank data ``evaluate`` gets, in
  place of the runner's one ``launch`` of ``measure`` (the fault kind launches with a watchdog,
  takes a stopped run as its result, and relaunches to resume from a checkpoint).

Shared measurement helpers live in ``moebench/measure/``. Adding a kind = adding one module that defines
``NAME`` (``ORDER``, optional, places it in listings; lower first). Metric names, units and
formulas are documented in ``docs/results.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING

from moebench.measure.common import on_rank

if TYPE_CHECKING:
    from moebench.spec import RunSpec


# What a scenario may ask of a kind beyond its plain run, and the key that asks for it.
FEATURES = {
    "overlap": "[parallel] overlap_chunks",  # chunked all-to-alls overlapped with the experts
    "offload": "[offload] cache_slots",  # experts in host memory behind a device cache
    "stream": "[workload] steps",  # a decode-like stream of steps (steps > 1)
    "fault": "[fault] type",  # an injected fault
    "redundancy": "[parallel] redundant_experts",  # replicas of the busiest experts
    "eplb": "[eplb] interval",  # experts re-placed from the measured load while running
    "decoder": "[model] attention_heads",  # a decoder with attention ([serve] and the other decoder keys)
    "dp": "[parallel] mode",  # "dp": the data-parallel baseline, every rank holds every expert
    "alerts": "[alerts]",  # the deployment plan's alerts, judged on per-step series (moebench/measure/series.py)
    "impl": "[model] impl",  # another MoE implementation (moebench/adapters/) in place of the runtime's layer
    "bias_update": "[routing] score_bias_update",  # the router's choice bias moved after each optimizer step
}


@dataclass(frozen=True)
class Kind:
    """One scenario kind, as its module defines it (see the module docstring)."""

    name: str
    measure: Callable  # (ctx, spec, interval) -> raw dict, on every rank
    evaluate: Callable  # (spec, per_rank) -> (metrics, checks, details)
    columns: tuple[tuple[str, str, float, str], ...]
    metrics: tuple[str, ...]
    window_tokens: Callable  # (spec) -> int
    features: frozenset[str] = frozenset()  # keys of FEATURES the kind accepts
    validate: Callable | None = None  # (spec) -> None, raising ValueError: the kind's own rules
    default_slos: dict = field(default_factory=dict)  # [slo] key -> limit
    launch: Callable | None = None  # (spec, interval, device, backend) -> per-rank data, in the runner's launch's place

    @classmethod
    def of(cls, module: ModuleType) -> Kind:
        return cls(
            name=module.NAME,
            measure=module.measure,
            evaluate=module.evaluate,
            columns=module.COLUMNS,
            metrics=module.METRICS,
            window_tokens=module.window_tokens,
            features=module.FEATURES,
            validate=getattr(module, "validate", None),
            default_slos=getattr(module, "DEFAULT_SLOS", {}),
            launch=getattr(module, "launch", None),
        )


def _discover() -> list[ModuleType]:
    """Every module of this package that defines a kind (``NAME``): adding a kind is adding a file."""
    found = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    kinds = [module for module in found if hasattr(module, "NAME")]
    for module in kinds:
        unknown = set(module.FEATURES) - set(FEATURES)
        if unknown:  # a programming error in a kind module, found at import
            raise TypeError(f"{module.__name__}.FEATURES names {sorted(unknown)}: accepted {', '.join(FEATURES)}")
    return sorted(kinds, key=lambda module: (getattr(module, "ORDER", 100), module.NAME))


REGISTRY: dict[str, Kind] = {kind.name: kind for kind in map(Kind.of, _discover())}


def get(name: str) -> Kind:
    """The kind called ``name``; a ``ValueError`` naming the known kinds otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"kind = {name!r} is not a known kind: accepted {', '.join(REGISTRY)}") from None


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Run ``spec`` on this rank; ``interval`` is the telemetry period in s (None: no sampler)."""
    return on_rank(get(spec.kind).measure, ctx, spec, interval)


def accepting(feature: str) -> list[str]:
    """The kinds that accept ``feature``, in listing order."""
    return [name for name, kind in REGISTRY.items() if feature in kind.features]


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """Metrics, checks and details of one run from every rank's ``measure`` output."""
    return get(spec.kind).evaluate(spec, per_rank)


def window_tokens(spec: RunSpec) -> int:
    """Tokens processed, over all ranks, inside the telemetry window."""
    return get(spec.kind).window_tokens(spec)
