"""The fault kind's parent side: the run launched with the watchdog, a stopped run's report, and the
crash-and-resume of a training run that checkpoints (three launches: first, resumed, reference).

``detect_timeout_s`` is the watchdog's timeout (``kind.watchdog_s``: times ``slowdown`` for a straggler), so
no fault run can wait gloo's 30 minutes. A run the watchdog stopped reports the failure, with the rank's own
error when it raised, in ``measure``'s place (``stopped_run``).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from typing import TYPE_CHECKING

from moebench.kinds.fault import kind, resume
from moebench.launch.spawn import launch as launch_ranks
from moebench.launch.spawn import under_torchrun
from moebench.launch.watchdog import RankFailure
from moebench.measure.common import on_rank
from moebench.text import clip, last_line

if TYPE_CHECKING:
    from moebench.spec import RunSpec


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """What every rank of a fault run executes (module level: the launcher pickles it by name)."""
    return on_rank(kind.measure, ctx, spec, interval)


def launch(spec: RunSpec, interval: float | None, device: str, backend: str) -> list[dict]:
    """The run, launched with the watchdog; a training run that checkpoints crashes and resumes."""
    if resume.resumable(spec):
        return crash_and_resume(spec, interval, device, backend)
    try:
        options = {"device": device, "backend": backend, "watchdog_s": kind.watchdog_s(spec)}
        return launch_ranks(measure, spec.world_size, spec, interval, **options)
    except RankFailure as failure:
        return [stopped_run(failure)]


def stopped_run(failure: RankFailure) -> dict:
    """What a run the watchdog stopped reports, in ``measure``'s place."""
    stopped = {"rank": failure.rank, "how": failure.how, "step": failure.step, "layer": failure.layer}
    stopped["after_s"] = failure.silent_s
    stopped["message"] = clip(last_line(failure), 400)  # the rank's own error, when it raised
    return {"failure": stopped, "telemetry": {"available": False, "reason": "the run was stopped"}}


def crash_and_resume(spec: RunSpec, interval, device: str, backend: str) -> list[dict]:
    """First pass (crashes), resumed pass, uninterrupted reference pass (``resume``'s docstring)."""
    if under_torchrun():
        raise ValueError(
            "[fault] checkpoint_every under torchrun is refused: the fault kind relaunches the ranks itself "
            "(accepted under moebench's own launcher; torchrun's --max-restarts restarts a job from its start)"
        )
    options = {"device": device, "backend": backend, "watchdog_s": kind.watchdog_s(spec)}
    directory = tempfile.mkdtemp(prefix="moebench-checkpoints-")

    def passed(mode: str, where: str | None) -> list[dict]:
        return launch_ranks(measure, spec.world_size, resume.with_pass(spec, mode, where), interval, **options)

    try:
        try:
            first = passed("first", directory)
            return [r | {"resumed": None} for r in first]  # no crash happened (cannot, as loaded: at_step < steps)
        except RankFailure as failure:
            stopped = stopped_run(failure)
        start = time.monotonic()
        resumed = passed("resume", directory)
        recovery_s = time.monotonic() - start
        reference = passed("reference", None)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return [stopped | {"resumed": resumed, "reference": reference, "recovery_s": recovery_s}]
