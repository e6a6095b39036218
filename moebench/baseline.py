"""Committed baselines: ``results/baselines/<environment class>/``, written from passing runs.

The folder is named after the hardware the runs used: ``cpu-<N>core`` for CPU runs, the GPU's
name for CUDA runs (e.g. ``nvidia-h100-80gb-hbm3``). World size, backend and dtype are part of
each run's environment class too, and ``moebench compare`` checks them run by run.
"""

from __future__ import annotations

import re
from pathlib import Path

from moebench import results

ROOT = results.REPO / "results" / "baselines"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def class_dir(doc: dict) -> str:
    """The baseline folder name for a result document (either format)."""
    if results.is_pytest_benchmark(doc):
        return f"cpu-{((doc.get('machine_info') or {}).get('cpu') or {}).get('count')}core"
    env = doc["environment"]
    if any(run["device"] == "cuda" for run in doc["runs"]) and env.get("gpus"):
        return _slug(env["gpus"][0])
    return f"cpu-{env.get('cpu_count')}core"


def _refusal(path: Path, doc: dict) -> str | None:
    """Why ``doc`` must not become a baseline, or None."""
    if results.is_pytest_benchmark(doc):
        return None
    knobs = doc["environment"].get("test_knobs")
    if knobs:
        return f"it was produced with test-only knobs set ({knobs})"
    for run in doc["runs"]:
        failed = [c["name"] for c in run["checks"] if not c["pass"]]
        if run["status"] != "ok" or failed:
            what = run["status"] if run["status"] != "ok" else "failed " + ", ".join(failed)
            return f"run {run['params'] or '-'} is {what}: a baseline holds passing runs only"
    return None


def update(paths: list[str | Path], root: Path = ROOT) -> list[Path]:
    """Copy the result files under ``paths`` into ``root/<class>/``, refusing any that must not be
    baselines (checked for every file before anything is written). Returns the files written."""
    docs = [(path, results.read_any(path)) for path in results.find(paths)]
    for path, doc in docs:
        reason = _refusal(path, doc)
        if reason:
            raise ValueError(f"{path}: not written as a baseline: {reason}")
    written = []
    for path, doc in docs:
        target = Path(root) / class_dir(doc) / Path(path).name
        results.write_atomic(target, doc)
        written.append(target)
    return written


def folder_for(paths: list[str | Path], root: Path = ROOT) -> Path:
    """The one baseline folder the result files under ``paths`` compare against."""
    classes = {class_dir(results.read_any(path)) for path in results.find(paths)}
    if len(classes) != 1:
        raise ValueError(f"{', '.join(map(str, paths))}: results span environment classes {sorted(classes)}")
    return Path(root) / classes.pop()
