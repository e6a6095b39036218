"""The host's state recorded with every run (``moebench/measure/host.py``), and the busy flag the table shows."""

from __future__ import annotations

import pytest

from moebench import runner
from moebench.measure import host
from moebench.report.results import render
from moebench.scenario import RunSpec


@pytest.mark.parametrize(
    ("others", "cpus", "threads", "ranks", "reason"),
    [
        (1.0, 2, 1, 2, "other processes used 1.0 of 2 cores during the run"),  # a CPU-bound neighbour
        (6.2, 2, 1, 1, "other processes used 6.2 of 2 cores during the run"),
        (0.0, 2, 2, 2, "2 ranks × 2 threads on 2 cores"),
        (2.0, 1, 2, 1, "1 ranks × 2 threads on 1 core, other processes used 2.0 of 1 core during the run"),
        (2.6, 4, 1, 2, "other processes used 2.6 of 4 cores during the run"),  # 2 cores free + 0.5 slack
    ],
)
def test_busy_when_others_take_cores_the_run_needs_or_own_threads_exceed_them(others, cpus, threads, ranks, reason):
    assert host.busy(others, cpus, threads, ranks) == (True, reason)


@pytest.mark.parametrize(
    ("cpus", "threads", "ranks", "others", "busy"),
    [
        (8, 2, 3, 2.4, False),  # 6 threads leave 2 cores free: 2.4 is within them and the slack
        (8, 2, 3, 2.6, True),  # 2 free + 0.5 slack exceeded (one rank's 2 threads would leave 6 free)
        (4, 1, 4, 0.6, True),  # 4 ranks × 1 thread leave no core free (one rank's would leave 3)
        (16, 4, 2, 8.4, False),  # 8 free
        (16, 4, 2, 8.6, True),
    ],
)
def test_the_cores_a_run_leaves_free_are_its_cores_less_every_ranks_threads(cpus, threads, ranks, others, busy):
    record = {"other_cpu_cores": others, "cpu_count": cpus, "threads_per_rank": threads, "ranks": ranks}
    reason = f"other processes used {others:.1f} of {cpus} cores during the run" if busy else ""
    assert host.busy(others, cpus, threads, ranks) == (busy, reason)
    assert host.judge(record) == (busy, reason)


def test_under_torchrun_the_sibling_ranks_cpu_time_is_the_runs_not_others(monkeypatch):
    monkeypatch.setattr(runner, "under_torchrun", lambda: True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(host, "cpu_count", lambda: 2)
    # 4 s of host CPU over 2 s; this rank used 2 s of it, so did its sibling (not our child): no one else ran
    monkeypatch.setattr(host, "cpu_snapshot", lambda: host.CpuSnapshot(2.0, 4.0, 2.0))
    run = runner._record_host({"device": "cpu"}, _spec(world=2), None, host.CpuSnapshot(0.0, 0.0, 0.0), 1)
    assert run["host"]["other_cpu_cores"] == 0.0 and run["host_busy"] is False


def test_gpu_runs_are_busy_only_when_others_take_over_half_the_cores():
    assert host.busy(0.4, 16, 16, 2, device="cuda") == (False, "")  # full thread pools: not counted on GPUs
    assert host.busy(9.0, 16, 16, 2, device="cuda") == (True, "other processes used 9.0 of 16 cores during the run")
    record = {"other_cpu_cores": 9.0, "cpu_count": 16, "threads_per_rank": 16, "ranks": 2, "device": "cuda"}
    assert host.judge(record) == (True, "other processes used 9.0 of 16 cores during the run")  # the table's reason


def test_not_busy_when_others_stay_within_the_free_cores_and_slack_or_are_unmeasured():
    assert host.busy(0.4, 2, 1, 2) == (False, "")  # background under half a core
    assert host.busy(2.4, 4, 1, 2) == (False, "")  # the run left 2 cores free
    assert host.busy(None, 4, 2, 2) == (False, "")  # no /proc/stat: judge the threads only


def test_other_cores_subtract_this_process_trees_cpu_time_from_the_hosts():
    before = host.CpuSnapshot(wall_s=10.0, host_busy_s=100.0, own_s=5.0)
    after = host.CpuSnapshot(wall_s=14.0, host_busy_s=112.0, own_s=13.0)  # 12 s busy, 8 of them ours, over 4 s
    assert host.other_cores(before, after) == 1.0
    assert host.other_cores(before, after, own_scale=1.5) == 0.0  # never negative
    assert host.other_cores(before, host.CpuSnapshot(14.0, None, 13.0)) is None


def test_host_busy_time_reads_proc_stat_without_idle_and_iowait(monkeypatch):
    monkeypatch.setattr(host.os, "sysconf", lambda name: 100)
    stat = "cpu  100 20 30 5000 400 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert host._host_busy_s(stat) == pytest.approx((100 + 20 + 30 + 6 + 7 + 8) / 100)
    assert host._host_busy_s(None) is None


def _readings(monkeypatch, stat: str, times: tuple[float, ...], wall_s: float) -> None:
    """Fabricated /proc/stat, os.times and clock readings (clock ticks: 100 per second)."""
    monkeypatch.setattr(host.os, "sysconf", lambda name: 100)
    monkeypatch.setattr(host, "_read", lambda path: stat if path == host.PROC_STAT else None)
    monkeypatch.setattr(host.os, "times", lambda: host.os.times_result(times))
    monkeypatch.setattr(host.time, "monotonic", lambda: wall_s)


def test_a_cpu_snapshot_counts_the_hosts_busy_time_and_this_process_tree_ranks_included(monkeypatch):
    # fabricated readings, so the measurement is judged whatever else this machine runs
    # /proc/stat: user nice system idle iowait irq softirq steal; os.times: user system children_user children_system
    _readings(monkeypatch, "cpu  600 0 400 9000 50 0 0 0 0 0\n", (1.0, 0.5, 3.0, 1.5, 0.0), 10.0)
    before = host.cpu_snapshot()
    _readings(monkeypatch, "cpu  1400 0 800 9500 90 0 0 0 0 0\n", (2.0, 1.0, 7.0, 2.0, 0.0), 14.0)
    after = host.cpu_snapshot()
    assert before == host.CpuSnapshot(wall_s=10.0, host_busy_s=10.0, own_s=6.0)  # children: the ranks waited for
    assert after == host.CpuSnapshot(wall_s=14.0, host_busy_s=22.0, own_s=12.0)
    assert host.other_cores(before, after) == 1.5  # (12 s busy − 6 s ours) over 4 s


@pytest.mark.parametrize(
    ("world_size", "requested", "cpus", "threads"),
    [(1, 0, 8, 8), (2, 0, 8, 4), (3, 0, 8, 2), (4, 0, 2, 1), (2, 0, 1, 1), (2, 3, 2, 3), (1, 1, 64, 1)],
)
def test_threads_per_rank_share_the_cores_unless_requested(world_size, requested, cpus, threads):
    assert host.threads_per_rank(world_size, requested, cpus) == threads
    if not requested and world_size <= cpus:  # the default never oversubscribes the host by itself
        assert not host.busy(None, cpus, threads, world_size)[0]


def test_threads_per_rank_defaults_to_the_cpus_this_process_may_use(monkeypatch):
    monkeypatch.setattr(host, "cpu_count", lambda: 6)
    assert host.threads_per_rank(2) == 3


def test_cpu_mhz_is_the_mean_of_cpuinfo_else_the_scaling_frequency_else_none():
    cpuinfo = "processor\t: 0\ncpu MHz\t\t: 2000.000\nprocessor\t: 1\ncpu MHz\t\t: 3000.5\nflags\t: fpu"
    assert host.parse_cpu_mhz(cpuinfo, "1200000\n") == 2500.2
    assert host.parse_cpu_mhz("processor\t: 0\n", "1200000\n") == 1200.0  # kHz in sysfs
    assert host.parse_cpu_mhz(None, None) is None
    assert host.parse_cpu_mhz("cpu MHz : n/a", "unknown") is None


def _spec(world: int, threads: int = 0) -> RunSpec:
    return RunSpec(
        path="t.toml",
        scenario={"name": "t", "kind": "latency", "description": "", "warmup": 0, "repeats": 1},
        model={},
        routing={},
        parallel={"world_size": world, "device": "cpu", "backend": "gloo", "threads_per_rank": threads},
        workload={},
        slos=(),
    )


def _failing_launch(*args, **kwargs):
    raise RuntimeError("no ranks in this test")


def test_every_run_records_the_host_and_is_flagged_busy_under_load(monkeypatch):
    monkeypatch.setattr(runner, "launch", _failing_launch)
    monkeypatch.setattr(host, "cpu_count", lambda: 2)
    monkeypatch.setattr(host, "cpu_mhz", lambda: 2596.1)
    loads = iter([[6.2, 6.0, 5.5], [7.1, 6.2, 5.6]])
    monkeypatch.setattr(host, "load_avg", lambda: next(loads))
    snapshots = iter([host.CpuSnapshot(0.0, 0.0, 0.0), host.CpuSnapshot(2.0, 5.0, 1.0)])  # others: 2 cores
    monkeypatch.setattr(host, "cpu_snapshot", lambda: next(snapshots))
    run = runner.run_one(_spec(world=2), None)
    assert run["status"] == "error"  # recorded whether or not the run finished
    assert run["host"] == {
        "load_avg_before": [6.2, 6.0, 5.5],
        "load_avg_after": [7.1, 6.2, 5.6],
        "cpu_count": 2,
        "threads_per_rank": 1,  # 2 cores // 2 ranks
        "ranks": 2,
        "cpu_mhz": 2596.1,
        "other_cpu_cores": 2.0,
        "device": "cpu",
    }
    assert run["host_busy"] is True


def test_a_quiet_host_is_not_flagged_but_requested_threads_that_oversubscribe_it_are(monkeypatch):
    monkeypatch.setattr(runner, "launch", _failing_launch)
    monkeypatch.setattr(host, "cpu_count", lambda: 4)
    monkeypatch.setattr(host, "other_cores", lambda *args: 0.1)
    quiet = runner.run_one(_spec(world=2), None)
    assert quiet["host"]["threads_per_rank"] == 2 and quiet["host_busy"] is False
    crowded = runner.run_one(_spec(world=2, threads=3), None)  # [parallel] threads_per_rank = 3: 6 threads
    assert crowded["host"]["threads_per_rank"] == 3 and crowded["host_busy"] is True


def _doc(runs: list[dict]) -> dict:
    return {
        "source": "x.toml",
        "scenario": {"scenario": {"name": "x", "kind": "latency"}},
        "environment": {},
        "runs": runs,
    }


def _run(others: float | None) -> dict:
    record = {"load_avg_before": [2.0, 1, 1], "load_avg_after": [0.5, 1, 1], "cpu_count": 2}
    record |= {"threads_per_rank": 1, "ranks": 1, "cpu_mhz": None, "other_cpu_cores": others}
    return {
        "params": {},
        "world_size": 1,
        "device": "cpu",
        "backend": "gloo",
        "status": "ok",
        "metrics": {},
        "checks": [],
        "slo": [],
        "host": record,
        "host_busy": host.judge(record)[0],
    }


def test_the_table_says_in_one_line_when_and_why_the_host_was_busy():
    note = "  host busy in 1 of 2 runs: other processes used 6.2 of 2 cores during the run; timings are not comparable"
    assert render(_doc([_run(0.4), _run(6.2)])).splitlines()[-1] == note
    assert "host busy: other processes used 6.2" in render(_doc([_run(6.2)]))  # every run: no count
    assert "host busy" not in render(_doc([_run(0.4)]))
    old = _run(0.4)
    del old["host"], old["host_busy"]  # result files from before the host was recorded
    assert "host busy" not in render(_doc([old]))
