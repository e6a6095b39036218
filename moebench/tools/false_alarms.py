"""The A/A false-alarm rate of ``moebench compare``: run identical code N times, compare every pair.

    python -m moebench.tools.false_alarms [--runs 7] [--busy N] [--out DIR] [SCENARIO ...]
                                    (default scenarios/regress)

Each repetition is a separate ``moebench run`` process, as two CI jobs would be. Every pair
(i < j) is compared with the scenarios' own [compare] thresholds: since the code is the same, every
regression is a false alarm. The table shows, per metric, the verdicts over all pairs and the
largest change seen next to the minimum effect that would have flagged it. The last line counts
the alarms left after confirmation by a third run (``confirmed``), as the CI gate judges them.

``--busy N`` runs the last N repetitions beside a noisy neighbour, two processes streaming 64 MiB
copies through memory (what another job on a shared CI host does), and then compares every pair
in both orders, since a busy run is never the baseline of a quiet one otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
from pathlib import Path

from tabulate import tabulate

from moebench.regress import compare as C
from moebench.regress.confirm import confirm
from moebench.report.results import REPO

DEFAULT_SET = REPO / "scenarios" / "regress"


# The noisy neighbour: a process copying 64 MiB arrays through memory, forever.
NEIGHBOUR = "import numpy as np\na = np.ones(1 << 23)\nb = np.empty_like(a)\nwhile True:\n    np.copyto(b, a)"


def run_set(scenarios: list[str], out: Path, runs: int, busy: int = 0) -> list[Path]:
    """``runs`` separate ``moebench run`` processes of ``scenarios``; their result folders.

    The last ``busy`` of them run beside two ``NEIGHBOUR`` processes.
    """
    folders = []
    for i in range(runs):
        folder = out / f"run{i}"
        cmd = [sys.executable, "-m", "moebench", "run", *scenarios, "--out", str(folder), "--no-telemetry"]
        neighbours = [subprocess.Popen([sys.executable, "-c", NEIGHBOUR]) for _ in range(2 if i >= runs - busy else 0)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        finally:
            for neighbour in neighbours:
                neighbour.kill()
                neighbour.wait()
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"run {i} of {', '.join(scenarios)} exited {done.returncode}: {tail}")
        folders.append(folder)
    return folders


def pairs(n: int, both_orders: bool = False) -> list[tuple[int, int]]:
    """(i, j): i < j, and j < i too with ``both_orders``."""
    return list((itertools.permutations if both_orders else itertools.combinations)(range(n), 2))


def pairwise(folders: list[Path], settings: C.Settings | None = None, both_orders: bool = False) -> list[list[C.Row]]:
    """The rows of every comparison (``pairs``) between the folders."""
    settings = settings or C.Settings()
    loaded = [C.load([folder]) for folder in folders]
    return [C.compare(loaded[i], loaded[j], settings) for i, j in pairs(len(loaded), both_orders)]


def confirmed(
    folders: list[Path], comparisons: list[list[C.Row]], settings: C.Settings | None = None, both_orders: bool = False
) -> list[list[C.Row]]:
    """``comparisons`` as the gate (``compare --confirm 1``) judges them: a ``slower`` row of pair
    (i, j) must repeat in the comparison of i with a rerun, and for identical code a rerun is one
    more run of it: the next run after j that is neither i nor j. Needs 3 runs or more."""
    settings = settings or C.Settings()
    n = len(folders)
    if n < 3:
        raise ValueError(f"confirmation needs a third run: got {n} runs")
    loaded = [C.load([folder]) for folder in folders]
    out = []
    for (i, j), rows in zip(pairs(n, both_orders), comparisons, strict=True):
        k = next(k % n for k in range(j + 1, j + n) if k % n not in (i, j))
        out.append(confirm(rows, [C.compare(loaded[i], loaded[k], settings)]))
    return out


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
    parser = argparse.ArgumentParser(prog="python -m moebench.tools.false_alarms", description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", default=[str(DEFAULT_SET)])
    parser.add_argument("--runs", type=int, default=7, help="separate runs; pairs = runs·(runs−1)/2 (default 7: 21)")
    parser.add_argument("--out", type=Path, help="keep the result folders here (default a temporary folder)")
    parser.add_argument("--busy", type=int, default=0, help="run the last N beside a noisy neighbour (default 0)")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error(f"--runs {args.runs}: accepted an integer >= 3 (a pair, and a third run to confirm it)")
    if not 0 <= args.busy <= args.runs:
        parser.error(f"--busy {args.busy}: accepted an integer from 0 to --runs ({args.runs})")
    with tempfile.TemporaryDirectory(prefix="moebench-aa-") as tmp:
        folders = run_set(args.scenarios, args.out or Path(tmp), args.runs, args.busy)
        comparisons = pairwise(folders, both_orders=args.busy > 0)
        judged = confirmed(folders, comparisons, both_orders=args.busy > 0)
    alarms = sum(any(row.regression for row in rows) for rows in comparisons)
    kept = sum(any(row.regression for row in rows) for rows in judged)
    rows = []
    for entry in tally(comparisons):
        t = entry["min_effect"]
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(entry["verdicts"].items()))
        rows.append([entry["scenario"], entry["run"], entry["metric"], verdicts, f"{entry['largest']:.1%}", _pct(t)])
    print(tabulate(rows, headers=["scenario", "run", "metric", "verdicts", "largest change", "min effect"]))
    busy = f", the last {args.busy} beside a noisy neighbour; both orders" if args.busy else ""
    print(f"\n{alarms} of {len(comparisons)} A/A comparisons reported a regression ({args.runs} runs{busy});")
    print(f"{kept} after confirmation by a third run, as the CI gate's --confirm 1 judges them")
    return 0 if kept == 0 else 1


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    sys.exit(main())
