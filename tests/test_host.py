"""The host's state recorded with every run (``moebench/host.py``), and the busy flag the table shows."""

from __future__ import annotations

import pytest

from moebench import host, runner
from moebench.results import render
from moebench.scenario import RunSpec


@pytest.mark.parametrize(
    ("before", "after", "cpus", "threads", "ranks", "reason"),
    [
        ([6.2, 5.0, 4.0], [1.0, 1.0, 1.0], 2, 1, 2, "load 6.2 on 2 cores before the run"),
        ([0.5, 0.5, 0.5], [2.5, 1.0, 1.0], 2, 1, 2, "load 2.5 on 2 cores after the run"),
        ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 2, 2, 2, "2 ranks × 2 threads on 2 cores"),
        ([3.0, 0, 0], [4.5, 0, 0], 1, 1, 1, "load 3.0 before and 4.5 after the run, on 1 core"),
        ([3.0, 0, 0], [0.5, 0, 0], 1, 2, 1, "load 3.0 on 1 core before the run, 1 ranks × 2 threads on 1 core"),
    ],
)
def test_busy_when_load_or_own_threads_exceed_the_cores(before, after, cpus, threads, ranks, reason):
    assert host.busy(before, after, cpus, threads, ranks) == (True, reason)


def test_not_busy_at_exactly_the_core_count_or_without_load_figures():
    assert host.busy([2.0, 2.0, 2.0], [2.0, 2.0, 2.0], 2, 1, 2) == (False, "")  # a full host, not an overfull one
    assert host.busy(None, None, 4, 2, 2) == (False, "")  # no load average on this OS: judge the threads only
    assert host.busy([9.0, 9.0, 9.0], None, 16, 1, 1) == (False, "")


@pytest.mark.parametrize(
    ("world_size", "requested", "cpus", "threads"),
    [(1, 0, 8, 8), (2, 0, 8, 4), (3, 0, 8, 2), (4, 0, 2, 1), (2, 0, 1, 1), (2, 3, 2, 3), (1, 1, 64, 1)],
)
def test_threads_per_rank_share_the_cores_unless_requested(world_size, requested, cpus, threads):
    assert host.threads_per_rank(world_size, requested, cpus) == threads
    if not requested and world_size <= cpus:  # the default never oversubscribes the host by itself
        assert not host.busy(None, None, cpus, threads, world_size)[0]


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
    run = runner.run_one(_spec(world=2), None)
    assert run["status"] == "error"  # recorded whether or not the run finished
    assert run["host"] == {
        "load_avg_before": [6.2, 6.0, 5.5],
        "load_avg_after": [7.1, 6.2, 5.6],
        "cpu_count": 2,
        "threads_per_rank": 1,  # 2 cores // 2 ranks
        "ranks": 2,
        "cpu_mhz": 2596.1,
    }
    assert run["host_busy"] is True


def test_a_quiet_host_is_not_flagged_but_requested_threads_that_oversubscribe_it_are(monkeypatch):
    monkeypatch.setattr(runner, "launch", _failing_launch)
    monkeypatch.setattr(host, "cpu_count", lambda: 4)
    monkeypatch.setattr(host, "load_avg", lambda: [0.3, 0.2, 0.1])
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


def _run(load: float | None) -> dict:
    record = {"load_avg_before": [load, 1, 1], "load_avg_after": [0.5, 1, 1], "cpu_count": 2}
    record |= {"threads_per_rank": 1, "ranks": 1, "cpu_mhz": None}
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
    note = "  host busy in 1 of 2 runs: load 6.2 on 2 cores before the run; timings are not comparable"
    assert render(_doc([_run(0.4), _run(6.2)])).splitlines()[-1] == note
    assert "host busy: load 6.2" in render(_doc([_run(6.2)]))  # every run: no count
    assert "host busy" not in render(_doc([_run(0.4)]))
    old = _run(0.4)
    del old["host"], old["host_busy"]  # result files from before the host was recorded
    assert "host busy" not in render(_doc([old]))
