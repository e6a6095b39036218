"""Hand-built ``moebench.result/1`` documents for the compare and baseline tests."""

from __future__ import annotations

import numpy as np

from moebench import kinds
from moebench.report.results import SCHEMA

ABSENT = object()  # a key an older result file does not have


def times(median: float, n: int = 30, seed: int = 0, spread: float = 0.02) -> list[float]:
    """``n`` seeded samples scattered ``spread`` (relative std) around ``median``."""
    rng = np.random.default_rng(seed)
    return (median * (1 + spread * rng.standard_normal(n))).tolist()


def run_record(
    metrics: dict,
    params=None,
    *,
    checks=None,
    status="ok",
    world=2,
    backend="gloo",
    dtype="float32",
    host_busy=ABSENT,
    host=ABSENT,
) -> dict:
    """One run of a result file; ``host_busy`` and ``host`` only when given (older files lack them)."""
    run = {
        "params": params if params is not None else {"world_size": world},
        "config": {"model": {"dtype": dtype}},
        "world_size": world,
        "device": "cpu",
        "backend": backend,
        "status": status,
        "error": None if status == "ok" else "RuntimeError: boom",
        "metrics": metrics,
        "checks": checks if checks is not None else [{"name": "finite_output", "pass": True, "detail": ""}],
        "slo": [],
        "telemetry": None,
    }
    run |= {k: v for k, v in (("host_busy", host_busy), ("host", host)) if v is not ABSENT}
    return run


def result_doc(
    runs: list[dict], name="demo", kind="throughput", thresholds=None, cpus=2, knobs=None, sha="abc"
) -> dict:
    """A whole result file of one scenario."""
    env = {"git_sha": sha, "git_dirty": False, "torch": "2.13.0", "gpus": [], "cpu_count": cpus}
    env["test_knobs"] = knobs or {}
    return {
        "schema": SCHEMA,
        "source": f"scenarios/{name}.toml",
        "scenario": {"scenario": {"name": name, "kind": kind}, "compare": thresholds or {}},
        "columns": [list(column) for column in kinds.get(kind).columns],
        "environment": env,
        "runs": runs,
    }
