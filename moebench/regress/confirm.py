"""Confirmation by rerun: a timing regression stands unless a fresh run of its scenario clears it.

Within a run, the gated timings are ratios of two things timed in alternating rounds, so drift
the machine adds between rounds cancels. What no round inside a run can cancel is a state that
lasts the whole run: clean-clone CI runs of unchanged code read regress-dispatch's
``dispatch_over_floor`` 1.110, 1.123 and 1.189 times another run of the same code in their own A/A
sets (docs/results.md, "Confirmation by rerun"). A real regression is in the code and comes
back in every run; such a state need not. So ``moebench compare BASELINE NEW --confirm N`` runs
the scenario of each ``slower`` row N more times, each in fresh processes, compares every rerun
with BASELINE by the same rules, and:

- keeps ``slower`` (noted "confirmed") when every rerun reads ``slower`` too;
- makes it ``unconfirmed`` (not a regression) when every rerun judged the metric and one did not
  read ``slower``;
- keeps ``slower`` (noted why) when a rerun could not judge it: the rerun failed, ran in another
  environment class, or lacks the metric, or NEW is a pytest-benchmark file, which moebench
  cannot rerun. The gate fails closed: only a measurement clears a regression.

Perfherder and Chromium's perf sheriffs retrigger a job for the same reason before they file a
regression. Only ``slower`` is confirmed: exact metrics (errors, token counts, load statistics)
are the same in every run of a seed, and a missing metric or a failing run or check is no
timing event.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from moebench.metrics import is_finite_number
from moebench.regress import compare as C
from moebench.report import results
from moebench.report.results import REPO
from moebench.text import clip

CONFIRMED = "slower"  # the one verdict a rerun must repeat
UNCONFIRMED = "unconfirmed"
JUDGED = ("same", "noisy", "faster", "slower")  # a rerun's verdicts that measured the metric
INTERRUPTED = 130  # a child's exit code after Ctrl-C (the CLI's EXIT_INTERRUPTED)
STOP_S = 60  # how long an interrupted rerun may take to write what it finished before it is killed


def _key(row: C.Row) -> tuple[str, str, str]:
    return row.scenario, row.run, row.metric


def _why_not(rows: list[C.Row], row: C.Row) -> str:
    """Why a rerun has no judged row for ``row``: its run's own verdict, or 'missing'."""
    for other in rows:
        if (other.scenario, other.run) == (row.scenario, row.run) and other.metric in ("run", "environment"):
            return other.verdict
    return "missing"


def confirm(rows: list[C.Row], reruns: list[list[C.Row]], cannot: dict | None = None) -> list[C.Row]:
    """``rows`` with each ``slower`` row confirmed, cleared or kept by the reruns (module docstring).

    ``reruns``: one list of rows per rerun, each the comparison of BASELINE with that rerun.
    ``cannot``: (scenario, run) -> why those runs were not rerun (their ``slower`` rows are kept).
    """
    cannot = cannot or {}
    seen = [{_key(r): r for r in rows_i} for rows_i in reruns]
    out = []
    for row in rows:
        if row.verdict == CONFIRMED and (row.scenario, row.run) in cannot:
            note = f"not confirmed, kept: {cannot[row.scenario, row.run]}"
            out.append(replace(row, note=_join(row.note, note)))
            continue
        if row.verdict != CONFIRMED or not reruns:
            out.append(row)
            continue
        again = [found.get(_key(row)) for found in seen]
        judged = [r for r in again if r is not None and r.verdict in JUDGED]
        ratios = ", ".join("-" if r is None or r.ratio is None else f"{r.ratio:.3f}" for r in again)
        if len(judged) < len(again):
            why = ", ".join(
                r.verdict if r is not None else _why_not(rows_i, row) for r, rows_i in zip(again, reruns, strict=True)
            )
            note = f"kept: a rerun could not judge it ({why})"
            out.append(replace(row, note=_join(row.note, note)))
        elif all(r.verdict == CONFIRMED for r in judged):
            note = f"confirmed: {len(again)} rerun(s) read slower too ({ratios})"
            out.append(replace(row, note=_join(row.note, note)))
        else:
            verdicts = ", ".join(r.verdict for r in judged)
            note = f"not repeated by {len(again)} rerun(s): {verdicts} ({ratios}); not a regression"
            out.append(replace(row, verdict=UNCONFIRMED, note=_join(row.note, note)))
    return out


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if a else b


NO_INVOCATION = "records no invocation (made before moebench recorded its flags): rerun it by hand to confirm"


def _options(file: str, doc: dict) -> list[str] | None:
    """The ``moebench run`` options that remake NEW's runs of one result file, from what it records: its
    scenario's warmup and repeats (the recorded scenario, overrides included), the flags it was invoked
    with (``invocation.flags``: --device, --world-size, --no-telemetry, --telemetry-interval; not
    --record-routing or --trace, which add outputs, not conditions), and its device and world size where
    the scenario fixes them (a scalar). None for a file that records no invocation."""
    invocation = doc.get("invocation")
    flags = invocation.get("flags") if isinstance(invocation, dict) else None
    if not isinstance(flags, dict):  # none recorded (an older moebench), or not a table of flags
        return None
    try:
        sections = doc["scenario"]
        scenario, parallel = sections["scenario"], sections.get("parallel", {})
        counts = [scenario["warmup"], scenario["repeats"]]
        if not all(type(n) is int and n >= 0 for n in counts):  # a bool, float or 1e999 is no count
            raise ValueError(f"warmup, repeats = {clip(repr(counts))}")
        options = ["--warmup", str(counts[0]), "--repeats", str(counts[1])]
        device, world_size = flags.get("device") or parallel.get("device"), flags.get("world_size")
        world_size = world_size or parallel.get("world_size")
        no_telemetry, interval = bool(flags.get("no_telemetry")), flags.get("telemetry_interval")
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(
            f"--confirm: {file} lacks its scenario's warmup or repeats, or its invocation's flags ({err!r})"
        ) from None
    if isinstance(device, str):
        options += ["--device", device]
    if type(world_size) is int and world_size >= 1:
        options += ["--world-size", str(world_size)]
    if no_telemetry:
        options.append("--no-telemetry")
    elif type(interval) in (int, float) and is_finite_number(interval) and 0 < interval < 1e6:
        options += ["--telemetry-interval", repr(float(interval))]
    return options


def plan(rows: list[C.Row], new: list[C.Run]) -> tuple[list[tuple[Path, list[str], dict]], dict]:
    """What to rerun for NEW's ``slower`` rows: (scenario file, ``moebench run`` options, NEW's
    environment) per scenario, and (scenario, run) -> why not, for runs that cannot be rerun."""
    flagged = {(r.scenario, r.run) for r in rows if r.verdict == CONFIRMED}
    plans, seen, cannot = [], set(), {}
    for file in sorted({run.source for run in new if (run.scenario, run.label) in flagged}):
        doc = results.read_any(Path(file))
        if results.is_pytest_benchmark(doc):
            for run in new:
                if run.source == file:
                    cannot[run.scenario, run.label] = f"{file} is a pytest-benchmark result: moebench cannot rerun it"
            continue
        source = Path(doc["source"])
        if not source.is_file() and (REPO / source).is_file():
            source = REPO / source
        if not source.is_file():
            raise ValueError(f"--confirm: {file} was run from {doc['source']}, which is not here to rerun")
        options = _options(file, doc)
        if options is None:
            print(f"confirming: {file} {NO_INVOCATION}", file=sys.stderr)
            for run in new:
                if run.source == file:
                    cannot[run.scenario, run.label] = f"{file} {NO_INVOCATION}"
            continue
        if (source.resolve(), tuple(options)) not in seen:
            seen.add((source.resolve(), tuple(options)))
            plans.append((source, options, doc.get("environment") or {}))
    return plans, cannot


def rerun_dirs(new_path: str | Path, times: int) -> list[Path]:
    """Where the reruns go: ``times`` folders that do not exist yet, beside NEW (never inside it,
    which a later ``compare`` of NEW would read): ``<NEW>-confirm-<i>`` for a folder NEW,
    ``<its folder>-<stem>-confirm-<i>`` for a file. Earlier reruns are left as they are."""
    new_path = Path(new_path).resolve()
    stem = new_path.name if new_path.is_dir() else f"{new_path.parent.name}-{new_path.stem}"
    parent = new_path.parent if new_path.is_dir() else new_path.parent.parent
    dirs, i = [], 1
    while len(dirs) < times:
        candidate = parent / f"{stem}-confirm-{i}"
        if not candidate.exists():
            dirs.append(candidate)
        i += 1
    return dirs


def rerun(plans: list[tuple[Path, list[str], dict]], out: Path) -> None:
    """``moebench run`` each planned scenario file into ``out``, as a separate process; a rerun
    made from other code or test knobs than NEW is refused (it would not measure NEW's code)."""
    for source, options, env in plans:
        cmd = [sys.executable, "-m", "moebench", "run", str(source), f"--out={out}", *options]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, err = child.communicate()
        except KeyboardInterrupt:
            # a terminal's Ctrl-C reached the child too; a SIGINT sent to this process alone did not
            child.send_signal(signal.SIGINT)
            try:
                child.communicate(timeout=STOP_S)  # let it keep what it finished
            except subprocess.TimeoutExpired:
                child.kill()
                child.communicate()
            raise KeyboardInterrupt(f"confirmation stopped; what the rerun finished is in {out}") from None
        if child.returncode == INTERRUPTED:
            raise KeyboardInterrupt(f"confirmation rerun interrupted; what it finished is in {out}")
        if child.returncode not in (0, 1):  # 1: a run failed or missed an SLO: confirm keeps its rows
            tail = (err.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"--confirm: rerunning {source} exited {child.returncode}: {tail}")
        for path in results.find([out]):
            made = results.read_any(path).get("environment") or {}
            for key, what in (("git_sha", "git commit"), ("test_knobs", "test knobs")):
                if env.get(key) is not None and made.get(key) is not None and env[key] != made[key]:
                    raise ValueError(
                        f"--confirm: NEW was made with {what} {env[key]}, the rerun in {out} with {made[key]}: "
                        "confirm from the checkout and settings NEW came from"
                    )


def confirm_by_rerun(
    rows: list[C.Row], baseline: list[C.Run], new: list[C.Run], new_path: str | Path, times: int, settings
) -> tuple[list[C.Row], list[Path]]:
    """Rerun the scenarios of NEW's ``slower`` rows ``times`` times and ``confirm`` them; the rows,
    and the folders the reruns wrote. With times > 1 every rerun must read slower for a row to
    stay confirmed, and one that reads otherwise clears it: more reruns make the gate quieter and
    a regression just over its minimum effect likelier to pass (CI uses 1)."""
    plans, cannot = plan(rows, new)
    if times == 0 or not (plans or cannot):
        return rows, []
    dirs = rerun_dirs(new_path, times) if plans else []
    reruns = []
    for out in dirs:
        print(f"confirming: rerunning {', '.join(str(s) for s, _, _ in plans)} into {out}", file=sys.stderr)
        rerun(plans, out)
        again = C.load([out]) if out.is_dir() and any(out.rglob("*.json")) else []  # none: every run failed
        names = {run.scenario for run in again}
        reruns.append(C.compare([b for b in baseline if b.scenario in names], again, settings))
    return confirm(rows, reruns, cannot), dirs
