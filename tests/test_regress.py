"""The regression gate's parts that judge no timing: the test-only slowdown knob and the A/A tool's pairing.

The end-to-end runs that time real code (A/A, planted slowdown) are in ``test_regress_timing.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import torch

from moebench.measure.slowdown import SLOWDOWN_ENV, SlowDispatcher, injected_slowdown, stall, wrapper
from moebench.report.results import REPO
from moebench.tools.false_alarms import NEIGHBOUR, pairwise
from runtime.dispatch import LocalDispatcher

# -------------------------------------------------------------------------------------------
# The test-only slowdown knob (moebench/slowdown.py: the harness wraps the runtime's dispatcher)


def test_the_slowdown_knob_is_off_unless_set(monkeypatch):
    monkeypatch.delenv(SLOWDOWN_ENV, raising=False)
    assert injected_slowdown() == 0.0 and wrapper() is None
    monkeypatch.setenv(SLOWDOWN_ENV, "0")
    assert wrapper() is None  # zero: no wrapper at all


def test_the_slowdown_knob_refuses_to_work_outside_pytest(monkeypatch):
    monkeypatch.setenv(SLOWDOWN_ENV, "0.15")
    slowed = wrapper()(LocalDispatcher(4))  # inside pytest
    assert isinstance(slowed, SlowDispatcher) and slowed.fraction == 0.15
    monkeypatch.delenv("PYTEST_CURRENT_TEST")
    with pytest.raises(RuntimeError, match="set outside a pytest run: it exists for tests only"):
        wrapper()


@pytest.mark.parametrize("text", ["fast", "-0.1", "11", "nan"])
def test_the_slowdown_knob_rejects_a_bad_value(monkeypatch, text):
    monkeypatch.setenv(SLOWDOWN_ENV, text)
    with pytest.raises(ValueError, match=f"{SLOWDOWN_ENV} = '{text}' is invalid: accepted a fraction from 0 to 10"):
        wrapper()


def test_stall_waits_the_fraction_of_the_time_already_spent():
    start = time.perf_counter() - 0.020  # as if the dispatch had taken 20 ms
    t0 = time.perf_counter()
    stall(0.5, start, torch.device("cpu"))
    assert time.perf_counter() - t0 >= 0.010


def test_a_slowed_dispatch_returns_the_same_rows_and_stalls_its_dispatches(monkeypatch):
    x_TD = torch.randn(16, 4)
    ids_TK = torch.randint(0, 4, (16, 2))
    keep_TK = torch.ones(16, 2, dtype=torch.bool)
    kept_WE = torch.bincount(ids_TK.reshape(-1), minlength=4)[None]
    plain, _ = LocalDispatcher(4).dispatch(x_TD, ids_TK, keep_TK, kept_WE)
    monkeypatch.setenv(SLOWDOWN_ENV, "0.5")
    slowed = wrapper()(LocalDispatcher(4))
    stalls = []
    monkeypatch.setattr("moebench.measure.slowdown.stall", lambda fraction, start, device: stalls.append(fraction))
    rows, _ = slowed.dispatch(x_TD, ids_TK, keep_TK, kept_WE)
    assert torch.equal(plain, rows) and stalls == [0.5]  # the serial dispatch: one stall
    meta = slowed.plan(ids_TK, keep_TK, kept_WE, 2)  # the layer's pipelined path: plan, then send
    assert torch.equal(slowed.send(x_TD, meta), LocalDispatcher(4).send(x_TD, meta)) and stalls == [0.5, 0.5]
    assert slowed.local_experts == (0, 1, 2, 3)  # the rest is the wrapped dispatcher's


# -------------------------------------------------------------------------------------------
# The A/A tool


def test_a_a_pairs_in_both_orders_see_a_slower_run_as_the_baseline_and_as_the_new_side(tmp_path):
    base = REPO / "results" / "baselines" / "cpu-2core"
    quiet, slow = tmp_path / "quiet", tmp_path / "slow"
    shutil.copytree(base, quiet)
    shutil.copytree(base, slow)
    doc = json.loads((slow / "regress-dispatch.json").read_text())
    metric = doc["runs"][0]["metrics"]["dispatch_over_floor"]
    metric["samples"] = [1.5 * v for v in metric["samples"]]
    metric["median"] *= 1.5
    (slow / "regress-dispatch.json").write_text(json.dumps(doc))

    def verdicts(comparisons):
        return [
            {r.verdict for r in rows if (r.scenario, r.metric) == ("regress-dispatch", "dispatch_over_floor")}
            for rows in comparisons
        ]

    assert verdicts(pairwise([slow, quiet])) == [{"faster"}]  # i < j only: the slow run is never new
    assert verdicts(pairwise([slow, quiet], both_orders=True)) == [{"faster"}, {"slower"}]


def test_the_noisy_neighbour_keeps_running_until_killed():
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        time.sleep(1.0)
        assert neighbour.poll() is None  # still copying
    finally:
        neighbour.kill()
        neighbour.wait()
