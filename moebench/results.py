"""Result files: the environment fingerprint, atomic JSON writing, and tables rendered from JSON.

One file per scenario, schema ``moebench.result/1`` (documented in ``results/README.md``). Tables
are always rendered from the saved JSON, never the other way round, so ``moebench report``
prints exactly what ``moebench run`` printed.
"""

from __future__ import annotations

import json
import math
import os
import platform
import secrets
import subprocess
from pathlib import Path

import torch
from tabulate import tabulate

from moebench.text import clip
from runtime.dispatch import SLOWDOWN_ENV

SCHEMA = "moebench.result/1"
STATS = ("median", "p90", "p99", "min", "max", "n")
REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> tuple[list[str], str | None]:
    """Names of the visible CUDA devices and the driver version (NVML), if any."""
    if not torch.cuda.is_available():
        return [], None
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        pynvml.nvmlShutdown()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:
        driver = None
    return names, driver


def environment() -> dict:
    """Where the numbers came from: code version, software, hardware."""
    sha = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    gpus, driver = _gpus()
    nccl = None
    if torch.cuda.is_available() and hasattr(torch.cuda, "nccl"):
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    return {
        "git_sha": sha,
        "git_dirty": None if status is None else bool(status),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nccl": nccl,
        "gpus": gpus,
        "gpu_driver": driver,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "test_knobs": {SLOWDOWN_ENV: os.environ[SLOWDOWN_ENV]} if SLOWDOWN_ENV in os.environ else {},
    }


def short_sha() -> str:
    return _git("rev-parse", "--short", "HEAD") or "nogit"


# -------------------------------------------------------------------------------------------
# Writing and reading


def json_safe(value):
    """JSON has no NaN or inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_atomic(path: Path, doc: dict) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over ``path``.

    The temporary file is created with mode 0666 less the umask, as ``open`` would create ``path``
    (``mkstemp``'s 0600 would survive the rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(json_safe(doc), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> tuple[int, Path]:
    """A new, empty hidden file next to ``path`` (a random name): its descriptor and name."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp


def read(path: Path) -> dict:
    """Load one result file, refusing anything that is not a well-formed ``moebench.result/1``."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable result file: {err}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: schema = {clip(repr(found))} is invalid: accepted {SCHEMA!r}")
    problem = _malformed(doc)
    if problem:
        raise ValueError(f"{path}: malformed {SCHEMA} file: {problem}")
    return doc


def is_pytest_benchmark(doc: object) -> bool:
    """A pytest-benchmark ``--benchmark-json`` file (compared and kept as a baseline as it is)."""
    return isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list) and "machine_info" in doc


def read_any(path: Path) -> dict:
    """A moebench result file (validated by ``read``) or a pytest-benchmark JSON file."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable result file: {err}") from None
    return doc if is_pytest_benchmark(doc) else read(path)


def _malformed(doc: dict) -> str | None:
    """What is missing or mistyped in a result file's required structure; None when it is sound."""
    scenario = doc.get("scenario", {}).get("scenario") if isinstance(doc.get("scenario"), dict) else None
    if not isinstance(scenario, dict) or scenario.get("kind") not in COLUMNS or "name" not in scenario:
        return "scenario.scenario needs a name and a kind among " + ", ".join(COLUMNS)
    if not isinstance(doc.get("source"), str) or not isinstance(doc.get("environment"), dict):
        return "needs a source string and an environment table"
    runs = doc.get("runs")
    if not isinstance(runs, list):
        return "runs must be a list"
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not all(isinstance(run.get(k), str) for k in ("status", "device", "backend")):
            return f"runs[{i}] needs status, device and backend strings"
        if not all(isinstance(run.get(k), t) for k, t in (("params", dict), ("metrics", dict), ("checks", list))):
            return f"runs[{i}] needs params and metrics tables and a checks list"
        for name, m in run["metrics"].items():
            if not isinstance(m, dict) or not all(isinstance(m.get(k), (int, float, type(None))) for k in STATS):
                return f"runs[{i}].metrics.{name} needs numeric {', '.join(STATS)}"
    return None


def find(paths: list[str | Path]) -> list[Path]:
    """Result files named directly, and every ``*.json`` under named folders, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("*.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    if not files:
        raise ValueError(f"{', '.join(map(str, paths))}: no result files (*.json) found")
    return files


# -------------------------------------------------------------------------------------------
# Tables

# Per kind: (metric[:statistic], header with unit, scale, format). The statistic defaults to median.
COLUMNS = {
    "throughput": [
        ("tokens_per_s", "tokens/s", 1, ".0f"),
        ("tokens_per_s_per_gpu", "tokens/s/gpu", 1, ".0f"),
        ("step_time_s", "step p50 (ms)", 1e3, ".2f"),
        ("step_time_s:p90", "step p90 (ms)", 1e3, ".2f"),
        ("dispatch_time_s", "dispatch (ms)", 1e3, ".2f"),
        ("combine_time_s", "combine (ms)", 1e3, ".2f"),
        ("a2a_busbw_gbps", "a2a busbw (GB/s)", 1, ".3f"),
        ("dispatch_over_a2a", "dispatch/a2a", 1, ".2f"),
        ("dispatch_over_floor", "dispatch/floor", 1, ".2f"),
        ("moe_over_dense", "moe/dense", 1, ".2f"),
        ("bytes_per_token", "bytes/token", 1, ".0f"),
        ("tokens_dropped", "dropped", 1, ".0f"),
    ],
    "latency": [
        ("step_time_s", "p50 (ms)", 1e3, ".3f"),
        ("step_time_s:p90", "p90 (ms)", 1e3, ".3f"),
        ("step_time_s:p99", "p99 (ms)", 1e3, ".3f"),
        ("step_time_s:n", "samples", 1, ".0f"),
    ],
    "load_balance": [
        ("imbalance_max_mean", "imbalance (max/mean)", 1, ".3f"),
        ("rank_imbalance_max_mean", "rank imbalance (max/mean)", 1, ".3f"),
        ("load_cv", "load CV", 1, ".3f"),
        ("tokens_dropped", "dropped (copies)", 1, ".0f"),
        ("tokens_dropped_fraction", "dropped (fraction)", 1, ".4f"),
    ],
    "dispatch": [
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
    ],
    "experts": [
        ("expert_time_s", "experts p50 (ms)", 1e3, ".3f"),
        ("expert_time_s:p90", "p90 (ms)", 1e3, ".3f"),
        ("expert_tflops", "TFLOP/s", 1, ".4f"),
        ("rows_per_expert", "rows/expert", 1, ".0f"),
    ],
    "equivalence": [
        ("rel_error_forward", "fwd rel err", 1, ".1e"),
        ("rel_error_grad", "grad rel err", 1, ".1e"),
        ("tokens_dropped", "dropped (copies)", 1, ".0f"),
    ],
}


def _cell(run: dict, column: str, scale: float, fmt: str) -> str:
    name, _, stat = column.partition(":")
    m = run.get("metrics", {}).get(name)
    value = None if m is None else m.get(stat or "median")
    return "-" if value is None else format(value * scale, fmt)


def _telemetry_cell(run: dict) -> str:
    t = run.get("telemetry") or {}
    if t.get("energy_j_per_token") is not None:
        return format(t["energy_j_per_token"], ".3g")
    return "-"


def _memory_cell(run: dict) -> str:
    t = run.get("telemetry") or {}
    peak = t.get("peak_memory_bytes") or t.get("peak_host_memory_bytes")
    return "-" if peak is None else format(peak / 2**20, ".0f")


def verdict(run: dict) -> str:
    """ok | FAIL (a check or SLO failed) | error (the run did not finish) | skipped."""
    if run["status"] != "ok":
        return run["status"]
    failed = [c for c in run["checks"] if not c["pass"]] + [s for s in run["slo"] if s["pass"] is False]
    return "FAIL" if failed else "ok"


def _slo_cell(run: dict) -> str:
    gates = run.get("slo", [])
    judged = [s for s in gates if s["pass"] is not None]
    unjudged = f" ({len(gates) - len(judged)} not measured)" if len(judged) < len(gates) else ""
    if not judged:
        return "-" + unjudged if gates else "-"
    failed = [s.get("gate", f"{s['op']}_{s['metric']}") for s in judged if not s["pass"]]
    return ("met" if not failed else "missed: " + ", ".join(failed)) + unjudged


def render(doc: dict, fmt: str = "plain") -> str:
    """The table of one result file: a title line, then one row per run."""
    scenario = doc["scenario"]["scenario"]
    kind = scenario["kind"]
    param_keys = list(dict.fromkeys(k for run in doc["runs"] for k in run["params"]))
    columns = COLUMNS[kind]
    energy_cells = [_telemetry_cell(run) for run in doc["runs"]]
    energy = any(cell != "-" for cell in energy_cells)  # a J/token column only with NVML
    headers = [*param_keys, "device", *(h for _, h, _, _ in columns), *(["J/token"] * energy)]
    headers += ["peak mem (MiB)", "SLO", "check"]
    rows = []
    for run, energy_cell in zip(doc["runs"], energy_cells, strict=True):
        row = [run["params"].get(k, "") for k in param_keys] + [f"{run['device']}/{run['backend']}"]
        row += [_cell(run, c, scale, f) for c, _, scale, f in columns]
        row += [energy_cell] * energy + [_memory_cell(run), _slo_cell(run), verdict(run)]
        rows.append(row)
    align = ["left"] * (len(param_keys) + 1) + ["right"] * (len(headers) - len(param_keys) - 3) + ["left"] * 2
    env = doc["environment"]
    title = (
        f"{scenario['name']} ({kind}) — {scenario.get('description', '')}".rstrip(" —")
        + f"\n  {doc['source']} · git {(env.get('git_sha') or 'unknown')[:10]}"
        + (" (dirty)" if env.get("git_dirty") else "")
    )
    tablefmt = "github" if fmt == "markdown" else "simple"
    table = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True, colalign=align)
    notes = [f"  {run['params']}: {run['status']}: {run['error']}" for run in doc["runs"] if run.get("error")]
    if fmt == "markdown":
        return "\n".join([f"### {title.splitlines()[0]}", "", title.splitlines()[1].strip(), "", table, *notes])
    return "\n".join([title, table, *notes])
