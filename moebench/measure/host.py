"""The host around a run: its load, cores, threads per rank and clock, and whether it was too busy to time.

Every run record carries ``"host"`` (``record``) and ``"host_busy"`` (``busy``), documented in
``docs/results.md``. The decisions are pure functions of numbers (``busy``, ``threads_per_rank``,
``parse_cpu_mhz``, ``other_cores``); the readers of ``/proc`` and ``os`` around them are thin.

A host is busy when the run's own threads (threads per rank × ranks on this host) exceed the cores
this process may use, or when other processes used more of the cores during the run than the run
left free, by over ``SLACK_CORES``. Other processes' use is measured, not guessed from the load
average: the host's busy CPU time over the run (``/proc/stat``) minus the CPU time of this
process and of the ranks it waited for (``os.times``), over the run's wall time. The load
averages before and after are recorded too, but not judged: the reading before a run includes the
run before it, so on a quiet host a series of runs that fill every core reads about the core count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
PROC_STAT = Path("/proc/stat")
SCALING_CUR_FREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq")  # in kHz


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask), else every CPU of the host."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity outside Linux
        return os.cpu_count() or 1


def load_avg() -> list[float] | None:
    """The 1-, 5- and 15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def threads_per_rank(world_size: int, requested: int = 0, cpus: int | None = None) -> int:
    """Torch intra-op threads for each of ``world_size`` CPU ranks on this host.

    ``requested`` (``[parallel] threads_per_rank``) wins when > 0; 0 shares the cores among the
    ranks, at least one thread each, so a run never oversubscribes the host by itself.
    """
    if requested > 0:
        return requested
    return max(1, (cpu_count() if cpus is None else cpus) // max(1, world_size))


def parse_cpu_mhz(cpuinfo: str | None, scaling_khz: str | None) -> float | None:
    """The mean "cpu MHz" of ``/proc/cpuinfo`` text, else cpu0's ``scaling_cur_freq`` (kHz), else None."""
    mhz = []
    for line in (cpuinfo or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                continue
    if mhz:
        return round(sum(mhz) / len(mhz), 1)
    try:
        return round(int((scaling_khz or "").strip()) / 1000, 1)
    except ValueError:
        return None


def cpu_mhz() -> float | None:
    return parse_cpu_mhz(_read(CPUINFO), _read(SCALING_CUR_FREQ))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return None


SLACK_CORES = 0.5  # other processes may use this much beyond the cores a run leaves free (daemons, the shell)


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time at one moment: wall clock, the host's busy CPU seconds (None off Linux), this process tree's."""

    wall_s: float
    host_busy_s: float | None
    own_s: float


def cpu_snapshot() -> CpuSnapshot:
    """Now: the host's busy CPU time (``/proc/stat``: all but idle and iowait) and this process's own,
    including the children it has waited for (the ranks it spawned, once they have exited)."""
    t = os.times()
    return CpuSnapshot(
        time.monotonic(), _host_busy_s(_read(PROC_STAT)), t.user + t.system + t.children_user + t.children_system
    )


def _host_busy_s(stat: str | None) -> float | None:
    """Busy CPU seconds of every CPU since boot, from ``/proc/stat``'s first line."""
    if not stat:
        return None
    fields = stat.splitlines()[0].split()
    if fields[0] != "cpu" or len(fields) < 8:
        return None
    ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def other_cores(before: CpuSnapshot, after: CpuSnapshot, own_scale: float = 1.0) -> float | None:
    """Cores other processes used on average between two snapshots; None when unmeasurable.

    ``own_scale`` multiplies this process tree's CPU time: under torchrun the other local ranks are
    siblings, not children, so each rank counts its own time × the local ranks.
    """
    wall = after.wall_s - before.wall_s
    if before.host_busy_s is None or after.host_busy_s is None or wall <= 0:
        return None
    others = (after.host_busy_s - before.host_busy_s) - (after.own_s - before.own_s) * own_scale
    return round(max(0.0, others / wall), 2)


def busy(others: float | None, cpus: int, threads: int, ranks: int, device: str = "cpu") -> tuple[bool, str]:
    """Whether a run's timings are not comparable, and why in words ("" when not busy).

    CPU runs: ``threads`` per rank × ``ranks`` on this host exceed ``cpus``, or other processes used
    more than the cores the run left free plus ``SLACK_CORES`` (``others``, None: unmeasured).
    GPU runs, whose ranks' CPU threads mostly wait on the device: others used over half the cores.
    """
    if device != "cpu":
        taken = others is not None and others > cpus / 2
        return taken, f"other processes used {others:.1f} of {_cores(cpus)} during the run" if taken else ""
    reasons = []
    if threads * ranks > cpus:
        reasons.append(f"{ranks} ranks × {threads} threads on {_cores(cpus)}")
    free = max(0, cpus - threads * ranks)
    if others is not None and others > free + SLACK_CORES:
        reasons.append(f"other processes used {others:.1f} of {_cores(cpus)} during the run")
    return bool(reasons), ", ".join(reasons)


def _cores(n: int) -> str:
    return f"{n} core" + ("s" if n != 1 else "")


def record(
    load_before: list[float] | None,
    before: CpuSnapshot,
    threads: int,
    ranks: int,
    own_scale: float = 1.0,
    device: str = "cpu",
) -> dict:
    """The run record's ``"host"`` dict; call it right after the run (it reads the load and CPU time after)."""
    return {
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "cpu_count": cpu_count(),
        "threads_per_rank": threads,
        "ranks": ranks,
        "cpu_mhz": cpu_mhz(),
        "other_cpu_cores": other_cores(before, cpu_snapshot(), own_scale),
        "device": device,
    }


def judge(host: dict | None) -> tuple[bool, str]:
    """``busy`` applied to a run record's ``"host"`` dict (None: nothing recorded, not busy)."""
    if not host:
        return False, ""
    return busy(
        host.get("other_cpu_cores"),
        host["cpu_count"],
        host["threads_per_rank"],
        host["ranks"],
        host.get("device", "cpu"),
    )
