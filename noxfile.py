"""Developer sessions. ``nox -l`` lists them; ``nox -s NAME -- ARGS`` passes ARGS through.

Session virtualenvs see the system's site-packages, so an already-installed torch (your CUDA
build, or the CPU build) is reused and never downloaded again. Only when no torch is importable
does a session install one: ``$MOEBENCH_TORCH`` (default ``torch==2.13.0``, which on this
project's CPU machines resolves to the local CPU wheel).
"""

from __future__ import annotations

import os
import shutil

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH_SPEC = os.environ.get("MOEBENCH_TORCH", "torch==2.13.0")
VENV = {"venv_params": ["--system-site-packages"]}


def _install(session: nox.Session, extras: str = "") -> None:
    """Install moebench (editable), installing torch first only if none is importable."""
    found = session.run(
        "python", "-c", "import importlib.util as u; print(u.find_spec('torch') is not None)", silent=True
    )
    if found.strip() != "True":
        session.log(f"no torch importable: installing {TORCH_SPEC}")
        session.install(TORCH_SPEC)
    session.install("-e", f".{extras}")


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The CPU test suite (multi-rank tests run on gloo; `gpu` tests skip without CUDA).

    It asserts logic, never this host's speed: the `timing` tests skip here (`nox -s regress` runs them).
    """
    _install(session, "[test]")
    # The venv's python, even if pytest is a system install; timing tests off even if the caller's shell set them on.
    session.run("python", "-m", "pytest", *session.posargs, env={"MOEBENCH_TIMING_TESTS": "0"})


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(**VENV)
def bench(session: nox.Session) -> None:
    """The default scenario set (scenarios/*.toml) on this host: GPUs where a run fits, else gloo ranks."""
    _install(session)
    session.run("python", "-m", "moebench", "run", "scenarios", *session.posargs)


@nox.session(**VENV)
def regress(session: nox.Session) -> None:
    """The regression gate: run scenarios/regress on CPU, compare with the committed baseline, then
    run the tests that time real code (marked `timing`: the A/A runs and the planted slowdown).

    Exit 1 on a regression. The markdown summary goes to $MOEBENCH_REGRESS_MD when set (CI logs);
    the results stay in results/runs/regress-<time>/ for `moebench baseline update`. Arguments
    after `--` go to `moebench compare`.
    """
    _install(session, "[test]")
    out = session.run("python", "-c", "from moebench.runner import default_out_dir as d; print(d())", silent=True)
    out = out.strip().splitlines()[-1].replace("/runs/", "/runs/regress-")
    session.run("python", "-m", "moebench", "run", "scenarios/regress", "--out", out, "--no-telemetry")
    baseline = session.run("python", "-m", "moebench", "baseline", "path", out, silent=True).strip().splitlines()[-1]
    if not os.path.isdir(baseline):
        session.error(f"no committed baseline {baseline} for this machine class: see README, 'Baselines'")
    markdown = ["--markdown", os.environ["MOEBENCH_REGRESS_MD"]] if os.environ.get("MOEBENCH_REGRESS_MD") else []
    session.run("python", "-m", "moebench", "compare", baseline, out, *markdown, *session.posargs)
    session.run("python", "-m", "pytest", "-m", "timing", env={"MOEBENCH_TIMING_TESTS": "1"})


@nox.session(name="bench-multigpu", default=False, **VENV)
def bench_multigpu(session: nox.Session) -> None:
    """The multi-GPU set (scenarios/multigpu) with one rank per visible GPU over NCCL, under torchrun.

    On a host without CUDA it runs the same scenarios on 2 gloo ranks, with fewer repeats, and says so.
    """
    _install(session)
    gpus = int(session.run("python", "-c", "import torch; print(torch.cuda.device_count())", silent=True).strip())
    if gpus == 0:
        session.log("no CUDA device visible: running scenarios/multigpu on 2 CPU gloo ranks (2 warm-up, 3 repeats)")
        cpu = ["--device", "cpu", "--world-size", "2", "--warmup", "2", "--repeats", "3"]
        session.run("python", "-m", "moebench", "run", "scenarios/multigpu", *cpu, *session.posargs)
        return
    torchrun = shutil.which("torchrun", path=os.path.join(session.virtualenv.location, "bin")) or "torchrun"
    session.log(f"{gpus} CUDA device(s): one NCCL rank per GPU under torchrun")
    session.run(
        torchrun,
        "--standalone",
        f"--nproc-per-node={gpus}",
        "-m",
        "moebench",
        "run",
        "scenarios/multigpu",
        "--world-size",
        str(gpus),
        "--device",
        "cuda",
        *session.posargs,
        external=True,
    )
