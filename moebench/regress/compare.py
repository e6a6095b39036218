"""Regression comparison: match the runs of two sets of results and judge every metric.

``compare(baseline, new, settings)`` takes result files (``moebench.result/1``) or pytest-benchmark
JSON files (``--benchmark-json``), or folders of them, and returns one ``Row`` per judged item.
The rules (documented in ``docs/results.md``, "Comparing results"):

1. Runs are matched by scenario name and params. Each run's environment class (hardware, world
   size, backend, dtype) must agree; when it does not, the run is reported and not compared
   (``--allow-env-mismatch`` compares it anyway, marked).
2. Sampled metrics (times, rates, within-run ratios) are judged from their raw samples: a
   two-sided Mann–Whitney U test (scipy) must give p < alpha AND the medians must differ by at
   least the metric's minimum effect t (new/base ≥ 1 + t, or ≤ 1 / (1 + t)). Both: slower or
   faster. A large change that is not significant: noisy. Otherwise: same.
3. Exact metrics (token counts, numerical errors, load statistics: deterministic for a seed) have
   no test: worse or better when the median moves by at least their tolerance t, else same.
4. A metric, run or scenario of BASELINE missing from NEW is a regression, as is a run that now
   fails or a check that now fails. Metrics and runs only in NEW are reported as new.
5. With ``--confirm N`` (``moebench/regress/confirm.py``), N fresh reruns of a ``slower`` row's scenario
   judge it: one that measures the metric and does not read ``slower`` makes it ``unconfirmed``
   (not a regression); one that cannot judge it (failed, another environment) keeps it.
6. Two notes, never failures: a run of either side that ran on a busy host (``host_busy``) gets a
   ``host`` row, and a line per side names them; a scenario with a metric that reads faster (or
   better) gets "baseline may be stale", with the largest regression that would now read same.

Minimum effect, most specific first: ``--min-effect METRIC=T``, the scenario's ``[compare]
METRIC``, ``BUILTIN_MIN_EFFECT``, ``--min-effect T``, the scenario's ``[compare] min_effect``,
then 5 %. Alpha: ``--alpha``, the scenario's ``[compare] alpha``, then 0.01. The scenario's
section is BASELINE's (committed with the baseline, so a change cannot loosen its own gate), or
NEW's when BASELINE's file has no [compare] section at all.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from moebench.metrics import SIGNED, is_finite_number
from moebench.report import results
from moebench.text import clip

DEFAULT_ALPHA = 0.01
DEFAULT_MIN_EFFECT = 0.05
# Errors against fp64 move with reduction order (thread count, kernel choice): allow them to double.
BUILTIN_MIN_EFFECT = {"rel_error_forward": 1.0, "rel_error_grad": 1.0}
REGRESSIONS = ("slower", "worse", "missing", "failed", "fails now", "env differs")
# verdicts of a metric with a minimum effect
JUDGED = ("same", "noisy", "slower", "faster", "worse", "better", "unconfirmed")


@dataclass(frozen=True)
class Settings:
    """What the command line sets; None defers to the scenario's [compare] section, then defaults."""

    alpha: float | None = None
    min_effect: float | None = None
    per_metric: dict = field(default_factory=dict)  # metric name -> minimum effect
    allow_env_mismatch: bool = False


@dataclass(frozen=True)
class Run:
    """One run of one side, in the form both result formats reduce to."""

    scenario: str
    params: dict
    env: dict  # the environment class: hardware, world_size, backend, dtype
    status: str
    error: str | None
    metrics: dict  # name -> metric record (unit, better, exact, samples, median, ...)
    checks: dict  # name -> passed
    thresholds: dict | None  # the scenario's [compare] section; None when the file has none
    source: str
    software: dict = field(default_factory=dict)  # git sha, dirty flag, torch, test knobs of the file
    host_busy: bool | None = None  # the run's host was busier than its cores; None: not recorded
    host: dict | None = None  # the run's host record (load average before and after, cores, threads)

    @property
    def key(self) -> tuple[str, str]:
        return self.scenario, json.dumps(self.params, sort_keys=True)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "-"


@dataclass(frozen=True)
class Row:
    """One judged item: a metric, a check, a run's status or environment."""

    scenario: str
    run: str
    metric: str
    unit: str = ""
    base: float | str | None = None
    new: float | str | None = None
    ratio: float | None = None  # new median / baseline median
    p: float | None = None  # Mann–Whitney U two-sided p-value; None for exact metrics
    min_effect: float | None = None
    verdict: str = "same"
    note: str = ""

    @property
    def regression(self) -> bool:
        return self.verdict in REGRESSIONS


# -------------------------------------------------------------------------------------------
# Reading both formats


def env_class(env: dict, run: dict) -> dict:
    """The environment class of one run of a moebench result file."""
    if run.get("device") == "cuda" and env.get("gpus"):
        hardware = env["gpus"][0]
    else:
        hardware = f"cpu ({env.get('cpu_count')} cores)"
    dtype = (run.get("config") or {}).get("model", {}).get("dtype", "-")
    return {"hardware": hardware, "world_size": run.get("world_size"), "backend": run["backend"], "dtype": dtype}


def _check_thresholds(path: Path, thresholds: object) -> None:
    """The file's ``[compare]`` section, as the scenario loader accepts it: alpha in (0, 1), fractions 0 to 100."""
    if thresholds is None:
        return
    if not isinstance(thresholds, dict):
        raise ValueError(f"{path}: scenario.compare = {clip(json.dumps(thresholds))} is invalid: accepted a table")
    for key, value in thresholds.items():
        if key == "alpha" and not (is_finite_number(value) and 0 < value < 1):
            raise ValueError(
                f"{path}: [compare] alpha = {clip(json.dumps(value))} is invalid: accepted a number in (0, 1)"
            )
        if key != "alpha" and not (is_finite_number(value) and 0 <= value <= 100):
            raise ValueError(
                f"{path}: [compare] {clip(key)} = {clip(json.dumps(value))} is invalid: accepted a fraction from 0 to "
                "100 (0.05 = 5 %)"
            )


def _check_values(where: str, name: str, m: dict) -> None:
    """A metric's summary and samples are finite numbers (null: a NaN moebench wrote; never NaN, inf or text),
    and a time is not negative (but ``metrics.SIGNED``: a difference of times)."""
    timed = m["unit"] == "s" and name not in SIGNED
    accepted = "a finite number >= 0 (a time) or null" if timed else "a finite number or null"
    values = [(k, m.get(k)) for k in ("median", "p90", "p99", "min", "max")]
    values += [(f"samples[{i}]", v) for i, v in enumerate(m.get("samples") or [])]
    for key, value in values:
        if value is not None and not (is_finite_number(value) and (value >= 0 or not timed)):
            raise ValueError(f"{where}.{key} = {clip(json.dumps(value))} is invalid: accepted {accepted}")


def check_records(path: Path, doc: dict) -> None:
    """What ``results.read`` does not check but comparing needs: directions, finite values, samples, checks,
    thresholds. ``moebench baseline update`` refuses the same, so a baseline is one ``compare`` reads."""
    _check_thresholds(path, doc["scenario"].get("compare"))
    for i, run in enumerate(doc["runs"]):
        for name, m in run["metrics"].items():
            if m.get("better") not in ("higher", "lower") or not isinstance(m.get("unit"), str):
                raise ValueError(f"{path}: runs[{i}].metrics.{name} needs a unit and better = 'higher' or 'lower'")
            if not isinstance(m.get("samples", []), list):
                raise ValueError(f"{path}: runs[{i}].metrics.{name}.samples must be a list")
            _check_values(f"{path}: runs[{i}].metrics.{name}", name, m)
        for check in run["checks"]:
            if not (isinstance(check, dict) and isinstance(check.get("name"), str) and "pass" in check):
                raise ValueError(f"{path}: runs[{i}].checks entries need a name and pass")
        busy, host = run.get("host_busy"), run.get("host")
        if not (busy in (True, False, None) and isinstance(host, (dict, type(None)))):
            raise ValueError(f"{path}: runs[{i}] needs host_busy true, false or null, and host a table or null")


def _moebench_runs(path: Path, doc: dict) -> list[Run]:
    check_records(path, doc)
    scenario = doc["scenario"]
    thresholds = scenario.get("compare")
    return [
        Run(
            scenario=scenario["scenario"]["name"],
            params=run["params"],
            env=env_class(doc["environment"], run),
            status=run["status"],
            error=run.get("error"),
            metrics=run["metrics"],
            checks={c["name"]: bool(c["pass"]) for c in run["checks"]},
            thresholds=thresholds,
            source=str(path),
            software=_software(doc),
            host_busy=run.get("host_busy"),
            host=run.get("host"),
        )
        for run in doc["runs"]
    ]


def _pytest_benchmark_runs(path: Path, doc: dict) -> list[Run]:
    """pytest-benchmark JSON: one run per benchmark, one sampled metric ``time_s`` (per round)."""
    cpu = (doc.get("machine_info") or {}).get("cpu") or {}
    env = {"hardware": f"cpu ({cpu.get('count')} cores)", "world_size": 1, "backend": "-", "dtype": "-"}
    runs = []
    for i, bench in enumerate(doc["benchmarks"]):
        stats = bench.get("stats") if isinstance(bench, dict) else None
        if not isinstance(stats, dict) or not isinstance(bench.get("fullname"), str):
            raise ValueError(f"{path}: benchmarks[{i}] needs a fullname and stats (pytest-benchmark JSON)")
        data = stats.get("data") or []
        if not isinstance(data, list):
            raise ValueError(f"{path}: benchmarks[{i}].stats.data must be a list (pytest-benchmark JSON)")
        if not data and not isinstance(stats.get("median"), (int, float)):
            raise ValueError(f"{path}: benchmarks[{i}].stats needs data or a median (pytest-benchmark JSON)")
        summary = {k: stats.get(k) for k in ("median", "min", "max")}
        time_s = {"unit": "s", "better": "lower", "exact": False, "samples": data, "n": stats.get("rounds"), **summary}
        _check_values(f"{path}: benchmarks[{i}].stats", "time_s", time_s)
        module, _, test = bench["fullname"].partition("::")
        runs.append(
            Run(module, {"test": test or bench["name"]}, env, "ok", None, {"time_s": time_s}, {}, None, str(path))
        )
    return runs


def runs_of(path: Path, doc: dict) -> list[Run]:
    """The runs of one read file (``results.read_any``), in either format, its records checked."""
    return _pytest_benchmark_runs(path, doc) if results.is_pytest_benchmark(doc) else _moebench_runs(path, doc)


def refuse_duplicates(runs: list[Run]) -> None:
    """A run (scenario and params) may be in one file of a side, once: which would be compared is unclear."""
    seen = {}
    for run in runs:
        if run.key in seen:
            where = "twice in that file" if seen[run.key] == run.source else f"also in {seen[run.key]}"
            raise ValueError(f"{run.source}: run {run.scenario} [{clip(run.label)}] is {where}: accepted each run once")
        seen[run.key] = run.source


def load(paths: list[str | Path]) -> list[Run]:
    """Every run in the files and folders named, in either format."""
    runs = [run for path in results.find(paths) for run in runs_of(path, results.read_any(path))]
    refuse_duplicates(runs)
    return runs


# -------------------------------------------------------------------------------------------
# Judging


def mann_whitney_p(base, new) -> float:
    """Two-sided Mann–Whitney U p-value; 1.0 when every sample on both sides is the same value."""
    a, b = np.asarray(base, dtype=np.float64), np.asarray(new, dtype=np.float64)
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p a Mann–Whitney U test of n1 and n2 samples can give: 2 / C(n1+n2, n1)."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def effect(ratio: float) -> float:
    """Relative size of a change, the same for ×(1+t) and ÷(1+t): max(r, 1/r) − 1."""
    if ratio == 0 or math.isinf(ratio):
        return math.inf
    return max(ratio, 1 / ratio) - 1


def _ratio(base: float, new: float) -> float:
    if base == 0:
        return 1.0 if new == 0 else math.inf
    return new / base


def min_effect_for(metric: str, scenario: dict, settings: Settings) -> float:
    """The metric's minimum effect, most specific setting first (see the module docstring)."""
    for value in (
        settings.per_metric.get(metric),
        scenario.get(metric),
        BUILTIN_MIN_EFFECT.get(metric),
        settings.min_effect,
        scenario.get("min_effect"),
    ):
        if value is not None:
            return float(value)
    return DEFAULT_MIN_EFFECT


def judge_metric(
    name: str, base: dict, new: dict, min_effect: float, alpha: float
) -> tuple[str, float, float | None, str]:
    """(verdict, ratio, p, note) for one metric present on both sides with a median each."""
    ratio = _ratio(base["median"], new["median"])
    worse = ratio > 1 if base["better"] == "lower" else ratio < 1
    big = ratio != 1 and effect(ratio) >= min_effect
    if base.get("exact"):
        return ("worse" if worse else "better") if big else "same", ratio, None, ""
    words = ("slower", "faster")
    # a null sample is a NaN the run wrote (e.g. an efficiency over a zero time): not part of the test
    a, b = ([v for v in m.get("samples") or [] if v is not None] for m in (base, new))
    if len(a) < 2 or len(b) < 2:  # e.g. pytest-benchmark summaries without data: threshold only
        verdict = (words[0] if worse else words[1]) if big else "same"
        return verdict, ratio, None, "no raw samples: judged on the medians alone"
    p = mann_whitney_p(a, b)
    note = ""
    if smallest_p(len(a), len(b)) >= alpha:
        note = f"{len(a)} vs {len(b)} samples cannot reach p < {alpha:g}"
    if big and p < alpha:
        return (words[0] if worse else words[1]), ratio, p, note
    return ("noisy" if big else "same"), ratio, p, note


def _metric_rows(base: Run, new: Run, settings: Settings) -> list[Row]:
    rows = []
    scenario = base.thresholds if base.thresholds is not None else (new.thresholds or {})
    alpha = settings.alpha if settings.alpha is not None else scenario.get("alpha", DEFAULT_ALPHA)
    for name, b in base.metrics.items():
        row = {"scenario": base.scenario, "run": base.label, "metric": name, "unit": b["unit"], "base": b["median"]}
        n = new.metrics.get(name)
        if n is None:
            rows.append(Row(**row, verdict="missing", note="metric not in NEW"))
            continue
        row["new"] = n["median"]
        if b["median"] is None or n["median"] is None:
            if b["median"] is None and n["median"] is None:
                verdict = "same"
            else:
                verdict = "missing" if n["median"] is None else "new"
            rows.append(Row(**row, verdict=verdict, note="no value (NaN)"))
            continue
        t = min_effect_for(name, scenario, settings)
        verdict, ratio, p, note = judge_metric(name, b, n, t, float(alpha))
        rows.append(Row(**row, ratio=ratio, p=p, min_effect=t, verdict=verdict, note=note))
    for name in new.metrics.keys() - base.metrics.keys():
        m = new.metrics[name]
        rows.append(Row(new.scenario, new.label, name, m["unit"], None, m["median"], verdict="new"))
    return rows


def _check_rows(base: Run, new: Run) -> list[Row]:
    rows = []
    show = {True: "pass", False: "fail", None: None}
    for name in {**base.checks, **new.checks}:
        b, n = base.checks.get(name), new.checks.get(name)
        if n is None:
            verdict = "missing"
        elif b is None:
            verdict = "new"
        else:
            verdict = {(True, False): "fails now", (False, True): "passes now"}.get((b, n), "same")
        rows.append(Row(base.scenario, base.label, f"check {name}", "", show[b], show[n], verdict=verdict))
    return rows


def _host_rows(base: Run, new: Run) -> list[Row]:
    """A ``host`` row when either side's run ran on a busy host: its timings are not to be trusted."""
    if not (base.host_busy or new.host_busy):
        return []
    sides = (("BASELINE", base), ("NEW", new))
    note = "; ".join(f"{side}: {host_summary(run.host)}" for side, run in sides if run.host_busy)
    state = {True: "busy", False: "quiet", None: "unknown"}
    head = {"scenario": base.scenario, "run": base.label, "metric": "host", "verdict": "busy host", "note": note}
    return [Row(**head, base=state[base.host_busy], new=state[new.host_busy])]


def host_summary(host: dict | None) -> str:
    """A run's host record in words: 1-minute load average before and after, cores, ranks × threads."""
    host = host or {}

    def load(key: str) -> str:
        value = host.get(key)
        ok = isinstance(value, list) and value and isinstance(value[0], (int, float))
        return f"{value[0]:.1f}" if ok else "?"

    text = (
        f"load {load('load_avg_before')} before, {load('load_avg_after')} after on {host.get('cpu_count', '?')} cores"
    )
    if isinstance(host.get("other_cpu_cores"), (int, float)):
        text += f", others used {host['other_cpu_cores']:.1f} cores"
    ranks, threads = host.get("ranks"), host.get("threads_per_rank")
    if ranks and threads:
        text += f", {ranks} rank{'s' * (ranks != 1)} × {threads} thread{'s' * (threads != 1)}"
    return text


def _env_note(base: dict, new: dict) -> str:
    return "; ".join(f"{k} {base.get(k)} -> {new.get(k)}" for k in base if base.get(k) != new.get(k))


def compare_run(base: Run, new: Run, settings: Settings) -> list[Row]:
    """Every row of one matched run: its status, environment, metrics and checks."""
    head = {"scenario": base.scenario, "run": base.label}
    if new.status != "ok" or base.status != "ok":
        if base.status == "ok" and new.status == "error":
            return [Row(**head, metric="run", base="ok", new="error", verdict="failed", note=new.error or "")]
        if base.status == "ok" and new.status == "skipped":
            return [Row(**head, metric="run", base="ok", new="skipped", verdict="missing", note=new.error or "")]
        if base.status == "ok" or new.status == "ok":
            note = "the baseline run did not finish" if new.status == "ok" else f"NEW run {new.status}"
            return [Row(**head, metric="run", base=base.status, new=new.status, verdict="not compared", note=note)]
        return [Row(**head, metric="run", base=base.status, new=new.status, verdict="same", note="neither finished")]
    rows = []
    if base.env != new.env:
        note = _env_note(base.env, new.env)
        if not settings.allow_env_mismatch:
            return [Row(**head, metric="environment", verdict="env differs", note=note + " (not compared)")]
        rows.append(Row(**head, metric="environment", verdict="compared anyway", note=note))
    return rows + _host_rows(base, new) + _metric_rows(base, new, settings) + _check_rows(base, new)


def compare(baseline: list[Run], new: list[Run], settings: Settings) -> list[Row]:
    """Rows for every run of ``baseline`` (matched or missing) and every run only in ``new``."""
    by_key = {run.key: run for run in new}
    rows = []
    for base in baseline:
        match = by_key.pop(base.key, None)
        if match is None:
            rows.append(Row(base.scenario, base.label, "run", verdict="missing", note="run not in NEW"))
        else:
            rows.extend(compare_run(base, match, settings))
    rows.extend(
        Row(run.scenario, run.label, "run", verdict="new", note="run not in BASELINE") for run in by_key.values()
    )
    return rows


# -------------------------------------------------------------------------------------------
# Notes: a stale baseline, a busy host


def hidden_regression(ratio: float, min_effect: float) -> float:
    """The largest regression of NEW that would still read same, when NEW beats BASELINE by ``ratio``.

    NEW is 1 + e better (e = effect(ratio)); a change reads slower only past 1 + t beyond the
    baseline, so from NEW's level a regression up to (1 + e)(1 + t) − 1 reads same.
    """
    return (1 + effect(ratio)) * (1 + min_effect) - 1


def stale_notes(rows: list[Row]) -> list[dict]:
    """Per scenario where a gated metric reads faster (or better): "baseline may be stale"."""
    notes = []
    for scenario in dict.fromkeys(row.scenario for row in rows):
        gated = [r for r in rows if r.scenario == scenario and r.verdict in JUDGED and r.ratio is not None]
        several = len({r.run for r in gated}) > 1
        ahead = [r for r in gated if r.verdict in ("faster", "better")]
        if not ahead:
            continue
        metrics, parts = [], []
        for r in ahead:
            hidden = hidden_regression(r.ratio, r.min_effect)
            metrics.append({"run": r.run, "metric": r.metric, "ratio": r.ratio, "hidden_regression": hidden})
            parts.append(f"{_percent(hidden)} in {r.metric}{f' [{r.run}]' if several else ''} (ratio {r.ratio:.3f})")
        words = " or ".join(sorted({r.verdict for r in ahead}, reverse=True))  # faster, better
        text = (
            f"baseline may be stale: {len(ahead)} of {len(gated)} gated metrics read {words}; "
            f"a regression would read same up to {', '.join(parts)}"
        )
        notes.append(
            {"scenario": scenario, "faster": len(ahead), "gated": len(gated), "metrics": metrics, "text": text}
        )
    return notes


def _percent(fraction: float) -> str:
    return "any size" if math.isinf(fraction) else f"+{fraction * 100:.0f} %"


def host_lines(rows: list[Row]) -> list[str]:
    """One line per side with runs on a busy host, naming their scenarios and runs."""
    lines = []
    for side, attr in (("BASELINE", "base"), ("NEW", "new")):
        where = [
            row.scenario + (f" [{row.run}]" if row.run != "-" else "")
            for row in rows
            if row.metric == "host" and getattr(row, attr) == "busy"
        ]
        if where:
            lines.append(f"{side} ran on a busy host in {', '.join(where)}: its timings there are not trustworthy")
    return lines


# -------------------------------------------------------------------------------------------
# Output


def summary(rows: list[Row]) -> str:
    counts = {}
    for row in rows:
        counts[row.verdict] = counts.get(row.verdict, 0) + 1
    regressions = sum(row.regression for row in rows)
    detail = ", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    head = f"{regressions} regression{'s' * (regressions != 1)}" if regressions else "no regression"
    return f"{head} ({detail})"


def _number(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}" + (f" {unit}" if unit else "")


def _cells(row: Row) -> list[str]:
    ratio = "-" if row.ratio is None else ("inf" if math.isinf(row.ratio) else f"{row.ratio:.3f}")
    p = "-" if row.p is None else f"{row.p:.1e}"
    t = "-" if row.min_effect is None else f"{row.min_effect * 100:g}%"
    verdict = row.verdict.upper() if row.regression else row.verdict
    return [
        row.run,
        row.metric,
        _number(row.base, row.unit),
        _number(row.new, row.unit),
        ratio,
        p,
        t,
        verdict,
        row.note,
    ]


HEADERS = ["run", "metric", "baseline", "new", "ratio", "p (MWU)", "min effect", "verdict", "note"]


def render(rows: list[Row], fmt: str = "plain") -> str:
    """The busy-host lines, one table per scenario (``fmt`` "plain" or "markdown") with its stale-baseline
    note, then the summary line."""
    from tabulate import tabulate

    markdown = fmt == "markdown"
    busy = host_lines(rows)
    parts = ["\n".join(f"- {line}" if markdown else line for line in busy)] if busy else []
    stale = {note["scenario"]: note["text"] for note in stale_notes(rows)}
    for scenario in dict.fromkeys(row.scenario for row in rows):
        mine = [row for row in rows if row.scenario == scenario]
        table = tabulate(
            [_cells(r) for r in mine],
            headers=HEADERS,
            tablefmt="github" if markdown else "simple",
            disable_numparse=True,
        )
        block = f"### {scenario}\n\n{table}" if markdown else f"{scenario}\n{table}"
        if scenario in stale:
            block += f"\n\n> {stale[scenario]}" if markdown else f"\nnote: {stale[scenario]}"
        parts.append(block)
    parts.append(("**" + summary(rows) + "**") if fmt == "markdown" else summary(rows))
    return "\n\n".join(parts)


def confirmation_line(confirmation: dict | None) -> str:
    """One line saying how ``--confirm`` reran (``confirmation``: "times" and "reruns", the folders), or ""."""
    if not confirmation or not confirmation.get("times"):
        return ""
    times, folders = confirmation["times"], confirmation.get("reruns") or []
    if not folders:
        return f"--confirm {times}: nothing rerun (no slower row that moebench can rerun)"
    return f"--confirm {times}: slower rows rerun into " + ", ".join(f"`{f}`" for f in folders)


def markdown_report(rows: list[Row], baseline: str, new: str, confirmation: dict | None = None) -> str:
    """The CI log summary: the verdict, how ``--confirm`` reran, the regressions first, then every table."""
    regressions = [row for row in rows if row.regression]
    head = "REGRESSION" if regressions else "no regression"
    lines = [f"## moebench compare: {head}", "", f"`{baseline}` → `{new}`", ""]
    if line := confirmation_line(confirmation):
        lines += [line, ""]
    if regressions:
        lines += ["#### Regressions", "", render(regressions, "markdown").rsplit("\n\n", 1)[0], ""]
    return "\n".join(lines) + render(rows, "markdown") + "\n"


def to_json(rows: list[Row], baseline: str, new: str, confirmation: dict | None = None) -> dict:
    """The comparison as ``moebench.regress.compare/1``; ``confirmation`` ({"times": N, "reruns": [folders]},
    ``--confirm``'s) is recorded as given, and as {"times": 0, "reruns": []} without one."""
    cleaned = [{**asdict(row), "regression": row.regression} for row in rows]
    return {
        "schema": "moebench.regress.compare/1",
        "baseline": baseline,
        "new": new,
        "confirmation": confirmation or {"times": 0, "reruns": []},
        "regressions": sum(row.regression for row in rows),
        "summary": summary(rows),
        "rows": cleaned,
        "notes": {"busy_host": host_lines(rows), "stale_baseline": stale_notes(rows)},
    }


def software_notes(baseline: list[Run], new: list[Run]) -> list[str]:
    """Lines saying where each side came from (git, torch, test knobs), one per distinct origin."""
    notes = []
    for side, runs in (("BASELINE", baseline), ("NEW", new)):
        for soft in {json.dumps(r.software, sort_keys=True): r.software for r in runs if r.software}.values():
            notes.append(f"{side}: {software_line(soft)}")
    return notes


def software_line(soft: dict) -> str:
    """One origin in words: git sha (dirty), torch, test knobs, runs merged into a baseline."""
    line = f"git {str(soft['git'])[:10]}{' (dirty)' * bool(soft['dirty'])}, torch {soft['torch']}"
    if soft["knobs"]:
        line += f", TEST KNOBS {soft['knobs']}"
    if soft.get("runs"):
        line += f", baseline of {soft['runs']} run{'s' * (soft['runs'] != 1)} (median of medians)"
    return line


def _software(doc: dict) -> dict:
    env = doc["environment"]
    return {
        "git": env.get("git_sha"),
        "dirty": env.get("git_dirty"),
        "torch": env.get("torch"),
        "knobs": env.get("test_knobs") or {},
        "runs": (doc.get("baseline_of") or {}).get("runs"),  # a baseline merged from several runs
    }
