"""The harness pieces the suite leans on: timing statistics and the launcher."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moebench.launch.spawn import launch, resolve_device
from moebench.measure.timing import Timing, time_fn


def test_timing_summary_uses_nearest_rank_percentiles_and_population_cv():
    t = Timing(tuple(float(v) for v in range(1, 11)))
    assert t.median == 5.5
    # LoadGen's nearest rank, sorted[floor(n·p)]: p50 of 1..10 is the 6th value, p90 the 10th.
    assert t.percentile(50) == 6.0 and t.percentile(90) == 10.0 and t.percentile(99) == 10.0
    assert Timing(tuple(float(v) for v in range(1, 101))).percentile(99) == 100.0
    assert Timing((3.0, 1.0, 2.0, 7.0, 5.0, 4.0, 6.0)).percentile(10) == 1.0  # floor(0.7) = 0
    assert t.cv == pytest.approx(np.sqrt(8.25) / 5.5)


def test_timing_median_is_the_middle_sample_of_a_skewed_sample_not_the_mean():
    t = Timing((0.9, 1.0, 1.1, 1.2, 9.0))  # one slow outlier: mean 2.64
    assert t.median == 1.1
    assert Timing((4.0, 1.0, 2.0, 30.0)).median == 3.0  # even count: mean of the middle two


def test_time_fn_discards_warmup_and_times_each_repeat():
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.002 if len(calls) <= 2 else 0.01)

    t = time_fn(step, warmup=2, repeats=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(t.samples_s) == 3
    assert all(0.009 < s < 2.0 for s in t.samples_s)  # the lower bound proves the 2 ms warm-ups are not timed


def _rank_worker(ctx, slow_rank: int) -> dict:
    def step():
        time.sleep(0.03 if ctx.rank == slow_rank else 0.001)

    timing = time_fn(step, warmup=1, repeats=3, device=ctx.device, group=ctx.group)
    return {"rank": ctx.rank, "world": ctx.world_size, "samples": timing.samples_s}


@pytest.mark.multiproc
def test_launch_returns_rank_ordered_results_and_time_fn_takes_the_slowest_rank():
    results = launch(_rank_worker, 2, 1, device="cpu", backend="gloo")
    assert [r["rank"] for r in results] == [0, 1] and {r["world"] for r in results} == {2}
    assert results[0]["samples"] == results[1]["samples"]  # every rank sees the max
    assert min(results[0]["samples"]) >= 0.03  # rank 1's sleep, not rank 0's


def _failing_worker(ctx):
    raise RuntimeError(f"planted failure on rank {ctx.rank}")


@pytest.mark.multiproc
def test_launch_raises_when_a_rank_fails():
    with pytest.raises(Exception, match="planted failure on rank"):
        launch(_failing_worker, 2, device="cpu", backend="gloo")


def test_nccl_and_cuda_choices_are_refused_with_a_reason_on_cpu():
    with pytest.raises(ValueError, match="backend = 'nccl' needs device = 'cuda'"):
        resolve_device("cpu", "nccl")
    assert resolve_device("cpu", "auto") == ("cpu", "gloo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            resolve_device("cuda", "auto")


TORCHRUN_SCRIPT = r"""
import sys
from moebench.launch.spawn import launch

def fail_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("planted failure")
    return ctx.rank

for attempt in range(2):  # the job survives a failed launch: both ranks go on to the next one
    try:
        sys.stdout.write(f"ok {launch(lambda ctx: ctx.rank * 10, 2, device='cpu')}\n")  # one write per line
        launch(fail_on_rank_1, 2, device="cpu")
    except RuntimeError as err:
        sys.stdout.write(f"raised: {err}\n")
    sys.stdout.flush()
"""


@pytest.mark.multiproc
@pytest.mark.slow
def test_under_torchrun_a_failure_on_one_rank_raises_on_every_rank_and_the_job_goes_on(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("ok [0, 10]") == 4  # 2 ranks x 2 attempts
    assert proc.stdout.count("raised: rank 1: ValueError: planted failure") == 4
