"""The nox sessions (noxfile.py), checked without a network: they reuse the torch of the environment nox runs
from, install the test toolchain at the versions constraints/test.txt pins, and leave the slow tests to their own
session."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("nox")
_spec = importlib.util.spec_from_file_location("noxfile", Path(__file__).resolve().parent.parent / "noxfile.py")
noxfile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(noxfile)

BASE = "/opt/python3.11"
OUTER_SITE = ["/home/u/venv/lib/python3.11/site-packages"]


def probe(venv: bool, torch: str | None, base: str = BASE, site=OUTER_SITE) -> dict:
    return {"venv": venv, "base": base, "torch": torch, "site": site}


SESSION_SITE = ["/repo/.nox/tests/lib/python3.11/site-packages"]


@pytest.mark.parametrize(
    ("outer", "session", "source"),
    [
        # nox from an activated venv that has torch (the case): its site-packages, ahead of the base's
        (probe(True, OUTER_SITE[0] + "/torch/__init__.py"), probe(True, None, site=SESSION_SITE), "outer"),
        (probe(True, OUTER_SITE[0] + "/torch/__init__.py"), probe(True, f"{BASE}/lib/torch/__init__.py"), "outer"),
        # nox from the base interpreter, or a venv without torch over a base with it: the base's, seen already
        (probe(False, f"{BASE}/lib/torch/__init__.py"), probe(True, f"{BASE}/lib/torch/__init__.py"), "session"),
        (probe(True, None), probe(True, f"{BASE}/lib/torch/__init__.py"), "session"),
        (probe(True, None), probe(True, None, site=SESSION_SITE), "install"),  # no torch anywhere
        (probe(False, None, base="/usr"), probe(True, None), "stale"),  # a reused venv made from another Python
    ],
)
def test_torch_comes_from_the_outer_environment_first_and_is_installed_only_when_none_exists(outer, session, source):
    assert noxfile.torch_source(outer, session) == (source, OUTER_SITE if source == "outer" else [])


def test_a_torch_installed_inside_the_session_venv_is_told_apart_from_the_bases():
    own = probe(True, SESSION_SITE[0] + "/torch/__init__.py", site=SESSION_SITE)
    assert noxfile.session_torch_is_own(own)
    assert not noxfile.session_torch_is_own(probe(True, f"{BASE}/lib/torch/__init__.py", site=SESSION_SITE))
    assert not noxfile.session_torch_is_own(probe(True, None, site=SESSION_SITE))
    sibling = probe(True, SESSION_SITE[0] + "-other/torch/__init__.py", site=SESSION_SITE)
    assert not noxfile.session_torch_is_own(sibling)  # a prefix of the path is not the folder


def _fake_python(prefix: Path) -> str:
    (prefix / "bin").mkdir(parents=True)
    python = prefix / "bin" / "python"
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    return str(python)


def test_the_outer_interpreter_is_the_activated_venv_or_conda_env_else_noxs_own(tmp_path):
    venv, conda = _fake_python(tmp_path / "venv"), _fake_python(tmp_path / "conda")
    env = {"VIRTUAL_ENV": str(tmp_path / "venv"), "CONDA_PREFIX": str(tmp_path / "conda")}
    assert noxfile.outer_python(env, "/nox/python") == venv
    assert noxfile.outer_python({"CONDA_PREFIX": env["CONDA_PREFIX"]}, "/nox/python") == conda
    assert noxfile.outer_python({}, "/nox/python") == "/nox/python"
    assert noxfile.outer_python({"VIRTUAL_ENV": str(tmp_path / "gone")}, "/nox/python") == "/nox/python"


def test_the_probe_runs_on_a_real_interpreter_and_finds_this_torch():
    answer = json.loads(subprocess.run([sys.executable, "-c", noxfile.PROBE], capture_output=True, text=True).stdout)
    import torch

    assert answer["torch"] == torch.__spec__.origin and answer["venv"] == (sys.prefix != sys.base_prefix)
    assert os.path.realpath(answer["base"]) == os.path.realpath(sys.base_prefix) and answer["site"]


# -------------------------------------------------------------------------------------------
# The test toolchain comes from constraints/test.txt, whatever the base interpreter holds

REPO = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    """A requirement's project name, normalized as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)).lower()


def _pins() -> dict[str, str]:
    lines = (REPO / noxfile.CONSTRAINTS[1]).read_text().splitlines()
    pins = [line.split("#")[0].strip() for line in lines]
    return {_name(pin): pin.split("==", 1)[1] for pin in pins if pin and "==" in pin}


def test_the_constraints_pin_every_test_and_plots_dependency_and_the_tools_but_never_torch():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    needed = {_name(r) for r in extras["test"] + extras["plots"]} | {"nox", "ruff"}  # nox and ruff: noxfile, .ci/run
    pins = _pins()
    assert {"pytest", "pytest-benchmark", "hypothesis", "matplotlib"} <= needed
    assert sorted(needed - set(pins)) == []
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", version) for version in pins.values())  # exact, one each
    assert not {"torch", "numpy", "scipy"} & set(pins)  # the runtime's stay those of the environment nox runs from
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install --quiet --disable-pip-version-check -c constraints/test.txt nox" in ci


class _FakeSession:
    """What noxfile's sessions call on a nox session, recorded; the probes answer with a torch in the base."""

    def __init__(self, site: Path, posargs=()):
        self.posargs, self.installs, self.runs = list(posargs), [], []
        self.answer = json.dumps(probe(True, f"{BASE}/lib/torch/__init__.py", site=[str(site)]))

    def run(self, *args, **kwargs):
        if args[1:3] == ("-c", noxfile.PROBE):
            return self.answer + "\n"
        self.runs.append((args, kwargs.get("env")))
        return ""

    def install(self, *args):
        self.installs.append(args)

    def log(self, *args):
        pass

    def error(self, message):
        raise AssertionError(message)


def test_every_session_installs_under_the_constraints_and_the_unit_suite_leaves_slow_tests_to_their_session(
    tmp_path,
):
    unit, slow, lint = _FakeSession(tmp_path, ["tests/x.py"]), _FakeSession(tmp_path), _FakeSession(tmp_path)
    noxfile.tests(unit)
    noxfile.slow(slow)
    noxfile.lint(lint)
    assert noxfile.CONSTRAINTS == ("-c", "constraints/test.txt")
    assert unit.installs == slow.installs == [("-c", "constraints/test.txt", "-e", ".[test,plots,hf]")]
    assert lint.installs == [("-c", "constraints/test.txt", "ruff")]
    ((args, env),) = unit.runs
    assert args == ("python", "-m", "pytest", "-m", "not slow and not timing", "tests/x.py")  # posargs last: they win
    assert env == {"MOEBENCH_TIMING_TESTS": "0"}
    ((args, env),) = slow.runs
    assert args == ("python", "-m", "pytest", "-m", "slow and not timing") and env == {"MOEBENCH_TIMING_TESTS": "0"}
    assert [a[0] for a, _ in lint.runs] == ["ruff", "ruff"]
