"""The host around a run: its load, cores, threads per rank and clock, and whether it was too busy to time.

Every run record carries ``"host"`` (``record``) and ``"host_busy"`` (``busy``), documented in
``results/README.md``. The decisions are pure functions of numbers (``busy``, ``threads_per_rank``,
``parse_cpu_mhz``); the readers of ``/proc`` and ``os`` around them are thin.

A host is busy when the 1-minute load average, read just before or just after the run, exceeds the
cores this process may use, or when the run's own threads (threads per rank × ranks on this host)
exceed them. Nothing is subtracted from the load: the reading after the run includes the run's own
ranks for the last minute, so a run that fills every core on an idle host reads about the core count,
and a reading above it means someone else wanted the cores too.
"""

from __future__ import annotations

import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
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


def busy(
    load_before: list[float] | None, load_after: list[float] | None, cpus: int, threads: int, ranks: int
) -> tuple[bool, str]:
    """Whether a run's timings are not comparable, and why in words ("" when not busy).

    Busy: the 1-minute load average before or after the run exceeds ``cpus``, or ``threads``
    per rank × ``ranks`` on this host exceed ``cpus``.
    """
    reasons = []
    high = {when: load[0] for when, load in (("before", load_before), ("after", load_after)) if load and load[0] > cpus}
    if len(high) == 2:
        reasons.append(f"load {high['before']:.1f} before and {high['after']:.1f} after the run, on {_cores(cpus)}")
    elif high:
        (when, load), *_ = high.items()
        reasons.append(f"load {load:.1f} on {_cores(cpus)} {when} the run")
    if threads * ranks > cpus:
        reasons.append(f"{ranks} ranks × {threads} threads on {_cores(cpus)}")
    return bool(reasons), ", ".join(reasons)


def _cores(n: int) -> str:
    return f"{n} core" + ("s" if n != 1 else "")


def record(load_before: list[float] | None, threads: int, ranks: int) -> dict:
    """The run record's ``"host"`` dict; call it right after the run (it reads the load after)."""
    return {
        "load_avg_before": load_before,
        "load_avg_after": load_avg(),
        "cpu_count": cpu_count(),
        "threads_per_rank": threads,
        "ranks": ranks,
        "cpu_mhz": cpu_mhz(),
    }


def judge(host: dict) -> tuple[bool, str]:
    """``busy`` applied to a run record's ``"host"`` dict."""
    return busy(
        host.get("load_avg_before"),
        host.get("load_avg_after"),
        host["cpu_count"],
        host["threads_per_rank"],
        host["ranks"],
    )
