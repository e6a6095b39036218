"""The harness pieces the suite leans on: timing statistics, the launcher, and the CLI."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from moebench.cli import main
from moebench.launch import launch, resolve_device
from moebench.timing import Timing, time_fn


def test_timing_summary_uses_nearest_rank_percentiles_and_population_cv():
    t = Timing(tuple(float(v) for v in range(1, 11)))
    assert t.median == 5.5
    assert t.percentile(90) == 9.0 and t.percentile(99) == 10.0 and t.percentile(50) == 5.0
    assert t.cv == pytest.approx(np.sqrt(8.25) / 5.5)


def test_time_fn_discards_warmup_and_times_each_repeat():
    calls = []

    def step():
        calls.append(time.perf_counter())
        time.sleep(0.002 if len(calls) <= 2 else 0.01)

    t = time_fn(step, warmup=2, repeats=3, device=torch.device("cpu"))
    assert len(calls) == 5 and len(t.samples_s) == 3
    assert all(0.009 < s < 0.5 for s in t.samples_s)


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


@pytest.mark.multiproc
def test_cli_demo_prints_a_checked_row_per_world_size(capsys):
    argv = ["demo", "--world-sizes", "1", "2", "--tokens-per-rank", "64", "--warmup", "1", "--repeats", "2"]
    assert main([*argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[2], r[-1]) for r in rows] == [("1", "gloo", "64", "ok"), ("2", "gloo", "64", "ok")]
    assert all(float(r[-2]) <= 1e-5 for r in rows)  # max relative error vs fp64


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--repeats", "0"], "--repeats = 0"),
        (["demo", "--world-sizes", "0"], "--world-sizes = [0]"),
        (["demo", "--device", "cuda"] if not torch.cuda.is_available() else ["demo", "--warmup", "0"], "accepted"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.multiproc
@pytest.mark.slow
def test_demo_runs_unchanged_under_torchrun_and_prints_once():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "moebench"]
    cmd += [
        "demo",
        "--world-sizes",
        "2",
        "--device",
        "cpu",
        "--tokens-per-rank",
        "64",
        "--warmup",
        "1",
        "--repeats",
        "2",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == 1 and rows[0][0] == "2" and rows[0][-1] == "ok"
