"""The ``moebench`` command line. Exit codes: 0 ok, 1 a check or SLO failed, 2 usage or input error.

moebench run PATH...     run scenario files (or every *.toml in a folder) and write results
moebench list [DIR]      show the shipped scenarios
moebench report PATH...  re-render the tables of saved result files
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from moebench import __version__

SHIPPED = Path(__file__).resolve().parent.parent / "scenarios"


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
    listing = sub.add_parser("list", help="show the shipped scenarios")
    listing.add_argument("dir", nargs="?", type=Path, default=SHIPPED)
    report = sub.add_parser("report", help="re-render tables from saved result files or folders")
    report.add_argument("paths", nargs="+", metavar="PATH")
    report.add_argument("--format", choices=["plain", "markdown"], default="plain")
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
    _check_writable(out)
    interval = None if args.no_telemetry else args.telemetry_interval
    return run_scenarios(scenarios, out, interval, args.format)


def _check_writable(out: Path) -> None:
    """Create the result folder now, so a bad --out fails before any run rather than after the first."""
    from moebench.launch import is_rank_zero

    if not is_rank_zero():
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write result files there: {err.strerror}") from None


def _list(args) -> int:
    from tabulate import tabulate

    from moebench.scenario import discover, load

    rows = []
    for path in discover([args.dir]):
        sc = load(path)
        info = sc.sections["scenario"]
        rows.append([info["name"], info["kind"], len(sc.runs), path.name, info["description"]])
    print(tabulate(rows, headers=["name", "kind", "runs", "file", "description"], maxcolwidths=[None] * 4 + [60]))
    return 0


def _report(args) -> int:
    from moebench.results import find, read, render

    for path in find(args.paths):
        doc = read(path)
        try:
            table = render(doc, args.format)
        except (KeyError, TypeError, AttributeError, IndexError) as err:
            raise ValueError(f"{path}: malformed result file: {type(err).__name__}: {err}") from None
        print(table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"run": _run, "list": _list, "report": _report}
    try:
        return commands[args.command](args)
    except ValueError as err:  # ScenarioError is a ValueError: one line, exit 2
        print(f"moebench: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
