"""Result files: atomic JSON writing, reading with validation, and tables rendered from JSON.

One file per scenario, schema ``moebench.result/1`` (documented in ``docs/results.md``). Tables
are always rendered from the saved JSON, never the other way round, so ``moebench report``
prints exactly what ``moebench run`` printed: a file records its kind's columns (``columns``), so
rendering needs neither the kind's code nor torch.
"""

from __future__ import annotations

import json
import math
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import tabulate as tabulate_module
from tabulate import tabulate

from moebench import REPO, atomic
from moebench.measure import host
from moebench.report import fault_table
from moebench.text import clip

SCHEMA = "moebench.result/1"
STATS = ("median", "p90", "p99", "min", "max", "n")
__all__ = ["REPO", "SCHEMA", "STATS"]  # REPO re-exported: the checkout (moebench/__init__.py)


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
    """Write JSON atomically (``moebench.atomic``: the umask applies, a crash leaves the old file)."""

    def fill(f) -> None:
        json.dump(json_safe(doc), f, indent=1, allow_nan=False)
        f.write("\n")

    atomic.write(path, fill)


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
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        reason = "nested too deeply" if isinstance(err, RecursionError) else err
        raise ValueError(f"{path}: not a readable result file: {reason}") from None
    return doc if is_pytest_benchmark(doc) else read(path)


def _malformed(doc: dict) -> str | None:
    """What is missing or mistyped in a result file's required structure; None when it is sound."""
    scenario = doc.get("scenario", {}).get("scenario") if isinstance(doc.get("scenario"), dict) else None
    if not isinstance(scenario, dict) or not all(isinstance(scenario.get(k), str) for k in ("name", "kind")):
        return "scenario.scenario needs a name and a kind (strings)"
    env = doc.get("environment")
    gpus = env.get("gpus") if isinstance(env, dict) else None
    if isinstance(env, dict) and not (_optional(env.get("git_sha"), str) and _optional(gpus, list)):
        return "environment.git_sha must be a string and environment.gpus a list"
    if gpus and not all(isinstance(gpu, str) for gpu in gpus):
        return "environment.gpus must be a list of strings"
    columns = doc.get("columns", [])
    if not isinstance(columns, list) or not all(_is_column(c) for c in columns):
        return "columns must be a list of [metric, header, scale, format]"
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
        details = run.get("details")
        if not _optional(details, dict):
            return f"runs[{i}].details = {clip(json.dumps(details))} is invalid: accepted a table or null"
        fault = (details or {}).get("fault")
        problem = None if fault is None else fault_table.malformed(fault)
        if problem:
            return f"runs[{i}].details.{problem}"
    return None


def _optional(value, kind: type) -> bool:
    return value is None or isinstance(value, kind)


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


def _is_column(column: object) -> bool:
    """One recorded column: [metric[:statistic], header with unit, scale, format] (statistic: median)."""
    if not isinstance(column, list) or len(column) != 4:
        return False
    key, header, scale, fmt = column
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    return isinstance(key, str) and isinstance(header, str) and number and isinstance(fmt, str) and _number_format(fmt)


def _number_format(fmt: str) -> bool:
    """A short format spec that formats a float: a width and precision of at most 2 digits, a
    thousands comma, and a float type (a type like "d" would fail on a float, a width of 10 digits
    would build gigabyte cells)."""
    return re.fullmatch(r"[<>^]?\d{0,2},?(\.\d{1,2})?[eEfFgG%]?", fmt) is not None


GENERIC_COLUMNS = {"energy": "J/token", "peak_mem": "peak mem (MiB)", "checks": "checks", "slo": "SLO"}


@dataclass(frozen=True)
class TableStyle:
    """How ``render`` lays out a table."""

    fmt: str = "plain"  # plain | markdown
    columns: tuple[str, ...] | None = None  # the value columns to show, in this order (None: the kind's own)
    width: int | None = None  # plain tables leave out columns until they fit (None: no limit)


@dataclass(frozen=True)
class _Column:
    key: str  # the name --columns uses
    header: str
    cells: list[str]
    align: str  # "left" | "right"


def check_columns(names: list[str], metrics: list[str]) -> tuple[str, ...]:
    """``names`` if every one is a column some table can show (a generic column, or one of ``metrics``
    with an optional ``:statistic``); else a ValueError naming the first that is not."""
    known = {*metrics, *GENERIC_COLUMNS}
    for name in names:
        metric, _, stat = name.partition(":")
        if name not in known and not (metric in known and metric not in GENERIC_COLUMNS and stat in STATS):
            raise ValueError(
                f"--columns {clip(repr(name))} is not a column: accepted {', '.join(GENERIC_COLUMNS)} or a metric name "
                f"(results/README.md), optionally with :{'|:'.join(STATS)}, e.g. step_time_s:p99"
            )
    return tuple(dict.fromkeys(names))


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


def _checks_cell(run: dict) -> str:
    """ok | FAIL: the failed checks' names | - (none, or the run did not finish)."""
    if run["status"] != "ok" or not run["checks"]:
        return "-"
    failed = [c["name"] for c in run["checks"] if not c["pass"]]
    return "FAIL: " + ", ".join(failed) if failed else "ok"


def _slo_cell(run: dict) -> str:
    gates = run.get("slo", [])
    judged = [s for s in gates if s["pass"] is not None]
    unjudged = f" ({len(gates) - len(judged)} not measured)" if len(judged) < len(gates) else ""
    if not judged:
        return "-" + unjudged if gates else "-"
    failed = [s.get("gate") or f"{s['op']}_{s['metric']}" for s in judged if not s["pass"]]
    return ("met" if not failed else "missed: " + ", ".join(failed)) + unjudged


def _metric_column(runs: list[dict], key: str, kind_columns: dict) -> _Column:
    """A metric's column: as the kind lays it out, else (``--columns``) its name, statistic and unit as recorded."""
    if key not in kind_columns:
        name, _, stat = key.partition(":")
        units = [run["metrics"][name].get("unit") for run in runs if name in run["metrics"]]
        header = " ".join([name, *([stat] if stat else []), *([f"({units[0]})"] if units and units[0] else [])])
        kind_columns = {key: (header, 1, ".4g")}
    header, scale, fmt = kind_columns[key]
    return _Column(key, header, [_cell(run, key, scale, fmt) for run in runs], "right")


def _identity_columns(runs: list[dict]) -> list[_Column]:
    """What tells the runs apart: the swept params, the world size (always: ``--world-size`` may have
    replaced a sweep) and the device."""
    keys = [k for k in dict.fromkeys(k for run in runs for k in run["params"]) if k != "world_size"]
    columns = [_Column(k, k, [str(run["params"].get(k, "")) for run in runs], "left") for k in keys]
    ranks = [str(run.get("world_size", run["params"].get("world_size", ""))) for run in runs]
    columns.append(_Column("ranks", "ranks", ranks, "right"))
    columns.append(_Column("device", "device", [f"{run['device']}/{run['backend']}" for run in runs], "left"))
    return columns


def _value_columns(doc: dict, chosen: tuple[str, ...] | None) -> tuple[list[_Column], list[str]]:
    """The value columns to show, and the order in which to leave them out when the table is too wide."""
    runs = doc["runs"]
    # the kind's columns as the file records them; a file from before they were recorded: one per metric
    kind_columns = {c: (h, scale, f) for c, h, scale, f in doc.get("columns", [])}
    generic = {
        "energy": [_telemetry_cell(run) for run in runs],
        "peak_mem": [_memory_cell(run) for run in runs],
        "checks": [_checks_cell(run) for run in runs],
        "slo": [_slo_cell(run) for run in runs],
    }
    measured = {name for run in runs for name in run["metrics"]}
    if chosen is None:  # a J/token column only with NVML, an SLO column only with gates
        shown = {"energy": any(c != "-" for c in generic["energy"]), "slo": any(run.get("slo") for run in runs)}
        # a metric no run measured (e.g. the overlap metrics without overlap_chunks) has no column
        kept = [k for k in kind_columns if not measured or k.partition(":")[0] in measured]
        if not kind_columns:  # a file that records no columns: each measured metric, in the runs' order
            kept = list(dict.fromkeys(name for run in runs for name in run["metrics"]))
        keys = [*kept, *(k for k in generic if shown.get(k, True))]
    else:
        keys = [k for k in chosen if k in generic or k in kind_columns or k.partition(":")[0] in measured]
    columns = [
        _Column(k, GENERIC_COLUMNS[k], generic[k], "left" if k in ("checks", "slo") else "right")
        if k in generic
        else _metric_column(runs, k, kind_columns)
        for k in keys
    ]
    metrics = [k for k in keys if k not in generic]
    return columns, ["peak_mem", "energy", *reversed(metrics[1:])]


def _tabulate(columns: list[_Column], fmt: str, wrap: bool = False) -> str:
    """The table; ``wrap`` puts each header's unit on a second line ("step p50 (ms)" -> "step p50" / "(ms)")."""
    rows = list(zip(*(c.cells for c in columns), strict=True))
    padding, tabulate_module.MIN_PADDING = tabulate_module.MIN_PADDING, 0  # no 2 blanks beside every header
    try:
        return tabulate(
            rows,
            headers=[c.header.replace(" (", "\n(") if wrap else c.header for c in columns],
            tablefmt="github" if fmt == "markdown" else "simple",
            disable_numparse=True,
            colalign=[c.align for c in columns],
        )
    finally:
        tabulate_module.MIN_PADDING = padding


def _fit(columns: list[_Column], drop_order: list[str], width: int | None, fmt: str) -> tuple[str, list[str]]:
    """The table at most ``width`` wide: first with the units under the headers, then leaving out the
    columns in ``drop_order`` one at a time; and the keys of the columns left out."""
    table = _tabulate(columns, fmt)
    if width is None or fmt == "markdown" or _width(table) <= width:
        return table, []
    dropped, drop_order = [], [k for k in drop_order if any(c.key == k for c in columns)]
    while True:
        table = _tabulate(columns, fmt, wrap=True)
        if not drop_order or _width(table) <= width:
            return table, dropped
        dropped.append(drop_order.pop(0))
        columns = [c for c in columns if c.key != dropped[-1]]


def _width(text: str) -> int:
    return max(map(len, text.splitlines()))


def _host_note(runs: list[dict]) -> list[str]:
    """One line when any run's host was busy (``host_busy``), with the first busy run's reason."""
    flagged = [run for run in runs if run.get("host_busy")]
    if not flagged:
        return []
    _, why = host.judge(flagged[0]["host"])
    where = "" if len(flagged) == len(runs) else f" in {len(flagged)} of {len(runs)} runs"
    return [f"host busy{where}: {why or 'flagged in the result file'}; timings are not comparable"]


def _columns(doc: dict, chosen: tuple[str, ...] | None) -> tuple[list[_Column], list[str]]:
    """Every column of a table (which run, values, verdict) and the order to leave values out in."""
    values, drop_order = _value_columns(doc, chosen)
    verdicts = _Column("verdict", "verdict", [verdict(run) for run in doc["runs"]], "left")
    return [*_identity_columns(doc["runs"]), *values, verdicts], drop_order


def table_cells(doc: dict, chosen: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    """The headers and cells of ``render``'s table, every column (no width limit): for other formats
    (the HTML page of ``moebench report --html``)."""
    columns, _ = _columns(doc, chosen)
    return [c.header for c in columns], [list(row) for row in zip(*(c.cells for c in columns), strict=True)]


def warnings(doc: dict) -> list[str]:
    """What a reader of the numbers must know first: a busy host, and each run that did not pass
    (its failed checks and missed SLO gates, or its error)."""
    notes = _host_note(doc["runs"])
    for run in doc["runs"]:
        where = str(run["params"]) if run["params"] else "the run"
        if run["status"] != "ok":
            notes.append(f"{where}: {run['status']}" + (f": {run['error']}" if run.get("error") else ""))
            continue
        failed = [
            f"check {c['name']} failed" + (f" ({c['detail']})" if c.get("detail") else "")
            for c in run["checks"]
            if not c["pass"]
        ]
        failed += [
            f"SLO {s.get('gate') or s['metric']} missed ({s['metric']} = {s.get('value')}, limit {s['limit']})"
            for s in run.get("slo", [])
            if s["pass"] is False
        ]
        notes += [f"{where}: {f}" for f in failed]
    return notes


def render(doc: dict, style: TableStyle | str = "plain") -> str:
    """The table of one result file: a title line, one row per run, then notes.

    Columns: the swept params, ranks and device (which run), the kind's metrics, J/token (with
    NVML), peak memory, the checks (ok | FAIL: names), the SLO gates (met | missed: gates), and
    the run's verdict. ``style`` (or just a format name) chooses the columns and the width.
    """
    style = TableStyle(style) if isinstance(style, str) else style
    runs = doc["runs"]
    columns, drop_order = _columns(doc, style.columns)
    table, dropped = _fit(columns, [] if style.columns else drop_order, style.width, style.fmt)
    scenario, env = doc["scenario"]["scenario"], doc["environment"]
    title = (
        f"{scenario['name']} ({scenario['kind']}) — {scenario.get('description', '')}".rstrip(" —")
        + f"\n  {doc['source']} · git {(env.get('git_sha') or 'unknown')[:10]}"
        + (" (dirty)" if env.get("git_dirty") else "")
    )
    notes = _host_note(runs)
    if dropped:
        notes.append(
            f"left out to fit {style.width} characters: {', '.join(dropped)} (--columns chooses; JSON has all)"
        )
    notes += [f"{run['params']}: {run['status']}: {run['error']}" for run in runs if run.get("error")]
    if style.width and style.fmt != "markdown":
        wrap = max(20, style.width - 2)
        notes = [line for note in notes for line in textwrap.wrap(note, wrap, subsequent_indent="  ")]
    notes = ["  " + note for note in notes]
    if style.fmt == "markdown":
        return "\n".join([f"### {title.splitlines()[0]}", "", title.splitlines()[1].strip(), "", table, *notes])
    return "\n".join([title, table, *notes])
