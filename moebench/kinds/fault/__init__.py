"""The fault kind, in three parts: ``kind`` (inject, detect and name a fault on the ranks; evaluate;
its rules), ``loss`` (expert and rank loss with redundant experts and failover), ``resume`` (a
training run that checkpoints, crashes and resumes) and ``run`` (the parent side: the launch with
the watchdog). The registry reads the kind's interface from here."""

from moebench.kinds.fault.kind import (
    COLUMNS,
    FEATURES,
    METRICS,
    NAME,
    ON_EXPERT_LOSS,
    ORDER,
    STRAGGLER_STEPS,
    TYPES,
    evaluate,
    measure,
    validate,
    window_tokens,
)
from moebench.kinds.fault.run import launch

__all__ = [
    "COLUMNS",
    "FEATURES",
    "METRICS",
    "NAME",
    "ON_EXPERT_LOSS",
    "ORDER",
    "STRAGGLER_STEPS",
    "TYPES",
    "evaluate",
    "launch",
    "measure",
    "validate",
    "window_tokens",
]
