"""Developer sessions. ``nox -l`` lists them; ``nox -s NAME -- ARGS`` passes ARGS through.

Sessions reuse the torch of the environment nox runs from, so a torch you already installed (your
CUDA build, or the CPU build) is never downloaded again: the session virtualenvs are made from that
environment's interpreter (the activated virtualenv or conda env, else nox's own) and see the
system site-packages; when that environment is itself a virtualenv, a ``.pth`` file makes its
site-packages visible too (a virtualenv's "system" site-packages are its base interpreter's, not
its own). Only when no torch is found does a session install one: ``$MOEBENCH_TORCH`` (default
``torch==2.13.0``, which on this project's CPU machines resolves to the local CPU wheel).

Everything else a session installs is pinned by ``constraints/test.txt`` (pytest, hypothesis, matplotlib,
ruff, ...): pip installs those versions into the session venv even where the base interpreter, seen
through the system site-packages, holds others, so a run never depends on what the base holds.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import nox

nox.options.sessions = ["tests", "slow", "lint"]
nox.options.reuse_existing_virtualenvs = True

TORCH_SPEC = os.environ.get("MOEBENCH_TORCH", "torch==2.13.0")
CONSTRAINTS = ("-c", "constraints/test.txt")  # the test toolchain's pinned versions, for every session.install
UNIT = "not slow and not timing"  # the unit suite's marker expression; `nox -s slow` runs the slow rest
OUTER_PTH = "_moebench_outer_env.pth"  # in the session venv's site-packages: the outer env's site-packages
PROBE = (  # what an interpreter answers about itself, as JSON
    "import importlib.util, json, sys, sysconfig; p = sysconfig.get_paths(); t = importlib.util.find_spec('torch'); "
    "print(json.dumps({'venv': sys.prefix != sys.base_prefix, 'base': sys.base_prefix, "
    "'torch': t and t.origin, 'site': sorted({p['purelib'], p['platlib']})}))"
)


def outer_python(environ=os.environ, executable: str = sys.executable) -> str:
    """The interpreter of the environment nox runs from: the activated virtualenv or conda env, else nox's own."""
    for var in ("VIRTUAL_ENV", "CONDA_PREFIX"):
        if environ.get(var):
            for folder in ("bin", "Scripts"):
                python = shutil.which("python", path=os.path.join(environ[var], folder))
                if python:
                    return python
    return executable


def torch_source(outer: dict, session: dict) -> tuple[str, list[str]]:
    """Where a session gets torch, from the ``PROBE`` answers of the outer interpreter and the session's.

    - ("stale", []): the session venv was made from another base interpreter (nox reuses venvs).
    - ("outer", site dirs): the outer env is a virtualenv with torch: put its site-packages on the
      session's path, ahead of the base interpreter's, so its torch wins over one in the base.
    - ("session", []): the session imports torch already (the base's, through system site-packages).
    - ("install", []): no torch anywhere.
    """
    if os.path.realpath(outer["base"]) != os.path.realpath(session["base"]):
        return "stale", []
    if outer["venv"] and outer["torch"]:
        return "outer", outer["site"]
    return ("session", []) if session["torch"] else ("install", [])


def session_torch_is_own(session: dict) -> bool:
    """The session venv has a torch installed in its own site-packages (not seen through the base's)."""
    return bool(session["torch"]) and any(session["torch"].startswith(os.path.join(d, "")) for d in session["site"])


OUTER_PYTHON = outer_python()
VENV = {"python": OUTER_PYTHON, "venv_params": ["--system-site-packages"]}


def _probe(session: nox.Session, python: str = "python") -> dict:
    return json.loads(session.run(python, "-c", PROBE, silent=True, external=True).strip().splitlines()[-1])


def _install(session: nox.Session, extras: str = "") -> None:
    """Install moebench (editable) on the torch of the environment nox runs from; install torch only if none."""
    pth = os.path.join(_probe(session)["site"][0], OUTER_PTH)
    if os.path.exists(pth):
        os.remove(pth)  # decide afresh: the outer environment may have changed since the venv was made
    session_env = _probe(session)
    source, site = torch_source(_probe(session, OUTER_PYTHON), session_env)
    if source == "stale":
        session.error(
            f"{session.virtualenv.location} was made from another Python than {OUTER_PYTHON}, which nox runs "
            "from now: rerun with -N (--no-reuse-existing-virtualenvs) to make it afresh"
        )
    if source == "outer":
        if session_torch_is_own(session_env):  # one installed here before, when nox ran from elsewhere
            session.run("python", "-m", "pip", "uninstall", "--yes", "torch", silent=True)
        with open(pth, "w") as f:
            f.write("\n".join(site) + "\n")
    if source == "install":
        session.log(f"no torch importable: installing {TORCH_SPEC}")
        session.install(TORCH_SPEC)
    else:
        session.log(f"reusing torch from {os.path.dirname(_probe(session)['torch'])}")
    session.install(*CONSTRAINTS, "-e", f".{extras}")


@nox.session(**VENV)
def tests(session: nox.Session) -> None:
    """The unit suite on CPU (multi-rank tests run on gloo; `gpu` tests skip without CUDA).

    It asserts logic, never this host's speed, and leaves out the long end-to-end runs (marked `slow`:
    `nox -s slow` runs them) and the `timing` tests (`nox -s regress` runs them). The `plots` extra
    (matplotlib) is installed too, so the report page's drawing tests run, not skip, and the `hf` extra
    (transformers, pinned), so the Hugging Face adapters' tests run. Arguments after
    `--` come after the marker expression, so `nox -s tests -- -m slow` or a test's node id work as usual.
    """
    _install(session, "[test,plots,hf]")
    # The venv's python, even if pytest is a system install; timing tests off even if the caller's shell set them on.
    session.run("python", "-m", "pytest", "-m", UNIT, *session.posargs, env={"MOEBENCH_TIMING_TESTS": "0"})


@nox.session(**VENV)
def slow(session: nox.Session) -> None:
    """The long end-to-end tests (marked `slow`, not `timing`): spawned and torchrun runs of whole
    scenarios, a two-node torchrun rendezvous on loopback, the process-life checks. Logic, not speed."""
    _install(session, "[test,plots,hf]")
    session.run(
        "python", "-m", "pytest", "-m", "slow and not timing", *session.posargs, env={"MOEBENCH_TIMING_TESTS": "0"}
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(**VENV)
def bench(session: nox.Session) -> None:
    """The tour (scenarios/*.toml): one small file per capability, a few minutes on 2 CPU cores.

    On this host's GPUs where a run fits, else gloo ranks. The full sweeps are `nox -s sweeps`. The `hf` extra
    (transformers) is installed so that real-models.toml runs (without it, its runs are skipped).
    """
    _install(session, "[hf]")
    session.run("python", "-m", "moebench", "run", "scenarios", *session.posargs)


@nox.session(default=False, **VENV)
def sweeps(session: nox.Session) -> None:
    """The full sweeps (scenarios/sweeps), 106 runs: about 10 minutes on a quiet 2-core CPU host.

    Every point of the tour's capabilities: EP 1, 2, 4; every overlap chunk count, cache size, policy and
    prefetch mode; every fault type. On this host's GPUs where a run fits, else gloo ranks.
    """
    _install(session)
    session.run("python", "-m", "moebench", "run", "scenarios/sweeps", *session.posargs)


@nox.session(**VENV)
def regress(session: nox.Session) -> None:
    """The regression gate: run scenarios/regress on CPU, compare with the committed baseline (a timing
    regression is confirmed by one rerun of its scenario: moebench/regress/confirm.py), then
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
    # --confirm 1: a `slower` timing stands only if a fresh rerun of its scenario reads slower too
    confirm = ["--confirm", "1"]
    session.run("python", "-m", "moebench", "compare", baseline, out, *confirm, *markdown, *session.posargs)
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
    session.log(f"{gpus} CUDA device(s): one NCCL rank per GPU under torchrun")
    session.run(
        "python",  # torchrun as a module of the session's python: the script may belong to another env
        "-m",
        "torch.distributed.run",
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
    )
