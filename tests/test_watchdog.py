"""The launcher's watchdog (moebench/launch/watchdog.py): heartbeats, a hung or crashed rank named, and
every rank of the run gone afterwards."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moebench.launch.spawn import launch
from moebench.launch.watchdog import BEAT, Monitor, RankFailure


def test_beats_split_anywhere_are_read_whole_and_the_least_advanced_silent_rank_is_named():
    m = Monitor(3, timeout_s=2.0, startup_s=10.0)
    data = BEAT.pack(4, 1) + BEAT.pack(5, 0)
    m.feed(0, data[:7])
    m.feed(0, data[7:20])
    assert (m.last[0].step, m.last[0].layer) == (4, 1)
    m.feed(0, data[20:])
    assert (m.last[0].step, m.last[0].layer) == (5, 0)
    m.feed(1, BEAT.pack(5, 1))  # rank 2 never beats: it has the startup allowance
    now = m.last[1].at
    assert m.verdict([0, 1, 2], now=now + 1.0) is None
    assert m.wait_s([0, 1, 2], now=now + 1.0) == pytest.approx(1.0, abs=0.1)
    hung = m.verdict([0, 1, 2], now=now + 2.5)
    assert isinstance(hung, RankFailure) and (hung.rank, hung.how, hung.step, hung.layer) == (0, "hung", 5, 0)
    assert "rank 0 hung (last heartbeat at step 5, layer 0" in str(hung)
    stopped = m.verdict([0, 1, 2], now=now + 2.5, stopped=frozenset({1}))
    assert stopped.rank == 1  # the OS says it is stopped: named before a less advanced rank
    # the stopped rank beat last, so it is not overdue yet when the peer that waits for it is
    # (the soak's case: 4 ranks, the peer reached the layer first): it is still the one named
    m.feed(1, BEAT.pack(6, 1))
    m.last[0] = type(m.last[0])(6, 1, m.last[1].at - 0.5)
    waiting = m.verdict([0, 1, 2], now=m.last[0].at + 2.1, stopped=frozenset({1}))
    assert (waiting.rank, waiting.step, waiting.layer) == (1, 6, 1)
    assert m.verdict([0, 1, 2], now=m.last[0].at + 2.1).rank == 0  # without the OS's word: the overdue one
    late = m.verdict([2], now=m.last[2].at + 10.5)
    assert late.rank == 2 and late.step == -1 and "before its first heartbeat" in str(late)


def _faulty(ctx, fault: str, at_step: int, pid_dir: str) -> str:
    """Steps of two beats around an all-reduce; rank 1 injects ``fault`` at ``at_step``."""
    Path(pid_dir, str(ctx.rank)).write_text(str(os.getpid()))
    t = torch.ones(1)
    for step in range(200):
        if ctx.rank == 1 and step == at_step:
            if fault == "hang":
                os.kill(os.getpid(), signal.SIGSTOP)  # before this step's first beat
            elif fault == "crash":
                os._exit(3)
            elif fault == "raise":
                raise ValueError("a planted error")
        ctx.beat(step, 0)
        dist.all_reduce(t, group=ctx.group)
        ctx.beat(step, 1)
        time.sleep(0.005)
    return "done"


def _gone(pid_dir: Path) -> list[bool]:
    out = []
    for f in sorted(pid_dir.iterdir()):
        try:
            os.kill(int(f.read_text()), 0)
            out.append(False)
        except ProcessLookupError:
            out.append(True)
    return out


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("fault", "how", "detail"),
    [("hang", "hung", ""), ("crash", "crashed", ": exited with code 3"), ("raise", "failed", ": ValueError")],
)
def test_a_faulty_rank_is_named_with_its_last_heartbeat_and_no_rank_is_left(tmp_path, fault, how, detail):
    start = time.monotonic()
    with pytest.raises(RankFailure) as err:
        launch(_faulty, 2, fault, 5, str(tmp_path), device="cpu", backend="gloo", watchdog_s=2.0)
    took = time.monotonic() - start
    failure = err.value
    assert (failure.rank, failure.how) == (1, how)
    assert (failure.step, failure.layer) == (4, 1)  # the last beat before step 5's fault
    assert detail in str(failure)
    assert took < 30 and (fault != "hang" or failure.silent_s >= 2.0)
    assert _gone(tmp_path) == [True, True]  # both ranks killed and reaped, the stopped one too


@pytest.mark.multiproc
def test_a_run_that_beats_is_left_alone_and_answers():
    assert launch(_faulty, 2, "none", 0, "/tmp", device="cpu", backend="gloo", watchdog_s=2.0) == ["done", "done"]
