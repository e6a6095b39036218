"""Trend across several result sets: every metric's median per set, the newest set judged against the one before.

``moebench compare A B C ...`` (three or more result files or folders, oldest first) reads each set
with ``compare.load`` and prints, per scenario, one row per (run, metric) with each set's median in
its own column, then the verdict of the newest set against the one before it. That verdict is
``compare.compare(sets[-2], sets[-1])`` unchanged (same rules, thresholds and exit code), so a
trend never judges more leniently than the two-set command; older steps are shown, not judged, as
in asv's and pytest-benchmark's compare of several runs. Rows of that last comparison that are not
metrics (a run missing or failed, an environment that differs, a check that now fails) follow the
metric rows of their scenario.

``--plots DIR`` draws one PNG per trend row: the median per set, error bars over the spread of its
samples (p10–p90, nearest rank; min–max where a record stores no samples), x = the set labels in
the order given. matplotlib is imported only then (``pip install 'moebench[plots]'``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from moebench.metrics import nearest_rank
from moebench.regress import compare as C

SCHEMA = "moebench.regress.trend/1"
PLOTS_HINT = "--plots needs matplotlib: pip install 'moebench[plots]'"


@dataclass(frozen=True)
class ResultSet:
    """One result set of the trend: its column label, the path given, its runs."""

    label: str
    path: str
    runs: list[C.Run]


@dataclass(frozen=True)
class Spread:
    """The spread drawn as error bars around one set's median."""

    low: float
    high: float
    kind: str  # "p10-p90" (from the samples) or "min-max" (from the record's summary)


@dataclass(frozen=True)
class TrendRow:
    """One metric of one run across every set; the verdict is the newest set's against the one before."""

    scenario: str
    run: str
    metric: str
    unit: str
    medians: tuple[float | None, ...]  # per set, oldest first; None: not in that set (or NaN)
    spreads: tuple[Spread | None, ...]  # per set, as medians
    verdict: str = "-"  # "-": not judged (the metric is not in both of the newest two sets' matched runs)
    ratio: float | None = None  # newest median / previous median, as compare's
    p: float | None = None
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.verdict in C.REGRESSIONS


# -------------------------------------------------------------------------------------------
# Reading and judging


def set_labels(paths: list[str]) -> list[str]:
    """Column labels: each path's folder (or file) name; the paths as given when names repeat."""
    names = [Path(p).resolve().name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    given = [str(p) for p in paths]
    return given if len(set(given)) == len(given) else [f"{p}#{i + 1}" for i, p in enumerate(given)]


def load_sets(paths: list[str]) -> list[ResultSet]:
    """Every set's runs, read as ``compare.load`` reads one side."""
    return [ResultSet(label, str(p), C.load([p])) for label, p in zip(set_labels(paths), paths, strict=True)]


def spread(record: dict) -> Spread | None:
    """p10–p90 of the samples (nearest rank) when there are two or more, else the record's min–max."""
    samples = [s for s in record.get("samples") or [] if isinstance(s, (int, float)) and math.isfinite(s)]
    if len(samples) >= 2:
        return Spread(nearest_rank(samples, 10), nearest_rank(samples, 90), "p10-p90")
    low, high = record.get("min"), record.get("max")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return Spread(float(low), float(high), "min-max")
    return None


def _metric_keys(sets: list[ResultSet]) -> dict[tuple[str, str, str], str]:
    """(scenario, run label, metric) -> unit, in order of first appearance, oldest set first."""
    keys: dict[tuple[str, str, str], str] = {}
    for rs in sets:
        for run in rs.runs:
            for name, record in run.metrics.items():
                keys.setdefault((run.scenario, run.label, name), record["unit"])
    return keys


def trend(sets: list[ResultSet], settings: C.Settings) -> tuple[list[TrendRow], list[C.Row]]:
    """(trend rows, the rows of ``compare`` of the newest set against the one before).

    1. compare the newest two sets; 2. collect every (scenario, run, metric) any set has;
    3. per key, each set's median and spread; 4. the key's verdict from step 1's row, if any.
    """
    if len(sets) < 2:
        raise ValueError("a trend needs at least two result sets")
    last = C.compare(sets[-2].runs, sets[-1].runs, settings)
    judged = {(r.scenario, r.run, r.metric): r for r in last}
    by_set = [{(run.scenario, run.label): run for run in rs.runs} for rs in sets]
    rows = []
    for (scenario, run, metric), unit in _metric_keys(sets).items():
        matched = [runs.get((scenario, run)) for runs in by_set]
        found = [None if r is None else r.metrics.get(metric) for r in matched]
        medians = tuple(None if m is None else m.get("median") for m in found)
        spreads = tuple(None if m is None or m.get("median") is None else spread(m) for m in found)
        row = judged.get((scenario, run, metric))
        verdict = {"verdict": row.verdict, "ratio": row.ratio, "p": row.p, "note": row.note} if row else {}
        rows.append(TrendRow(scenario, run, metric, unit, medians, spreads, **verdict))
    return rows, last


def other_rows(rows: list[TrendRow], last: list[C.Row]) -> list[C.Row]:
    """Rows of the last comparison that are not metric rows of the trend and say more than "same"."""
    metrics = {(r.scenario, r.run, r.metric) for r in rows}
    return [r for r in last if (r.scenario, r.run, r.metric) not in metrics and r.verdict != "same"]


def regressed(last: list[C.Row]) -> bool:
    """The exit-code rule: the newest set regresses against the one before (as the two-set command says)."""
    return any(row.regression for row in last)


# -------------------------------------------------------------------------------------------
# Output


def _median(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _cells(row: TrendRow) -> list[str]:
    ratio = "-" if row.ratio is None else ("inf" if math.isinf(row.ratio) else f"{row.ratio:.3f}")
    verdict = row.verdict.upper() if row.regression else row.verdict
    return [row.run, row.metric, row.unit, *map(_median, row.medians), ratio, verdict, row.note]


def _other_cells(row: C.Row, n_sets: int) -> list[str]:
    """A non-metric row of the last comparison: its two sides go in the newest two columns."""
    sides = ["" for _ in range(n_sets)]
    sides[-2:] = ["" if row.base is None else str(row.base), "" if row.new is None else str(row.new)]
    verdict = row.verdict.upper() if row.regression else row.verdict
    return [row.run, row.metric, "", *sides, "-", verdict, row.note]


def headers(labels: list[str]) -> list[str]:
    return ["run", "metric", "unit", *labels, "ratio (last/prev)", "verdict (last vs prev)", "note"]


def tables(rows: list[TrendRow], last: list[C.Row], labels: list[str], fmt: str = "plain") -> list[tuple[str, str]]:
    """(scenario, table) per scenario, metric rows first, then the last comparison's other rows."""
    from tabulate import tabulate

    extra = other_rows(rows, last)
    out = []
    for scenario in dict.fromkeys([r.scenario for r in rows] + [r.scenario for r in extra]):
        cells = [_cells(r) for r in rows if r.scenario == scenario]
        cells += [_other_cells(r, len(labels)) for r in extra if r.scenario == scenario]
        table = tabulate(
            cells, headers=headers(labels), tablefmt="github" if fmt == "markdown" else "simple", disable_numparse=True
        )
        out.append((scenario, table))
    return out


def last_step_lines(sets: list[ResultSet], last: list[C.Row]) -> list[str]:
    """What the verdict column means, the last comparison's summary, and its notes (busy host, stale baseline)."""
    prev, new = sets[-2], sets[-1]
    lines = [f"verdicts: {new.label} against {prev.label} (as `moebench compare {prev.path} {new.path}`)"]
    lines.append(f"{new.label} vs {prev.label}: {C.summary(last)}")
    notes = C.host_lines(last) + [n["text"] for n in C.stale_notes(last)]
    lines += [f"  {text} (BASELINE = {prev.label}, NEW = {new.label})" for text in notes]
    return lines


def render(sets: list[ResultSet], rows: list[TrendRow], last: list[C.Row], fmt: str = "plain") -> str:
    """The trend tables, one per scenario, then the newest step's verdict."""
    labels = [rs.label for rs in sets]
    markdown = fmt == "markdown"
    parts = [f"### {s}\n\n{t}" if markdown else f"{s}\n{t}" for s, t in tables(rows, last, labels, fmt)]
    tail = last_step_lines(sets, last)
    parts.append("\n".join(f"- {line.strip()}" if markdown else line for line in tail))
    return "\n\n".join(parts)


def origin_lines(sets: list[ResultSet]) -> list[str]:
    """Where each set came from (git, torch, test knobs): one line per set and distinct origin."""
    lines = []
    for rs in sets:
        origins = {json.dumps(r.software, sort_keys=True): r.software for r in rs.runs if r.software}
        lines += [f"{rs.label}: {C.software_line(soft)}" for soft in origins.values()]
    return lines


def markdown_report(sets: list[ResultSet], rows: list[TrendRow], last: list[C.Row]) -> str:
    head = "REGRESSION" if regressed(last) else "no regression"
    chain = " → ".join(f"`{rs.path}`" for rs in sets)
    return f"## moebench compare (trend): {head}\n\n{chain}\n\n" + render(sets, rows, last, "markdown") + "\n"


def to_json(sets: list[ResultSet], rows: list[TrendRow], last: list[C.Row]) -> dict:
    trend_rows = [
        {**asdict(r), "spreads": [None if s is None else asdict(s) for s in r.spreads], "regression": r.regression}
        for r in rows
    ]
    return {
        "schema": SCHEMA,
        "sets": [{"label": rs.label, "path": rs.path} for rs in sets],
        "regressions": sum(row.regression for row in last),
        "rows": trend_rows,
        "last": C.to_json(last, sets[-2].path, sets[-1].path),
    }


# -------------------------------------------------------------------------------------------
# Plots


@dataclass(frozen=True)
class PlotSeries:
    """What one PNG shows: a trend row's medians and spreads over the sets, in order."""

    file: str  # file name under the plot folder
    title: str
    ylabel: str
    labels: tuple[str, ...]
    medians: tuple[float | None, ...]
    lows: tuple[float | None, ...]  # bottom of each error bar; None: no bar
    highs: tuple[float | None, ...]
    spread_kinds: tuple[str, ...]  # the distinct kinds of spread drawn


def _file_name(row: TrendRow) -> str:
    parts = [row.scenario, *([row.run] if row.run != "-" else []), row.metric]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "__".join(parts)) + ".png"


def plot_series(rows: list[TrendRow], labels: list[str]) -> list[PlotSeries]:
    """One series per trend row that has a median in at least one set."""
    out = []
    for r in rows:
        if all(m is None for m in r.medians):
            continue
        lows = tuple(None if s is None else s.low for s in r.spreads)
        highs = tuple(None if s is None else s.high for s in r.spreads)
        kinds = tuple(sorted({s.kind for s in r.spreads if s is not None}))
        title = f"{r.scenario}{f' [{r.run}]' if r.run != '-' else ''}: {r.metric}"
        ylabel = f"{r.metric} ({r.unit})" if r.unit else r.metric
        out.append(PlotSeries(_file_name(r), title, ylabel, tuple(labels), r.medians, lows, highs, kinds))
    return out


def require_matplotlib() -> None:
    """Fail in one line, before any work, when --plots cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(PLOTS_HINT) from None


def write_plots(series: list[PlotSeries], folder: Path) -> list[Path]:
    """One PNG per series under ``folder`` (made if missing), drawn on matplotlib's Agg canvas."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--plots {folder}: cannot write plots there: {err.strerror}") from None
    written = []
    for s in series:
        nan = float("nan")
        x = list(range(len(s.labels)))
        y = [nan if m is None else m for m in s.medians]
        below = [0.0 if m is None or lo is None else m - lo for m, lo in zip(s.medians, s.lows, strict=True)]
        above = [0.0 if m is None or hi is None else hi - m for m, hi in zip(s.medians, s.highs, strict=True)]
        fig = Figure(figsize=(max(4.0, 1.2 * len(x) + 2), 3.5), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        bars = f"bars: {' or '.join(s.spread_kinds)}" if s.spread_kinds else "no spread stored"
        ax.errorbar(x, y, yerr=[below, above], fmt="o-", capsize=4, label=f"median ({bars})")
        ax.set_xticks(x, s.labels, rotation=20, ha="right")
        ax.set_title(s.title, fontsize=10)
        ax.set_ylabel(s.ylabel)
        ax.legend(fontsize=8)
        path = folder / s.file
        try:
            fig.savefig(path, dpi=100)
        except OSError as err:
            raise ValueError(f"--plots {path}: cannot write: {err.strerror}") from None
        written.append(path)
    return written
