"""Confirmation by rerun: a timing regression stands only when a fresh run of its scenario shows it too.

Within a run, the gated timings are ratios of two things timed in alternating rounds, so drift
the machine adds between rounds cancels. What no round inside a run can cancel is an event that
lasts the whole run: clean-clone CI runs of unchanged code read regress-dispatch's
``dispatch_over_floor`` 1.110, 1.123 and 1.189 times another run of the same code in their own A/A
sets, where the same 21-pair comparison on a quiet host reads up to 1.06-1.08 (results/README.md,
"Confirmation by rerun"). A real regression is in the code and comes back in every run; such an
event does not. So ``moebench compare BASELINE NEW --confirm N`` runs the scenario of each
``slower`` row N more times, each in fresh processes, compares every rerun with BASELINE by the
same rules, and keeps ``slower`` only where every rerun reads ``slower`` too. Otherwise the row
becomes ``unconfirmed`` (not a regression; its note gives the reruns' ratios). Perfherder and
Chromium's perf sheriffs retrigger a job for the same reason before they file a regression.

Only ``slower`` is confirmed: exact metrics (errors, token counts, load statistics) are the same
in every run of a seed, and a missing metric or a failing run or check is no timing event.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from moebench import compare as C
from moebench import results
from moebench.kinds.common import NO_TELEMETRY
from moebench.results import REPO

CONFIRMED = "slower"  # the one verdict a rerun must repeat
UNCONFIRMED = "unconfirmed"


def _key(row: C.Row) -> tuple[str, str, str]:
    return row.scenario, row.run, row.metric


def confirm(rows: list[C.Row], reruns: list[list[C.Row]]) -> list[C.Row]:
    """``rows`` with each ``slower`` row kept only when every rerun's comparison reads it ``slower``.

    ``reruns``: one list of rows per rerun, each the comparison of BASELINE with that rerun.
    A row the reruns lack (its run did not rerun, or failed there) counts as not repeated.
    """
    seen = [{_key(r): r for r in rows_i} for rows_i in reruns]
    out = []
    for row in rows:
        if row.verdict != CONFIRMED or not reruns:
            out.append(row)
            continue
        again = [found.get(_key(row)) for found in seen]
        ratios = ", ".join("-" if r is None or r.ratio is None else f"{r.ratio:.3f}" for r in again)
        if all(r is not None and r.verdict == CONFIRMED for r in again):
            note = f"confirmed: {len(again)} rerun(s) read slower too ({ratios})"
            out.append(replace(row, note=_join(row.note, note)))
        else:
            verdicts = ", ".join("missing" if r is None else r.verdict for r in again)
            note = f"not repeated by {len(again)} rerun(s): {verdicts} ({ratios}); not a regression"
            out.append(replace(row, verdict=UNCONFIRMED, note=_join(row.note, note)))
    return out


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


def to_rerun(rows: list[C.Row], new: list[C.Run]) -> list[tuple[Path, list[str]]]:
    """(scenario file, ``moebench run`` options) for each result file with a ``slower`` row.

    The options repeat what the NEW run was made with: its warmup, repeats and device, and no
    telemetry when it had none. The scenario file is the result's ``source``, read from the
    working folder, else from the repository.
    """
    flagged = {(r.scenario, r.run) for r in rows if r.verdict == CONFIRMED}
    files = sorted({run.source for run in new if (run.scenario, run.label) in flagged})
    plans = []
    for file in files:
        doc = results.read_any(Path(file))
        if results.is_pytest_benchmark(doc):
            raise ValueError(f"--confirm: {file} is a pytest-benchmark file: accepted moebench results only")
        source = Path(doc["source"])
        if not source.is_file() and (REPO / source).is_file():
            source = REPO / source
        if not source.is_file():
            raise ValueError(f"--confirm: {file} was run from {doc['source']}, which is not here to rerun")
        run = doc["runs"][0]
        scenario = run["config"]["scenario"]
        options = ["--warmup", str(scenario["warmup"]), "--repeats", str(scenario["repeats"])]
        options += ["--device", run["config"]["parallel"]["device"]]
        if _telemetry_off(run):
            options.append("--no-telemetry")
        plans.append((source, options))
    return plans


def _telemetry_off(run: dict) -> bool:
    """The run was made with --no-telemetry (``kinds.common``'s stand-in sampler says so per rank)."""
    per_rank = (run.get("telemetry") or {}).get("per_rank") or []
    return run.get("telemetry") is None or any(r.get("reason") == NO_TELEMETRY for r in per_rank)


def rerun_dirs(new_path: str | Path, times: int) -> list[Path]:
    """Where the reruns go: beside NEW, ``<NEW>-confirm-<i>`` (never inside it, which a later
    ``compare`` of NEW would read)."""
    new_path = Path(new_path)
    stem = new_path.name if new_path.is_dir() else new_path.stem
    return [new_path.parent / f"{stem}-confirm-{i}" for i in range(1, times + 1)]


def rerun(plans: list[tuple[Path, list[str]]], out: Path) -> None:
    """``moebench run`` each planned scenario file into ``out``, as a separate process."""
    for source, options in plans:
        cmd = [sys.executable, "-m", "moebench", "run", str(source), "--out", str(out), *options]
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode not in (0, 1):  # 1: a run failed or missed an SLO, which compare reports
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"--confirm: rerunning {source} exited {done.returncode}: {tail}")


def confirm_by_rerun(
    rows: list[C.Row], baseline: list[C.Run], new: list[C.Run], new_path: str | Path, times: int, settings
) -> tuple[list[C.Row], list[Path]]:
    """Rerun the scenarios of NEW's ``slower`` rows ``times`` times and ``confirm`` them; the rows,
    and the folders the reruns wrote."""
    plans = to_rerun(rows, new)
    if not plans or times == 0:
        return rows, []
    dirs = rerun_dirs(new_path, times)
    reruns = []
    for out in dirs:
        print(f"confirming: rerunning {', '.join(str(s) for s, _ in plans)} into {out}", file=sys.stderr)
        rerun(plans, out)
        again = C.load([out])
        names = {run.scenario for run in again}
        reruns.append(C.compare([b for b in baseline if b.scenario in names], again, settings))
    return confirm(rows, reruns), dirs
