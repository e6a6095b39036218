"""``scripts/gpu-check`` on a host without a GPU: its syntax, its dry run (every step's command, every module
it runs answering ``--help``), its one-line refusal without CUDA, and its bookkeeping under a stand-in python."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "gpu-check"
STEPS = ["pytest-gpu", "default-cuda", "multigpu", "telemetry", "experts"]
# Sweep scenarios (scenarios/sweeps) the default-cuda step leaves out, and why (the script's header says the same).
LEFT_OUT = {
    "faults.toml": "faults on rank 1",
    "failover.toml": "masks rank 1",
    "resume.toml": "crashes rank 1",
    "offload-ep2.toml": "= offload at W=1",
    "overlap-ep4.toml": "= overlap",
}


def _bash(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
    )


def _dry_run(tmp_path: Path) -> dict[str, str]:
    done = _bash(str(tmp_path / "out"), env={"GPU_CHECK_DRY_RUN": "1"})
    assert done.returncode == 0, done.stderr
    lines = dict(re.match(r"(\S+) \(timeout (\d+)s\): (.*)", line).group(1, 3) for line in done.stdout.splitlines())
    return lines


def test_the_script_is_executable_bash_with_strict_mode_and_valid_syntax():
    assert os.access(SCRIPT, os.X_OK)
    assert "set -euo pipefail" in SCRIPT.read_text()
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_lists_every_step_and_runs_nothing(tmp_path):
    commands = _dry_run(tmp_path)
    assert list(commands) == STEPS
    assert commands["pytest-gpu"].endswith("-m pytest -q -p no:cacheprovider -m gpu tests/")
    assert "-m moebench run" in commands["default-cuda"] and "--device cuda --world-size 1" in commands["default-cuda"]
    multigpu = commands["multigpu"]
    assert "-m torch.distributed.run --standalone --nproc-per-node=1 -m moebench run scenarios/multigpu" in multigpu
    assert (
        "--dtype bfloat16" in commands["experts"] and "-m moebench.tools.gpu_telemetry_check" in commands["telemetry"]
    )
    assert not (tmp_path / "out").exists()


def test_timeouts_add_up_to_under_eight_minutes(tmp_path):
    done = _bash(str(tmp_path), env={"GPU_CHECK_DRY_RUN": "1"})
    limits = [int(s) for s in re.findall(r"\(timeout (\d+)s\)", done.stdout)]
    assert len(limits) == len(STEPS) and sum(limits) + 20 <= 8 * 60  # + the kill grace of one step


@pytest.mark.slow
def test_every_module_the_steps_run_answers_help(tmp_path):
    modules = sorted({m for cmd in _dry_run(tmp_path).values() for m in re.findall(r"-m ([\w.]+)", cmd)} - {"gpu"})
    assert modules == [
        "moebench",
        "moebench.tools.bench_experts",
        "moebench.tools.gpu_telemetry_check",
        "pytest",
        "torch.distributed.run",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for module in modules:
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, cwd=REPO
        )
        assert done.returncode == 0, (module, done.stderr[-500:])
    run_help = subprocess.run(
        [sys.executable, "-m", "moebench", "run", "--help"], capture_output=True, text=True, env=env
    )
    assert "--device" in run_help.stdout and "--world-size" in run_help.stdout


def test_the_default_step_runs_every_sweep_scenario_but_the_documented_ones(tmp_path):
    command = _dry_run(tmp_path)["default-cuda"]
    listed = {Path(p).name for p in re.findall(r"scenarios/sweeps/[\w.-]+\.toml", command)}
    shipped = {p.name for p in (REPO / "scenarios" / "sweeps").glob("*.toml")}
    assert listed == shipped - LEFT_OUT.keys()  # a new top-level scenario must be added or left out on purpose
    header = SCRIPT.read_text()
    assert all(name in header for name in LEFT_OUT)


def test_the_default_step_checks_overlapped_chunks_against_fp64_on_cuda(tmp_path):
    """Chunked all-to-alls race only on a GPU's streams: the CUDA step must run an equivalence scenario
    with overlap_chunks > 1, which the equivalence kind runs on the collective path at world size 1."""
    from moebench.kinds import equivalence
    from moebench.scenario import load

    command = _dry_run(tmp_path)["default-cuda"]
    assert "scenarios/sweeps/equivalence-overlap.toml" in command.split() and "--world-size 1" in command
    runs = load(REPO / "scenarios" / "sweeps" / "equivalence-overlap.toml", {("parallel", "world_size"): 1}).runs
    assert {s.kind for s in runs} == {"equivalence"}
    chunked = [equivalence.case(s) for s in runs if s.parallel["overlap_chunks"] > 1]
    assert chunked and all(c.dispatcher == "all_to_all" for c in chunked)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA device")
def test_without_cuda_it_fails_fast_in_one_line_and_writes_nothing(tmp_path):
    done = _bash(str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no CUDA device visible" in done.stderr
    assert not (tmp_path / "out").exists()


STUB = """#!/usr/bin/env bash
# A python3 stand-in: says CUDA is there, fails the telemetry step, writes a result file per run.
echo "$*" >>"$STUB_CALLS"
case "$*" in
  "-c "*) echo "Stub GPU | torch 0 | CUDA 0" ;;
  *gpu_telemetry_check*) echo "PROBLEM: planted"; exit 1 ;;
  *"moebench report"*) echo "| stub table of $4 |" ;;
  *"moebench run"*) out="${@: -1}"; mkdir -p "$out"; echo '{}' >"$out/demo.json" ;;
  *pytest*) echo "11 passed in 1.0s" ;;
esac
exit 0
"""


def test_a_failing_step_is_recorded_the_rest_still_run_and_the_exit_is_1(tmp_path):
    stub = tmp_path / "python3"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    done = _bash(str(out), env={"PYTHON": str(stub), "STUB_CALLS": str(calls)})
    assert done.returncode == 1, done.stdout + done.stderr
    summary = (out / "summary.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| \d (\S+) \| ([^|]+?) \|", summary, re.M)}
    assert rows == {s: ("FAILED (exit 1)" if s == "telemetry" else "ok") for s in STEPS}
    assert "11 passed" in summary and "PROBLEM: planted" in summary
    assert f"| stub table of {out}/detail/default-cuda |" in summary  # the run's table, re-rendered
    ran = calls.read_text()
    assert "bench_experts" in ran  # the step after the failing one ran
    with tarfile.open(out / "detail.tar.gz") as tar:
        names = tar.getnames()
    assert "detail/default-cuda/demo.json" in names and "detail/4-telemetry.log" in names
    assert "a step FAILED" in (out / "gpu-check.log").read_text()
