"""The A/A false-alarm rate of ``moebench compare``: run identical code N times, compare every pair.

    python -m moebench.false_alarms [--runs 7] [--out DIR] [SCENARIO ...]   (default scenarios/regress)

Each repetition is a separate ``moebench run`` process, as two CI jobs would be. Every pair
(i < j) is compared with the scenarios' own [compare] thresholds: since the code is the same, every
regression is a false alarm. The table shows, per metric, the verdicts over all pairs and the
largest change seen next to the minimum effect that would have flagged it.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from moebench import compare as C
from moebench.results import REPO

DEFAULT_SET = REPO / "scenarios" / "regress"


def run_set(scenarios: list[str], out: Path, runs: int) -> list[Path]:
    """``runs`` separate ``moebench run`` processes of ``scenarios``; their result folders."""
    folders = []
    for i in range(runs):
        folder = out / f"run{i}"
        cmd = [sys.executable, "-m", "moebench", "run", *scenarios, "--out", str(folder), "--no-telemetry"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"run {i} of {', '.join(scenarios)} exited {done.returncode}: {tail}")
        folders.append(folder)
    return folders


def pairwise(folders: list[Path], settings: C.Settings | None = None) -> list[list[C.Row]]:
    """The rows of every comparison (i < j) between the result folders."""
    settings = settings or C.Settings()
    loaded = [C.load([folder]) for folder in folders]
    return [C.compare(loaded[i], loaded[j], settings) for i, j in itertools.combinations(range(len(loaded)), 2)]


def tally(comparisons: list[list[C.Row]]) -> list[dict]:
    """Per (scenario, run, metric): verdict counts, the largest change seen, and the minimum effect."""
    table = {}
    for rows in comparisons:
        for row in rows:
            entry = table.setdefault((row.scenario, row.run, row.metric), {"verdicts": {}, "largest": 0.0})
            entry["verdicts"][row.verdict] = entry["verdicts"].get(row.verdict, 0) + 1
            entry["min_effect"] = row.min_effect
            if row.ratio is not None:
                entry["largest"] = max(entry["largest"], C.effect(row.ratio))
    return [{"scenario": s, "run": r, "metric": m, **entry} for (s, r, m), entry in table.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moebench.false_alarms", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", default=[str(DEFAULT_SET)])
    parser.add_argument("--runs", type=int, default=7, help="separate runs; pairs = runs·(runs−1)/2 (default 7: 21)")
    parser.add_argument("--out", type=Path, help="keep the result folders here (default a temporary folder)")
    args = parser.parse_args(argv)
    if args.runs < 2:
        parser.error(f"--runs {args.runs}: accepted an integer >= 2 (one pair needs two runs)")
    with tempfile.TemporaryDirectory(prefix="moebench-aa-") as tmp:
        folders = run_set(args.scenarios, args.out or Path(tmp), args.runs)
        comparisons = pairwise(folders)
    alarms = sum(any(row.regression for row in rows) for rows in comparisons)
    rows = []
    for entry in tally(comparisons):
        t = entry["min_effect"]
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(entry["verdicts"].items()))
        rows.append([entry["scenario"], entry["run"], entry["metric"], verdicts, f"{entry['largest']:.1%}", _pct(t)])
    print(tabulate(rows, headers=["scenario", "run", "metric", "verdicts", "largest change", "min effect"]))
    print(f"\n{alarms} of {len(comparisons)} A/A comparisons reported a regression ({args.runs} runs)")
    return 0 if alarms == 0 else 1


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    sys.exit(main())
