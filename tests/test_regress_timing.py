"""The regression gate end to end, timed: A/A runs of identical code, and a planted dispatch slowdown.

Each test runs separate ``moebench run`` processes and judges their timings, so it needs a quiet
host: marked ``timing``, and skipped unless ``MOEBENCH_TIMING_TESTS=1``. ``nox -s regress`` runs
them after its compare; the unit suite (``nox -s tests``) never does.
"""

from __future__ import annotations

import json
import os

import pytest

from moebench.measure.slowdown import SLOWDOWN_ENV
from moebench.regress import compare as C
from moebench.regress.confirm import confirm
from moebench.report.results import REPO
from moebench.tools.false_alarms import confirmed, pairwise, run_set

REGRESS = REPO / "scenarios" / "regress"
TIMING_ENV = "MOEBENCH_TIMING_TESTS"

pytestmark = [
    pytest.mark.timing,
    pytest.mark.slow,
    pytest.mark.multiproc,
    pytest.mark.skipif(
        os.environ.get(TIMING_ENV) != "1",
        reason=f"times real code, so it needs a quiet host: `nox -s regress` runs it ({TIMING_ENV}=1)",
    ),
]


def test_twenty_one_a_a_comparisons_of_identical_code_report_no_regression(tmp_path):
    folders = run_set([str(REGRESS)], tmp_path, runs=7)
    comparisons = pairwise(folders)
    assert len(comparisons) == 21
    # as the gate (`--confirm 1`) judges them: a `slower` row must repeat against a third run
    judged = confirmed(folders, comparisons)
    flagged = [(r.scenario, r.run, r.metric, r.verdict, r.ratio) for rows in judged for r in rows if r.regression]
    assert flagged == []
    judged = {(r.scenario, r.metric) for r in comparisons[0] if r.verdict != "new"}
    assert {
        ("regress-a2a", "dispatch_over_a2a"),
        ("regress-dispatch", "dispatch_over_floor"),
        ("regress-dispatch", "combine_over_floor"),
        ("regress-local", "moe_over_dense"),
        ("regress-overlap", "overlap_speedup"),
        ("regress-numerics", "rel_error_grad"),
        ("regress-load", "load_cv"),
    } <= judged


def test_a_30_percent_slower_dispatch_is_flagged_on_the_dispatch_metrics_only(tmp_path, monkeypatch):
    scenarios = [str(REGRESS / f"regress-{name}.toml") for name in ("dispatch", "local", "a2a")]
    (base,) = run_set(scenarios, tmp_path / "base", runs=1)
    # 20 % read 1.25-1.26x on the ratio in 2 runs here, but 1.140 against one high baseline run in
    # a clean-clone CI run (bec8ac7): one run's level moves by several %, so the test plants 30 %
    # (about 1.37x), which a 15 % gate must flag through that spread, twice
    monkeypatch.setenv(SLOWDOWN_ENV, "0.30")
    slow, again = run_set(scenarios, tmp_path / "slow", runs=2)
    env = json.loads((slow / "regress-local.json").read_text())["environment"]
    assert env["test_knobs"] == {SLOWDOWN_ENV: "0.30"}  # the result says it was produced with the knob
    baseline = C.load([base])
    # as the gate judges it: the second slow run is the rerun that must confirm a `slower` row
    rerun = C.compare(baseline, C.load([again]), C.Settings())
    rows = confirm(C.compare(baseline, C.load([slow]), C.Settings()), [rerun])
    by_name = {(r.scenario, r.metric): r for r in rows}
    flagged = {key for key, row in by_name.items() if row.regression}
    affected = {
        ("regress-dispatch", "dispatch_over_floor"),
        ("regress-local", "dispatch_over_floor"),
        ("regress-a2a", "dispatch_over_a2a"),
    }
    gated = by_name["regress-dispatch", "dispatch_over_floor"]
    assert ("regress-dispatch", "dispatch_over_floor") in flagged, gated
    assert 1.15 < gated.ratio < 1.65, gated
    assert flagged <= affected, f"unrelated metrics flagged: {flagged - affected}"
    # The step contains the two dispatches, so step time and moe_over_dense move too, by about
    # 30 % x (2 x 0.13 ms) / 35 ms = 0.2 %: far below their gates, so they must not be flagged.
    for scenario, unrelated in [
        ("regress-dispatch", "combine_over_floor"),
        ("regress-local", "combine_over_floor"),
        ("regress-local", "moe_over_dense"),
        ("regress-local", "tokens_dropped"),
        ("regress-a2a", "combine_over_a2a"),
    ]:
        assert not by_name[scenario, unrelated].regression, by_name[scenario, unrelated]
