"""The ``moebench`` command line.

moebench run PATH...     run scenario files (or every *.toml in a folder) and write results
moebench list [DIR]      show the shipped scenarios and plans, one table per folder
moebench report PATH...  re-render the tables of saved result files (--html page, --plots PNGs, --format csv)
moebench compare BASELINE NEW   judge NEW against BASELINE (exit 1 on a regression)
moebench compare A B C ...      a trend, oldest first: each set's medians, the newest judged against the one before
moebench baseline update RESULT...   copy passing results into results/baselines/<class>/
moebench baseline path RESULT...     print the baseline folder those results compare against
moebench plan FILE.toml [--search] [--calibrate RESULTS...]   validate a deployment plan (exit 1 on an error finding)
moebench alerts FILE --prometheus-rules OUT.yml   a scenario's [alerts] thresholds as Prometheus alerting rules

exit codes: 0 ok; 1 a check or SLO failed, a run errored, or a regression; 2 a usage or input error
(one line naming the file, key and value); 3 an unexpected crash, a bug in moebench (one line naming
the file that holds the traceback; MOEBENCH_DEBUG=1 prints it instead); 130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

from moebench import __version__

SHIPPED = Path(__file__).resolve().parent.parent / "scenarios"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CRASH, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEBUG_ENV = "MOEBENCH_DEBUG"  # set (to anything but "" or "0"): a crash prints its traceback


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Usage errors as one line (``prog: error: ...``) and exit code 2, without the usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: accepted an integer >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: accepted an integer >= 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and 0 <= value <= 100):
        raise argparse.ArgumentTypeError(f"{text}: accepted a fraction from 0 to 100 (0.05 = 5 %)")
    return value


def _alpha(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text}: accepted a number in (0, 1)")
    return value


def _min_effect(text: str) -> tuple[str | None, float]:
    """``0.1`` (every metric) or ``step_time_s=0.5`` (one metric)."""
    name, _, value = text.rpartition("=")
    if name and not name.isidentifier():
        raise argparse.ArgumentTypeError(f"{text}: accepted FRACTION or METRIC=FRACTION")
    try:
        return name or None, _fraction(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text}: accepted FRACTION or METRIC=FRACTION") from None


def _add_compare(sub) -> None:
    compare = sub.add_parser(
        "compare", help="judge NEW results against BASELINE results; with more sets, a trend (oldest first)"
    )
    compare.add_argument(
        "baseline", metavar="BASELINE", help="result file or folder (moebench or pytest-benchmark JSON)"
    )
    compare.add_argument(
        "new",
        metavar="NEW",
        nargs="+",
        help="result file or folder to judge; several: a trend table of every set's medians, the last set "
        "judged against the one before (exit 1 when it regresses)",
    )
    compare.add_argument("--alpha", type=_alpha, help="significance level of the Mann-Whitney U test (default 0.01)")
    compare.add_argument(
        "--min-effect",
        type=_min_effect,
        action="append",
        default=[],
        metavar="[METRIC=]FRACTION",
        help="smallest relative change that counts (default 0.05); repeat for per-metric values",
    )
    compare.add_argument("--allow-env-mismatch", action="store_true", help="compare runs whose environments differ")
    compare.add_argument(
        "--confirm",
        type=_confirm_times,
        default=0,
        metavar="N",
        help="rerun the scenario of each 'slower' row N times (fresh processes, beside NEW in <NEW>-confirm-<i>/); "
        "it stays a regression only if every rerun reads slower too, else it reads 'unconfirmed' (default 0)",
    )
    compare.add_argument("--format", choices=["plain", "markdown"], default="plain", help="table format")
    compare.add_argument("--markdown", type=Path, metavar="FILE", help="also write a markdown summary (CI logs)")
    compare.add_argument("--json", metavar="FILE", help="write JSON to FILE ('-': to stdout, instead of the table)")
    compare.add_argument(
        "--plots",
        type=Path,
        metavar="DIR",
        help="write one PNG per metric to DIR: the median per set, p10-p90 of its samples as error bars "
        "(needs matplotlib: pip install 'moebench[plots]')",
    )
    baseline = sub.add_parser("baseline", help="write or locate committed baselines")
    baseline.add_argument("action", choices=["update", "path"])
    baseline.add_argument(
        "paths",
        nargs="+",
        metavar="RESULT",
        help="result files or folders; several runs of a set (an odd number) merge into one baseline, "
        "each metric the median of the runs' medians",
    )
    baseline.add_argument("--root", type=Path, help="baselines folder (default results/baselines)")
    baseline.add_argument("--allow-busy", action="store_true", help="accept runs flagged host_busy (not advised)")


def _column_list(text: str) -> tuple[str, ...]:
    from moebench import kinds
    from moebench.report.results import check_columns

    metrics = [c.partition(":")[0] for kind in kinds.REGISTRY.values() for c, _, _, _ in kind.columns]
    metrics += [m for kind in kinds.REGISTRY.values() for m in kind.metrics]
    try:
        return check_columns([name.strip() for name in text.split(",") if name.strip()] or [""], metrics)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--columns ")) from None


def _add_columns(command) -> None:
    command.add_argument(
        "--columns",
        type=_column_list,
        metavar="A,B,...",
        help="the value columns to show, in order: metric names (step_time_s, step_time_s:p99, ...), "
        "energy, peak_mem, checks, slo; the run's params, ranks, device and verdict always show "
        "(default: the kind's columns, leaving out the last ones until the table fits the terminal)",
    )


def table_style(args):
    """The ``TableStyle`` of ``run`` and ``report``: ``--format``, ``--columns``, and the terminal's width
    when printing to one (or $COLUMNS is set); no width limit into files and pipes."""
    from moebench.report.results import TableStyle

    width = shutil.get_terminal_size().columns if "COLUMNS" in os.environ or sys.stdout.isatty() else None
    return TableStyle(args.format, args.columns, width)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moebench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"moebench {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run scenario files or folders of them")
    run.add_argument("paths", nargs="+", metavar="PATH", help="scenario .toml files or folders")
    run.add_argument("--out", type=Path, help="result folder (default results/runs/<UTC time>-<git sha>/)")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override every scenario's [parallel] device")
    run.add_argument("--warmup", type=_non_negative_int, help="override every scenario's [scenario] warmup")
    run.add_argument("--repeats", type=_positive_int, help="override every scenario's [scenario] repeats")
    run.add_argument("--world-size", type=_positive_int, help="override every scenario's [parallel] world_size")
    run.add_argument("--format", choices=["plain", "markdown"], default="plain", help="table format")
    run.add_argument("--telemetry-interval", type=float, default=0.1, metavar="S", help="sampling period (s)")
    run.add_argument("--no-telemetry", action="store_true", help="run without the telemetry sampler")
    run.add_argument(
        "--record-routing",
        type=Path,
        metavar="DIR",
        help="also write each run's expert choices as a routing trace (DIR/<scenario>.npz; replay with skew = trace)",
    )
    run.add_argument(
        "--trace",
        type=Path,
        metavar="DIR",
        help="after each throughput or latency run's timed steps, profile 3 more and write a torch.profiler "
        "timeline per rank (DIR/<scenario>[-<param>=<value>...]/rank<r>.json; open it at https://ui.perfetto.dev "
        "or chrome://tracing)",
    )
    _add_columns(run)
    listing = sub.add_parser("list", help="show the shipped scenarios and plans, grouped by folder")
    listing.add_argument("dir", nargs="?", type=Path, default=SHIPPED)
    report = sub.add_parser("report", help="re-render tables from saved result files or folders")
    report.add_argument("paths", nargs="+", metavar="PATH")
    report.add_argument(
        "--format",
        choices=["plain", "markdown", "csv"],
        default="plain",
        help="table format; csv: instead of tables, one row per run and metric (docs/results.md)",
    )
    report.add_argument(
        "--html", type=Path, metavar="FILE", help="also write one self-contained HTML page: tables, plots, warnings"
    )
    report.add_argument("--plots", type=Path, metavar="DIR", help="also write every plot as DIR/<name>.png")
    _add_columns(report)
    _add_compare(sub)
    plan = sub.add_parser("plan", help="validate a deployment plan; exit 1 when a finding is an error")
    plan.add_argument("file", type=Path, metavar="FILE.toml", help="a plan file (scenarios/plans/README.md)")
    plan.add_argument("--search", action="store_true", help="find the fewest-GPU degrees that meet every SLO")
    plan.add_argument("--top", type=_positive_int, default=5, help="answers --search lists (default 5)")
    plan.add_argument("--max-gpus", type=_positive_int, default=4096, help="largest GPU count --search tries")
    plan.add_argument("--calibrate", nargs="+", metavar="RESULTS", help="fit the model's factors to result files")
    plan.add_argument("--json", metavar="FILE", help="write the report as JSON ('-': stdout, no text report)")
    plan.add_argument("--format", choices=["plain", "markdown"], default="plain", help="table format")
    alerts = sub.add_parser("alerts", help="write a scenario's [alerts] thresholds as Prometheus alerting rules")
    alerts.add_argument("file", type=Path, metavar="FILE", help="a scenario .toml, or a result .json (its scenario's)")
    alerts.add_argument(
        "--prometheus-rules", required=True, metavar="OUT.yml", help="the rule file to write ('-': stdout)"
    )
    return parser


def _run(args) -> int:
    from moebench.runner import default_out_dir, load_all, run_scenarios

    if not (math.isfinite(args.telemetry_interval) and args.telemetry_interval > 0):
        raise ValueError(f"--telemetry-interval = {args.telemetry_interval}: accepted a finite number of seconds > 0")
    overrides = {}
    if args.device:
        overrides["parallel", "device"] = args.device
    if args.warmup is not None:
        overrides["scenario", "warmup"] = args.warmup
    if args.repeats:
        overrides["scenario", "repeats"] = args.repeats
    if args.world_size:
        overrides["parallel", "world_size"] = args.world_size
    scenarios = load_all(args.paths, overrides)
    out = args.out or default_out_dir()
    folders = [(args.record_routing, "--record-routing", "traces"), (args.trace, "--trace", "profiler traces")]
    created = []  # per folder, the folders made for it, removed again if nothing lands in them
    try:
        for folder, flag, what in [*folders, (out, "--out", "result files")]:
            if folder is not None:
                created.append(_check_writable(folder, flag, what))
        interval = None if args.no_telemetry else args.telemetry_interval
        invoked = invocation(args)
        return run_scenarios(scenarios, out, interval, table_style(args), args.record_routing, args.trace, invoked)
    finally:
        for made in reversed(created):  # a bad folder, an interrupt before any result, or none could be written
            _remove_if_empty(made)


RUN_FLAGS = (
    "device",
    "world_size",
    "warmup",
    "repeats",
    "no_telemetry",
    "telemetry_interval",
    "record_routing",
    "trace",
)


def invocation(args) -> dict:
    """How ``moebench run`` was invoked, as each result file records it (``invocation``): ``argv``, the
    words after ``moebench``; ``flags``, the parsed options that change what runs or how it is measured
    (null: not given; paths as strings). ``compare --confirm`` reruns a result with these flags."""
    flags = {name: getattr(args, name) for name in RUN_FLAGS}
    flags |= {k: str(v) for k, v in flags.items() if isinstance(v, Path)}
    return {"argv": [str(word) for word in args.argv], "flags": flags}


def _check_writable(out: Path, flag: str = "--out", what: str = "result files") -> list[Path]:
    """Create an output folder now, so a bad --out (or --record-routing, --trace) fails before any run rather
    than after the first. Returns the folders this created, deepest first."""
    from moebench.launch.spawn import is_rank_zero

    if not is_rank_zero():
        return []
    created = [p for p in (out, *out.parents) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        _remove_if_empty(created)
        raise ValueError(f"{flag} {out}: cannot write {what} there: {err.strerror}") from None
    return created


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _list(args) -> int:
    """Every scenario and plan file under DIR, one table per folder, headed by how to run it."""
    from tabulate import tabulate

    folders = sorted({p.parent for p in Path(args.dir).rglob("*.toml")}, key=lambda d: (d != args.dir, d))
    if not folders:
        raise ValueError(f"{args.dir}: no scenario or plan files (*.toml) under this folder")
    blocks = []
    for folder in folders:
        rows, plans = [], 0
        for path in sorted(folder.glob("*.toml")):
            found = [_plan_row(path)] if _is_plan(path) else _scenario_rows(path)
            plans += sum(row[1] == "plan" for row in found)
            rows.extend(found)
        shown = _shown_path(folder)
        how = f"moebench plan {shown}/FILE.toml" if plans == len(rows) else f"moebench run {shown}"
        table = tabulate(rows, headers=["name", "kind", "runs", "file", "description"], maxcolwidths=[None] * 4 + [60])
        blocks.append(f"{shown}/  ({how})\n{table}")
    print("\n\n".join(blocks))
    return 0


def _is_plan(path: Path) -> bool:
    """A deployment plan (a [plan] section) rather than a scenario; unreadable files count as scenarios,
    whose loader then names the problem."""
    import tomllib

    try:
        return "plan" in tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False


def _scenario_rows(path: Path) -> list[list]:
    from moebench.scenario import load_file

    rows = []
    for sc in load_file(path):  # one per kind a file lists
        info = sc.sections["scenario"]
        rows.append([info["name"], info["kind"], len(sc.runs), path.name, info["description"]])
    return rows


def _plan_row(path: Path) -> list:
    from moebench.plan.spec import load_plan

    plan = load_plan(str(path))
    return [plan.name, "plan", "-", path.name, plan.description]


def _shown_path(folder: Path) -> str:
    """The folder relative to the working directory when it is below it, else as given."""
    try:
        return str(folder.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _report(args) -> int:
    from moebench.report import fault_table
    from moebench.report.results import find, read, render

    if args.html or args.plots:  # before any work: a missing matplotlib or a bad folder is said at once
        from moebench.report.plots import require_matplotlib

        require_matplotlib("--html" if args.html else "--plots")
        if args.html and not args.html.parent.is_dir():
            raise ValueError(f"--html {args.html}: cannot write: no folder {args.html.parent}")
    style = table_style(args)
    paths = find(args.paths)
    docs = [read(path) for path in paths]
    for path, doc in zip(paths, docs, strict=True):
        if args.format == "csv":
            continue
        try:
            table = render(doc, style)
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"{path}: malformed result file: {type(err).__name__}: {err}") from None
        print(table + "\n")
    faults = None if args.format == "csv" else fault_table.render(docs, style.fmt)  # across every file's fault runs
    if faults:
        print(faults + "\n")
    if args.format == "csv":
        from moebench.report.page import write_csv

        write_csv(docs, sys.stdout)
    if args.html or args.plots:
        _report_files(args, paths, docs)
    return 0


def _report_files(args, paths: list[Path], docs: list[dict]) -> None:
    """``report --html FILE`` and ``--plots DIR``; what was written, on stderr (stdout may be CSV)."""
    from moebench.report import page as report_page

    created = _check_writable(args.plots, "--plots", "plot files") if args.plots else []
    try:
        drawn = report_page.rendered_plots(docs, paths)
        if args.plots:
            written = report_page.write_plots(args.plots, drawn)
            print(f"moebench: wrote {len(written)} plot(s) to {args.plots}/", file=sys.stderr)
    finally:
        _remove_if_empty(created)
    if args.html:
        _write_text(args.html, report_page.page(docs, paths, drawn))
        count = sum(map(len, drawn))
        print(f"moebench: wrote {args.html} ({len(docs)} result file(s), {count} plot(s))", file=sys.stderr)


def _confirm_times(text: str) -> int:
    try:
        times = int(text)
    except ValueError:
        times = -1
    if not 0 <= times <= 10:
        raise argparse.ArgumentTypeError(f"{text}: accepted an integer from 0 to 10")
    return times


def _compare(args) -> int:
    import json

    from moebench.regress import compare as C
    from moebench.report.results import json_safe

    per_metric = {name: value for name, value in args.min_effect if name}
    default = [value for name, value in args.min_effect if name is None]
    settings = C.Settings(args.alpha, default[-1] if default else None, per_metric, args.allow_env_mismatch)
    if args.plots:
        from moebench.regress.trend import require_matplotlib

        require_matplotlib()
    if len(args.new) > 1:
        if args.confirm:
            sets = len(args.new) + 1
            raise ValueError(f"--confirm {args.confirm} with {sets} sets: accepted with BASELINE and one NEW")
        return _trend(args, settings)
    new_path = args.new[0]
    baseline, new = C.load([args.baseline]), C.load([new_path])
    known = {name for run in baseline + new for name in run.metrics}
    for name in per_metric.keys() - known:
        raise ValueError(f"--min-effect {name}={per_metric[name]:g}: no metric of that name in BASELINE or NEW")
    rows = C.compare(baseline, new, settings)
    confirmation = {"times": args.confirm, "reruns": []}
    if args.confirm:
        from moebench.regress.confirm import confirm_by_rerun

        rows, dirs = confirm_by_rerun(rows, baseline, new, new_path, args.confirm, settings)
        confirmation["reruns"] = [str(d) for d in dirs]
    if args.plots:
        _plots(args.plots, [args.baseline, new_path], [baseline, new], settings)
    if args.json:
        text = json.dumps(json_safe(C.to_json(rows, args.baseline, new_path, confirmation)), indent=1, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            _write_text(Path(args.json), text + "\n")
    if args.json != "-":
        notes = [*C.software_notes(baseline, new), C.confirmation_line(confirmation)]
        print("\n".join([*filter(None, notes), "", C.render(rows, args.format)]).lstrip("\n"))
    if args.markdown:
        _write_text(args.markdown, C.markdown_report(rows, args.baseline, new_path, confirmation))
    return 1 if any(row.regression for row in rows) else 0


def _trend(args, settings) -> int:
    """``compare`` of three or more sets: the trend table; exit 1 when the newest regresses against the one before."""
    import json

    from moebench.regress import trend as T
    from moebench.report.results import json_safe

    sets = T.load_sets([args.baseline, *args.new])
    known = {name for rs in sets for run in rs.runs for name in run.metrics}
    for name in settings.per_metric.keys() - known:
        raise ValueError(f"--min-effect {name}={settings.per_metric[name]:g}: no metric of that name in any set")
    rows, last = T.trend(sets, settings)
    if args.plots:
        for path in T.write_plots(T.plot_series(rows, [rs.label for rs in sets]), args.plots):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        text = json.dumps(json_safe(T.to_json(sets, rows, last)), indent=1, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            _write_text(Path(args.json), text + "\n")
    if args.json != "-":
        print("\n".join([*T.origin_lines(sets), "", T.render(sets, rows, last, args.format)]).lstrip("\n"))
    if args.markdown:
        _write_text(args.markdown, T.markdown_report(sets, rows, last))
    return 1 if T.regressed(last) else 0


def _plots(folder: Path, paths: list[str], runs: list, settings) -> None:
    """``--plots`` of a two-set compare: the same drawings as a trend of those two sets."""
    from moebench.regress import trend as T

    sets = [T.ResultSet(label, p, r) for label, p, r in zip(T.set_labels(paths), paths, runs, strict=True)]
    rows, _ = T.trend(sets, settings)
    for path in T.write_plots(T.plot_series(rows, [rs.label for rs in sets]), folder):
        print(f"wrote {path}", file=sys.stderr)


def _plan(args) -> int:
    import json

    from moebench.plan import calibrate as C
    from moebench.plan import search as S
    from moebench.plan.findings import findings
    from moebench.plan.model import estimate
    from moebench.plan.report import render, to_json
    from moebench.plan.spec import load_plan
    from moebench.report.results import json_safe

    fmt = "github" if args.format == "markdown" else "simple"
    plan = load_plan(str(args.file))
    texts, doc = [], {}
    if args.calibrate:
        cal = C.calibrate(plan, args.calibrate)
        doc["calibration"] = C.to_json(cal)
        texts.append(C.render(doc["calibration"], fmt))
        if cal.applies:
            plan = C.applied(plan, cal)
    e = estimate(plan)
    doc |= to_json(e, findings(e))
    texts.insert(0, render(doc, fmt))
    if args.search:
        doc["search"] = S.to_json(S.search(plan, args.top, args.max_gpus))
        texts.append(S.render(doc["search"], fmt))
    if args.json:
        text = json.dumps(json_safe(doc), indent=1, allow_nan=False)
        if args.json == "-":
            print(text)
        else:
            _write_text(Path(args.json), text + "\n")
    if args.json != "-":
        print("\n\n".join(texts))
    return 1 if doc["errors"] else 0


def _alerts(args) -> int:
    from moebench.report import prometheus
    from moebench.report.results import read
    from moebench.scenario import load_file

    path = str(args.file)
    if args.file.suffix == ".json":
        thresholds = prometheus.thresholds_of_result(read(args.file), path)
    else:
        thresholds = load_file(path)[0].sections["alerts"]  # empty: the file has no [alerts], the defaults apply
    text = prometheus.to_yaml(prometheus.rules(thresholds, path), path)
    if args.prometheus_rules == "-":
        print(text, end="")
    else:
        _write_text(Path(args.prometheus_rules), text)
        print(f"wrote {args.prometheus_rules}", file=sys.stderr)
    return 0


def _write_text(path: Path, text: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as err:
        raise ValueError(f"{path}: cannot write: {err.strerror}") from None


def _baseline(args) -> int:
    from moebench.regress import baseline

    root = args.root or baseline.ROOT
    if args.action == "path":
        print(baseline.folder_for(args.paths, root))
        return 0
    for path, runs in baseline.update(args.paths, root, args.allow_busy):
        print(f"wrote {path}" + (f" (median of {runs} runs)" if runs > 1 else ""))
    return 0


def _crashed(err: Exception) -> int:
    """An error moebench did not expect: one line, and where the traceback is (exit 3)."""
    from moebench.text import clip, last_line

    text = traceback.format_exc()
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        sys.stderr.write(text)
        where = "traceback above"
    else:
        try:
            fd, path = tempfile.mkstemp(prefix="moebench-crash-", suffix=".txt")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            where = f"traceback in {path}; {DEBUG_ENV}=1 prints it"
        except OSError:
            where = f"{DEBUG_ENV}=1 prints the traceback"
    message = clip(last_line(err), 200)
    print(f"moebench: internal error (a bug in moebench): {type(err).__name__}: {message} ({where})", file=sys.stderr)
    return EXIT_CRASH


class _CtrlC:
    """SIGINT over the command's whole life. While the command works (``armed``), the first Ctrl-C
    raises ``KeyboardInterrupt``: the command stops its ranks and says what it kept, and ``main``
    returns 130. Any other Ctrl-C (before the command starts, after it has finished: its last lines
    printed, the interpreter shutting down; or a second one while the first is handled) ends the
    process at once with exit 130. Result files are written atomically, so each is whole or absent."""

    def __init__(self) -> None:
        self.armed = False  # the command is at work: a Ctrl-C interrupts it
        self.raised = False  # a KeyboardInterrupt was raised: the command is stopping

    def __call__(self, signum, frame) -> None:
        if self.raised or not self.armed:
            _exit_interrupted("again: stopped at once" if self.raised else "nothing was left half done")
        self.raised = True
        raise KeyboardInterrupt


def _exit_interrupted(why: str) -> None:
    """Exit 130 now, from the signal handler: flush what is buffered (a flush the signal cut short is
    skipped, not repeated), say so in one line, and skip the interpreter's shutdown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, RuntimeError, ValueError):  # RuntimeError: a reentrant write
            stream.flush()
    try:
        os.write(2, f"moebench: interrupted ({why})\n".encode())
    finally:
        os._exit(EXIT_INTERRUPTED)


def main(argv: list[str] | None = None) -> int:
    """The command; returns its exit code. The Ctrl-C handler (``_CtrlC``) is installed first thing
    and, for the process's own command line (``argv`` None), stays until the process exits, so a
    Ctrl-C between this return and the exit is 130 too. Called with ``argv`` (a test, a script), the
    caller's handler is restored on return."""
    handler, previous = _CtrlC(), None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, handler)
    try:
        return _command(argv, handler)
    except KeyboardInterrupt as err:  # raised where _command's own handlers could not take it
        return _interrupted(err)
    finally:
        if argv is not None and previous is not None:
            signal.signal(signal.SIGINT, previous)


def _interrupted(err: KeyboardInterrupt) -> int:
    """One line (``runner.Interrupted`` says what was kept) and exit code 130."""
    print(f"moebench: interrupted{f'; {err}' if str(err) else ''}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _command(argv: list[str] | None, ctrl_c: _CtrlC) -> int:
    """Parse ``argv`` and run its command; Ctrl-C interrupts it only inside the ``try``."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "run": _run,
        "list": _list,
        "report": _report,
        "compare": _compare,
        "baseline": _baseline,
        "plan": _plan,
        "alerts": _alerts,
    }
    try:
        ctrl_c.armed = True
        return commands[args.command](args)
    except ValueError as err:  # ScenarioError is a ValueError: one line, exit 2
        print(f"moebench: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        return _interrupted(err)
    except BrokenPipeError:  # the reader of our output left (`moebench report ... | head`): not a crash
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        return 0
    except Exception as err:
        return _crashed(err)
    finally:
        ctrl_c.armed = False


if __name__ == "__main__":
    sys.exit(main())
