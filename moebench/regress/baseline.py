"""Committed baselines: ``results/baselines/<environment class>/``, written from passing runs.

The folder is named after the hardware the runs used: ``cpu-<N>core`` for CPU runs, the GPU's
name for CUDA runs (e.g. ``nvidia-h100-80gb-hbm3``). World size, backend and dtype are part of
each run's environment class too, and ``moebench compare`` checks them run by run.

A baseline is made from several runs of the same set (``moebench baseline update A B C``): result
files with the same name are merged, run by run, into one whose every metric is the **median of
the runs' medians**. The merged metric keeps the whole record (samples, median, p90, ...) of the
run whose median is that median, so its samples are one real run's and the Mann–Whitney test
judges one run against one run, as the false-alarm figures were measured. Hence an odd number of
runs. The document says so in ``baseline_of``; each run lists every source's median.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from moebench.regress import compare as C
from moebench.report import results

ROOT = results.REPO / "results" / "baselines"
RULE = "median of medians: each metric keeps the record of the run whose median is the median"
# What must agree between the runs merged into one baseline (the host's name may differ).
SAME_ENVIRONMENT = ("git_sha", "git_dirty", "python", "torch", "cuda", "nccl", "gpus", "gpu_driver", "cpu", "cpu_count")
SAME_RUN = ("params", "config", "world_size", "device", "backend")


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


def _refusal(doc: dict, allow_busy: bool) -> str | None:
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
        timed = any(not m.get("exact") for m in run["metrics"].values())  # a busy host moves timings only
        if run.get("host_busy") and timed and not allow_busy:
            return (
                f"run {run['params'] or '-'} ran on a busy host (host_busy): its timings would hide "
                "regressions; take baselines on a quiet host (or pass --allow-busy)"
            )
    return None


def update(paths: list[str | Path], root: Path = ROOT, allow_busy: bool = False) -> list[tuple[Path, int]]:
    """Write the result files under ``paths`` into ``root/<class>/``: (file written, runs merged).

    Files of the same name (the same scenario from several runs of a set) are merged by ``merge``.
    Everything is checked, every file read and merged, before anything is written.
    """
    if Path(root).exists() and not Path(root).is_dir():
        raise ValueError(f"--root {root}: not a folder: accepted a folder (made if missing) for the baselines")
    groups: dict[Path, list[tuple[Path, dict]]] = {}
    runs: dict[Path, list] = {}  # the first file of each group's runs, as compare reads them
    for path in results.find(paths):
        doc = results.read_any(path)
        read = C.runs_of(path, doc)  # a file compare would refuse is refused here, before anything is written
        reason = _refusal(doc, allow_busy)
        if reason:
            raise ValueError(f"{path}: not written as a baseline: {reason}")
        target = Path(root) / class_dir(doc) / Path(path).name
        groups.setdefault(target, []).append((path, doc))
        runs.setdefault(target, read)
    C.refuse_duplicates([run for group in runs.values() for run in group])  # compare would refuse the baseline
    counts = {target.name: len(group) for target, group in groups.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name} in {n}" for name, n in sorted(counts.items()))
        raise ValueError(f"{', '.join(map(str, paths))}: every scenario needs the same number of runs: {listed}")
    merged = {target: merge(group) for target, group in groups.items()}
    for target in merged:
        _check_writable(target)
    for target, doc in merged.items():
        try:
            results.write_atomic(target, doc)
        except OSError as err:
            raise ValueError(f"{target}: cannot write the baseline: {err.strerror or err}") from None
    return [(target, len(group)) for target, group in groups.items()]


def _check_writable(target: Path) -> None:
    """Refuse before writing anything: the folder cannot be made, or the file's name is a folder."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{target.parent}: cannot make the baseline folder: {err.strerror or err}") from None
    if target.is_dir():
        raise ValueError(f"{target}: cannot write the baseline: a folder has its name")


def merge(sources: list[tuple[Path, dict]]) -> dict:
    """One baseline document from several runs of one scenario (see the module docstring).

    Everything but the metrics (checks, SLO verdicts, telemetry, details) is the first source's.
    """
    if len(sources) % 2 == 0:
        raise ValueError(
            f"{', '.join(str(path) for path, _ in sources)}: {len(sources)} runs of one scenario: accepted an odd "
            "number (1, 3, 5, ...), so that the median of the medians is one run's, whose samples the baseline keeps"
        )
    if len(sources) > 1 and any(results.is_pytest_benchmark(doc) for _, doc in sources):
        raise ValueError(f"{sources[0][0]}: several pytest-benchmark files of one name: give one")
    (first_path, first), names = sources[0], [str(path) for path, _ in sources]
    for path, doc in sources[1:]:
        _check_same(first_path, first, path, doc)
    merged = copy.deepcopy(first)
    if results.is_pytest_benchmark(merged):
        return merged
    for i, run in enumerate(merged["runs"]):
        records = [doc["runs"][i] for _, doc in sources]
        run["metrics"], run["baseline_of"] = _median_metrics(names, records)
        busy = [r["host_busy"] for r in records if "host_busy" in r]
        if busy:
            run["host_busy"] = any(busy)
    merged["baseline_of"] = {"runs": len(sources), "rule": RULE, "sources": names}
    return merged


def _median_metrics(names: list[str], records: list[dict]) -> tuple[dict, dict]:
    """(metrics, provenance) of one run: each metric's median record, every source's median."""
    metrics, medians, picked = {}, {}, {}
    for name in records[0]["metrics"]:
        values = [record["metrics"][name]["median"] for record in records]
        if None in values and any(v is not None for v in values):
            raise ValueError(f"{names[values.index(None)]}: metric {name} has no value (NaN) there but has in others")
        pick = 0 if values[0] is None else sorted(range(len(values)), key=values.__getitem__)[len(values) // 2]
        metrics[name], medians[name], picked[name] = records[pick]["metrics"][name], values, names[pick]
    return metrics, {"medians": medians, "picked": picked}


def _check_same(first_path: Path, first: dict, path: Path, doc: dict) -> None:
    """Refuse to merge results of different scenarios, settings, code or hardware."""
    pairs = [("scenario", first["scenario"], doc["scenario"])]
    pairs += [(f"environment.{k}", first["environment"].get(k), doc["environment"].get(k)) for k in SAME_ENVIRONMENT]
    if len(first["runs"]) != len(doc["runs"]):
        pairs.append(("runs", f"{len(first['runs'])} runs", f"{len(doc['runs'])} runs"))
    for i, (a, b) in enumerate(zip(first["runs"], doc["runs"], strict=False)):  # a length mismatch: above
        pairs += [(f"runs[{i}].{k}", a.get(k), b.get(k)) for k in SAME_RUN]
        pairs.append((f"runs[{i}].metrics", sorted(a["metrics"]), sorted(b["metrics"])))
    for key, a, b in pairs:
        found = _difference(key, a, b)
        if found:
            key, a, b = found
            raise ValueError(
                f"{path}: {key} = {_cut(b)} differs from {_cut(a)} in {first_path}: "
                "a baseline merges runs of one scenario, with the same code and settings, on one machine class"
            )


def _difference(key: str, a, b) -> tuple[str, object, object] | None:
    """The first (dotted key, a's value, b's value) where a and b differ, looking into tables."""
    if a == b:
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        return next(_difference(f"{key}.{k}", a.get(k), b.get(k)) for k in [*a, *b] if a.get(k) != b.get(k))
    return key, a, b


def _cut(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def folder_for(paths: list[str | Path], root: Path = ROOT) -> Path:
    """The one baseline folder the result files under ``paths`` compare against."""
    classes = {class_dir(results.read_any(path)) for path in results.find(paths)}
    if len(classes) != 1:
        raise ValueError(f"{', '.join(map(str, paths))}: results span environment classes {sorted(classes)}")
    return Path(root) / classes.pop()
