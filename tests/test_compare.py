"""``moebench compare`` and ``moebench baseline`` on hand-built result files with known differences."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from result_docs import result_doc as _doc
from result_docs import run_record as _run
from result_docs import times as _times
from scipy.stats import mannwhitneyu

from moebench.cli import main
from moebench.metrics import metric
from moebench.regress import compare as C
from moebench.regress.baseline import class_dir
from moebench.report.results import write_atomic
from moebench.scenario import ScenarioError, load


def _runs(doc: dict, tmp_path: Path, side: str) -> list[C.Run]:
    path = tmp_path / side / f"{doc['scenario']['scenario']['name']}.json"
    write_atomic(path, doc)
    return C.load([path])


def _verdicts(rows: list[C.Row]) -> dict[str, str]:
    return {row.metric: row.verdict for row in rows}


def _pair(tmp_path, base_metrics: dict, new_metrics: dict, **doc_kwargs) -> dict[str, str]:
    base = _runs(_doc([_run(base_metrics)], **doc_kwargs), tmp_path, "base")
    new = _runs(_doc([_run(new_metrics)], **doc_kwargs), tmp_path, "new")
    return _verdicts(C.compare(base, new, C.Settings()))


# -------------------------------------------------------------------------------------------
# Statistics


def test_mann_whitney_p_is_scipys_two_sided_test_and_one_for_identical_constants():
    a, b = [1.0, 2.0, 3.0, 4.0, 5.0], [3.5, 4.5, 5.5, 6.5, 7.5]
    assert C.mann_whitney_p(a, b) == pytest.approx(mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert C.mann_whitney_p([2.0] * 5, [2.0] * 5) == 1.0


def test_smallest_p_is_two_over_the_number_of_orderings():
    assert C.smallest_p(5, 5) == pytest.approx(2 / 252)
    assert C.smallest_p(3, 3) == pytest.approx(0.1)
    # the smallest p is what an exact test gives for complete separation
    exact = mannwhitneyu([1, 2, 3, 4, 5], [6, 7, 8, 9, 10], alternative="two-sided", method="exact").pvalue
    assert C.smallest_p(5, 5) == pytest.approx(exact)


def test_effect_is_symmetric_in_speedup_and_slowdown():
    assert C.effect(1.25) == pytest.approx(0.25)
    assert C.effect(1 / 1.25) == pytest.approx(0.25)
    assert C.effect(1.0) == 0.0
    assert C.effect(0.0) == math.inf


# -------------------------------------------------------------------------------------------
# Verdicts


def test_a_15_percent_slower_step_is_a_significant_regression(tmp_path):
    base = {"step_time_s": metric(_times(0.010), "s", "lower")}
    new = {"step_time_s": metric(_times(0.0115, seed=1), "s", "lower")}
    rows = C.compare(_runs(_doc([_run(base)]), tmp_path, "b"), _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    row = next(r for r in rows if r.metric == "step_time_s")
    assert row.verdict == "slower" and row.regression
    assert row.ratio == pytest.approx(1.15, rel=0.02)
    assert row.p < 1e-6


def test_a_faster_run_is_reported_faster_and_passes(tmp_path):
    base = {"step_time_s": metric(_times(0.010), "s", "lower"), "tokens_per_s": metric(_times(1e5), "t/s", "higher")}
    new = {
        "step_time_s": metric(_times(0.008, seed=1), "s", "lower"),
        "tokens_per_s": metric(_times(1.25e5, seed=1), "t/s", "higher"),
    }
    base_runs = _runs(_doc([_run(base)]), tmp_path, "b")
    rows = C.compare(base_runs, _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    assert _verdicts(rows)["step_time_s"] == "faster" and _verdicts(rows)["tokens_per_s"] == "faster"
    assert not any(row.regression for row in rows)


def test_higher_is_better_metrics_regress_when_they_fall(tmp_path):
    verdicts = _pair(
        tmp_path,
        {"tokens_per_s": metric(_times(1e5), "t/s", "higher")},
        {"tokens_per_s": metric(_times(0.8e5, seed=1), "t/s", "higher")},
    )
    assert verdicts["tokens_per_s"] == "slower"


def test_a_significant_change_below_the_minimum_effect_is_same(tmp_path):
    base = {"step_time_s": metric(_times(0.010, spread=0.001), "s", "lower")}
    new = {"step_time_s": metric(_times(0.0102, seed=1, spread=0.001), "s", "lower")}
    rows = C.compare(_runs(_doc([_run(base)]), tmp_path, "b"), _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    row = next(r for r in rows if r.metric == "step_time_s")
    assert row.p < 1e-6 and row.verdict == "same"


def test_a_large_change_that_is_not_significant_is_noisy(tmp_path):
    base = {"step_time_s": metric([0.010, 0.030, 0.011, 0.029], "s", "lower")}
    new = {"step_time_s": metric([0.012, 0.031, 0.013, 0.033, 0.014], "s", "lower")}
    rows = C.compare(_runs(_doc([_run(base)]), tmp_path, "b"), _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    row = next(r for r in rows if r.metric == "step_time_s")
    assert C.effect(row.ratio) > 0.05 and row.p > 0.01
    assert row.verdict == "noisy" and not row.regression


def test_too_few_samples_to_reach_alpha_are_named(tmp_path):
    base = {"step_time_s": metric([1.0, 1.01, 0.99], "s", "lower")}
    new = {"step_time_s": metric([2.0, 2.01, 1.99], "s", "lower")}
    rows = C.compare(_runs(_doc([_run(base)]), tmp_path, "b"), _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    row = next(r for r in rows if r.metric == "step_time_s")
    assert row.verdict == "noisy" and "cannot reach p < 0.01" in row.note


def test_exact_metrics_are_judged_against_their_tolerance(tmp_path):
    def exact(value, unit="copies"):
        return metric([value], unit, "lower", exact=True)

    base = {"tokens_dropped": exact(100), "rel_error_forward": exact(5e-7, "ratio"), "load_cv": exact(0.10, "ratio")}
    within = {"tokens_dropped": exact(104), "rel_error_forward": exact(9e-7, "ratio"), "load_cv": exact(0.099, "ratio")}
    past = {"tokens_dropped": exact(106), "rel_error_forward": exact(1.1e-6, "ratio"), "load_cv": exact(0.09, "ratio")}
    assert set(_pair(tmp_path / "a", base, within).values()) == {"same"}
    verdicts = _pair(tmp_path / "b", base, past)
    assert verdicts["tokens_dropped"] == "worse"  # 6 % > 5 %
    assert verdicts["rel_error_forward"] == "worse"  # errors may double, not more
    assert verdicts["load_cv"] == "better"  # 0.10 -> 0.09 is 11 % better
    rows = C.compare(
        _runs(_doc([_run(base)]), tmp_path / "c", "b"), _runs(_doc([_run(past)]), tmp_path / "c", "n"), C.Settings()
    )
    assert all(r.p is None for r in rows if r.metric in base)  # no test for exact metrics


def test_an_error_from_zero_to_nonzero_or_a_nan_is_a_regression(tmp_path):
    base = {"tokens_dropped": metric([0], "copies", "lower", exact=True)}
    new = {"tokens_dropped": metric([3], "copies", "lower", exact=True)}
    assert _pair(tmp_path / "a", base, new)["tokens_dropped"] == "worse"
    nan = {"tokens_dropped": {**base["tokens_dropped"], "median": None}}
    assert _pair(tmp_path / "b", base, nan)["tokens_dropped"] == "missing"


def test_a_missing_metric_is_a_regression_and_a_new_metric_is_reported(tmp_path):
    base = {"step_time_s": metric(_times(1.0), "s", "lower"), "a2a_time_s": metric(_times(0.5), "s", "lower")}
    new = {
        "step_time_s": metric(_times(1.0, seed=1), "s", "lower"),
        "moe_over_dense": metric(_times(1.2), "ratio", "lower"),
    }
    base_runs = _runs(_doc([_run(base)]), tmp_path, "b")
    rows = C.compare(base_runs, _runs(_doc([_run(new)]), tmp_path, "n"), C.Settings())
    by_metric = {r.metric: r for r in rows}
    assert by_metric["a2a_time_s"].verdict == "missing" and by_metric["a2a_time_s"].regression
    assert by_metric["moe_over_dense"].verdict == "new" and not by_metric["moe_over_dense"].regression
    assert by_metric["step_time_s"].verdict == "same"


def test_runs_are_matched_by_params_and_a_missing_run_is_a_regression(tmp_path):
    m = {"step_time_s": metric(_times(1.0), "s", "lower")}
    base = _doc([_run(m, {"world_size": 1}, world=1), _run(m, {"world_size": 2})])
    new = _doc([_run(m, {"world_size": 2}), _run(m, {"world_size": 4}, world=4)])
    rows = C.compare(_runs(base, tmp_path, "b"), _runs(new, tmp_path, "n"), C.Settings())
    status = {(r.run, r.metric): r.verdict for r in rows}
    assert status["world_size=1", "run"] == "missing"
    assert status["world_size=4", "run"] == "new"
    assert status["world_size=2", "step_time_s"] == "same"
    assert sum(r.regression for r in rows) == 1


def test_an_environment_class_mismatch_is_reported_and_not_compared(tmp_path):
    base = {"step_time_s": metric(_times(1.0), "s", "lower")}
    slow = {"step_time_s": metric(_times(2.0), "s", "lower")}
    base_runs = _runs(_doc([_run(base)]), tmp_path, "b")
    new_runs = _runs(_doc([_run(slow, dtype="bfloat16")]), tmp_path, "n")
    rows = C.compare(base_runs, new_runs, C.Settings())
    assert [(r.metric, r.verdict) for r in rows] == [("environment", "env differs")]
    assert "dtype float32 -> bfloat16" in rows[0].note and rows[0].regression
    allowed = C.compare(base_runs, new_runs, C.Settings(allow_env_mismatch=True))
    assert _verdicts(allowed) == {
        "environment": "compared anyway",
        "step_time_s": "slower",
        "check finite_output": "same",
    }
    other_host = _runs(_doc([_run(base)], cpus=16), tmp_path, "h")
    assert C.compare(base_runs, other_host, C.Settings())[0].note.startswith("hardware cpu (2 cores) -> cpu (16 cores)")


def test_a_check_that_now_fails_and_a_run_that_now_errors_are_regressions(tmp_path):
    m = {"step_time_s": metric(_times(1.0), "s", "lower")}
    failing = [{"name": "finite_output", "pass": False, "detail": ""}]
    base = _doc([_run(m, {"world_size": 1}, world=1), _run(m, {"world_size": 2})])
    new = _doc([_run(m, {"world_size": 1}, world=1, checks=failing), _run({}, {"world_size": 2}, status="error")])
    rows = C.compare(_runs(base, tmp_path, "b"), _runs(new, tmp_path, "n"), C.Settings())
    status = {(r.run, r.metric): r.verdict for r in rows}
    assert status["world_size=1", "check finite_output"] == "fails now"
    assert status["world_size=2", "run"] == "failed"
    assert sum(r.regression for r in rows) == 2


def test_minimum_effect_most_specific_setting_wins(tmp_path):
    scenario = {"step_time_s": 0.5, "min_effect": 0.2}
    assert C.min_effect_for("step_time_s", scenario, C.Settings()) == 0.5
    assert C.min_effect_for("combine_time_s", scenario, C.Settings()) == 0.2
    assert C.min_effect_for("combine_time_s", {}, C.Settings()) == C.DEFAULT_MIN_EFFECT
    assert C.min_effect_for("step_time_s", scenario, C.Settings(min_effect=0.1)) == 0.5  # scenario's metric value
    assert C.min_effect_for("combine_time_s", scenario, C.Settings(min_effect=0.1)) == 0.1  # CLI over scenario default
    assert C.min_effect_for("step_time_s", scenario, C.Settings(per_metric={"step_time_s": 0.01})) == 0.01
    assert C.min_effect_for("rel_error_grad", {}, C.Settings(min_effect=0.1)) == 1.0  # built-in per metric
    # a scenario's [compare] threshold turns a 15 % slowdown from a regression into "same"
    base = {"step_time_s": metric(_times(0.010), "s", "lower")}
    new = {"step_time_s": metric(_times(0.0115, seed=1), "s", "lower")}
    assert _pair(tmp_path, base, new, thresholds={"step_time_s": 0.5})["step_time_s"] == "same"


def test_scenario_compare_section_is_validated(tmp_path):
    text = """
[scenario]
name = "c"
kind = "throughput"
[model]
hidden = 8
ffn_hidden = 8
num_experts = 2
[workload]
tokens_per_rank = 4
[compare]
"""
    path = tmp_path / "c.toml"
    path.write_text(text + "alpha = 0.05\nstep_time_s = 0.5\n")
    assert load(path).sections["compare"] == {"alpha": 0.05, "step_time_s": 0.5}
    for bad, message in [
        ("imbalance_max_mean = 0.1", "[compare] imbalance_max_mean is not a known key: accepted alpha, min_effect"),
        ("alpha = 1.5", "[compare] alpha = 1.5 is invalid: accepted a number in (0, 1)"),
        ("step_time_s = -0.1", "[compare] step_time_s = -0.1 is invalid: accepted a fraction from 0 to 100"),
        ('min_effect = "5%"', '[compare] min_effect = "5%" is invalid'),
    ]:
        path.write_text(text + bad + "\n")
        with pytest.raises(ScenarioError, match=r"^" + str(path).replace(".", r"\.") + ": " + _escape(message)):
            load(path)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


# -------------------------------------------------------------------------------------------
# Command line


def _write_pair(tmp_path, base_metrics, new_metrics) -> tuple[Path, Path]:
    base, new = tmp_path / "base", tmp_path / "new"
    write_atomic(base / "demo.json", _doc([_run(base_metrics)]))
    write_atomic(new / "demo.json", _doc([_run(new_metrics)]))
    return base, new


def test_cli_exit_codes_markdown_and_json(tmp_path, capsys):
    base_m = {"step_time_s": metric(_times(0.010), "s", "lower")}
    slow_m = {"step_time_s": metric(_times(0.0115, seed=1), "s", "lower")}
    base, new = _write_pair(tmp_path, base_m, slow_m)
    md = tmp_path / "summary.md"
    assert main(["compare", str(base), str(new), "--markdown", str(md)]) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "1 regression (" in out
    text = md.read_text()
    assert text.startswith("## moebench compare: REGRESSION") and "#### Regressions" in text and "| SLOWER" in text
    assert main(["compare", str(base), str(new), "--min-effect", "step_time_s=0.2"]) == 0
    capsys.readouterr()
    assert main(["compare", str(base), str(base), "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "moebench.regress.compare/1" and doc["regressions"] == 0
    assert {r["metric"]: r["verdict"] for r in doc["rows"]}["step_time_s"] == "same"
    assert main(["compare", str(base), str(new), "--json", str(tmp_path / "out.json")]) == 1
    assert "SLOWER" in capsys.readouterr().out  # the table still prints when JSON goes to a file
    saved = json.loads((tmp_path / "out.json").read_text())
    assert saved["regressions"] == 1 and saved["rows"][0]["verdict"] == "slower"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compare", "nowhere", "nowhere2"], "nowhere: no such file or folder"),
        (["compare", "{base}", "{new}", "--min-effect", "fast"], "argument --min-effect: fast: accepted FRACTION"),
        (["compare", "{base}", "{new}", "--alpha", "2"], "argument --alpha: 2: accepted a number in (0, 1)"),
        (["compare", "{base}", "{bad}"], "not a readable result file"),
        (["compare", "{base}"], "the following arguments are required: NEW"),
        (["compare", "{base}", "{new}", "--min-effect", "step_tme_s=0.2"], "step_tme_s=0.2: no metric of that name"),
        (["compare", "{base}", "{nounit}"], "metrics.step_time_s needs a unit and better = 'higher' or 'lower'"),
        (["compare", "{base}", "{twice}"], "run demo [world_size=2] is also in"),
        (["compare", "{base}", "{busy}"], "runs[0] needs host_busy true, false or null, and host a table or null"),
    ],
)
def test_cli_usage_errors_exit_2_with_one_line(tmp_path, capsys, args, message):
    base, new = _write_pair(tmp_path, {"step_time_s": metric([1.0], "s", "lower")}, {})
    (tmp_path / "bad.json").write_text("{not json")
    nounit = _doc([_run({"step_time_s": {**metric([1.0], "s", "lower"), "better": "up"}})])
    write_atomic(tmp_path / "nounit" / "demo.json", nounit)
    write_atomic(tmp_path / "twice" / "a.json", _doc([_run({})]))
    write_atomic(tmp_path / "twice" / "b.json", _doc([_run({})]))
    paths = {"base": base, "new": new, "bad": tmp_path / "bad.json", "nounit": tmp_path / "nounit"}
    write_atomic(tmp_path / "busy" / "demo.json", _doc([_run({}, host_busy="yes")]))
    paths |= {"twice": tmp_path / "twice", "busy": tmp_path / "busy"}
    code = None
    try:
        code = main([a.format(**paths) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


# -------------------------------------------------------------------------------------------
# Notes: a stale baseline, a busy host

GATES = {"dispatch_over_floor": 0.1, "combine_over_floor": 0.1, "min_effect": 3.0}


def _dispatch_metrics(combine: float, seed: int) -> dict:
    """regress-dispatch's sampled metrics, tightly spread, with combine_over_floor at ``combine``."""
    return {
        name: metric(_times(median, seed=seed, spread=0.001), unit, "lower")
        for name, median, unit in [
            ("dispatch_time_s", 1.1e-4, "s"),
            ("combine_time_s", 9.7e-5, "s"),
            ("dispatch_over_floor", 2.4, "ratio"),
            ("combine_over_floor", combine, "ratio"),
        ]
    } | {"tokens_dropped": metric([229], "copies", "lower", exact=True)}


def _dispatch_pair(tmp_path, base_combine: float, new_combine: float) -> list[C.Row]:
    base = _runs(_doc([_run(_dispatch_metrics(base_combine, 0))], thresholds=GATES), tmp_path, "b")
    new = _runs(_doc([_run(_dispatch_metrics(new_combine, 1))], thresholds=GATES), tmp_path, "n")
    return C.compare(base, new, C.Settings())


def test_a_baseline_the_new_side_beats_is_named_stale_with_the_regression_it_would_hide(tmp_path):
    # the committed regress-dispatch case: combine_over_floor 1.68 in the baseline, 1.49 measured
    rows = _dispatch_pair(tmp_path, 1.68, 1.49)
    assert {r.metric: r.verdict for r in rows}["combine_over_floor"] == "faster"
    assert not any(r.regression for r in rows)
    (note,) = C.stale_notes(rows)
    assert (note["scenario"], note["faster"], note["gated"]) == ("demo", 1, 5)  # 4 sampled, 1 exact
    (hidden,) = note["metrics"]
    assert hidden["metric"] == "combine_over_floor" and hidden["hidden_regression"] == pytest.approx(
        1.68 / 1.49 * 1.1 - 1, rel=1e-3
    )
    assert note["text"] == (
        "baseline may be stale: 1 of 5 gated metrics read faster; "
        "a regression would read same up to +24 % in combine_over_floor (ratio 0.887)"
    )
    assert "\nnote: " + note["text"] in C.render(rows)
    assert "\n> " + note["text"] in C.markdown_report(rows, "b", "n")
    assert C.to_json(rows, "b", "n")["notes"]["stale_baseline"] == [note]


def test_the_hidden_regression_is_exactly_where_a_slowdown_starts_to_read_slower(tmp_path):
    x = C.hidden_regression(1.49 / 1.68, 0.1)
    verdicts = {}
    for name, factor in (("under", 1 + 0.98 * x), ("over", 1 + 1.02 * x)):
        rows = _dispatch_pair(tmp_path / name, 1.68, 1.49 * factor)
        verdicts[name] = {r.metric: r.verdict for r in rows}["combine_over_floor"]
    assert verdicts == {"under": "same", "over": "slower"}


def test_no_stale_note_when_nothing_reads_faster(tmp_path):
    rows = _dispatch_pair(tmp_path, 1.50, 1.49)
    assert C.stale_notes(rows) == [] and "stale" not in C.render(rows)
    assert C.to_json(rows, "b", "n")["notes"] == {"busy_host": [], "stale_baseline": []}


def test_a_better_exact_metric_also_marks_the_baseline_stale():
    row = C.Row("demo", "-", "tokens_dropped", "copies", 100, 80, ratio=0.8, min_effect=0.05, verdict="better")
    (note,) = C.stale_notes([row])
    assert note["text"].startswith("baseline may be stale: 1 of 1 gated metrics read better; ")
    assert note["metrics"][0]["hidden_regression"] == pytest.approx(1.25 * 1.05 - 1)


HOST = {"load_avg_before": [6.1, 5.0, 4.2], "load_avg_after": [7.9, 5.5, 4.4], "cpu_count": 2}
HOST |= {"threads_per_rank": 1, "ranks": 2, "cpu_mhz": None}


def test_a_run_on_a_busy_host_is_named_per_side_and_is_not_a_regression(tmp_path):
    m = {"step_time_s": metric(_times(1.0), "s", "lower")}
    old = _doc([_run(m, {"world_size": 1}, world=1), _run(m)])  # written before host_busy existed
    new = _doc([_run(m, {"world_size": 1}, world=1, host_busy=True, host=HOST), _run(m, host_busy=False)])
    rows = C.compare(_runs(old, tmp_path, "b"), _runs(new, tmp_path, "n"), C.Settings())
    (host,) = [r for r in rows if r.metric == "host"]  # the quiet run gets no row
    assert (host.run, host.base, host.new, host.verdict) == ("world_size=1", "unknown", "busy", "busy host")
    assert host.note == "NEW: load 6.1 before, 7.9 after on 2 cores, 2 ranks × 1 thread"
    assert not any(r.regression for r in rows)
    line = "NEW ran on a busy host in demo [world_size=1]: its timings there are not trustworthy"
    assert C.host_lines(rows) == [line]
    assert C.render(rows).startswith(line + "\n\ndemo\n")
    assert C.markdown_report(rows, "b", "n").count(f"- {line}") == 1
    assert C.to_json(rows, "b", "n")["notes"]["busy_host"] == [line]
    swapped = C.compare(_runs(new, tmp_path, "n"), _runs(old, tmp_path, "b"), C.Settings())
    assert C.host_lines(swapped) == [line.replace("NEW", "BASELINE")]


def test_cli_compare_prints_the_busy_line_and_exits_0(tmp_path, capsys):
    m = {"step_time_s": metric(_times(1.0), "s", "lower")}
    write_atomic(tmp_path / "b" / "demo.json", _doc([_run(m, host_busy=True, host={})]))
    write_atomic(tmp_path / "n" / "demo.json", _doc([_run(m, host_busy=True, host=HOST)]))
    assert main(["compare", str(tmp_path / "b"), str(tmp_path / "n"), "--json", str(tmp_path / "c.json")]) == 0
    out = capsys.readouterr().out
    for side in ("BASELINE", "NEW"):
        assert f"{side} ran on a busy host in demo [world_size=2]: its timings there are not trustworthy" in out
    assert "BASELINE: load ? before, ? after on ? cores; NEW: load 6.1 before" in out  # an empty host record
    assert len(json.loads((tmp_path / "c.json").read_text())["notes"]["busy_host"]) == 2


# -------------------------------------------------------------------------------------------
# pytest-benchmark files

BENCH = """
def test_noop(benchmark):
    benchmark.pedantic(lambda: None, rounds=12, iterations=1)
"""


def _pytest_benchmark(tmp_path: Path) -> dict:
    """A real ``--benchmark-json`` document (pytest-benchmark's own format) of a 12-round benchmark."""
    (tmp_path / "test_noop.py").write_text(BENCH)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_noop.py")]
    cmd += [f"--benchmark-json={out}", "-c", str(tmp_path / "pytest.ini")]
    subprocess.run(cmd, check=True, capture_output=True, env=_env(), cwd=tmp_path)
    return json.loads(out.read_text())


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}


@pytest.mark.slow
def test_pytest_benchmark_json_is_compared_by_the_same_rules(tmp_path):
    # The file is pytest-benchmark's own; its samples are set to recorded ones (2 ms, then 4 ms),
    # so the verdict does not depend on how busy this host is.
    doc = _pytest_benchmark(tmp_path)
    assert len(doc["benchmarks"][0]["stats"]["data"]) == 12
    paths = {}
    for name, median, seed in (("fast", 0.002, 0), ("slow", 0.004, 1)):
        data = _times(median, n=12, seed=seed)
        doc["benchmarks"][0]["stats"] |= {"data": data, "median": float(np.median(data))}
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    fast, slow = C.load([paths["fast"]]), C.load([paths["slow"]])
    (row,) = C.compare(fast, slow, C.Settings())
    assert row.metric == "time_s" and row.run == "test=test_noop"
    assert row.verdict == "slower" and row.ratio == pytest.approx(2.0, rel=0.03) and row.p < 0.01
    assert C.compare(slow, fast, C.Settings())[0].verdict == "faster"
    assert class_dir(doc).startswith("cpu-")


def test_edge_cases_zero_min_effect_null_medians_skipped_runs(tmp_path):
    same = {"tokens_dropped": metric([7], "copies", "lower", exact=True)}
    assert _pair(tmp_path / "a", same, same, thresholds={"tokens_dropped": 0})["tokens_dropped"] == "same"
    moved = {"tokens_dropped": metric([8], "copies", "lower", exact=True)}
    assert _pair(tmp_path / "b", same, moved, thresholds={"tokens_dropped": 0})["tokens_dropped"] == "worse"
    null = {"load_cv": {**metric([1.0], "ratio", "lower", exact=True), "median": None}}
    assert _pair(tmp_path / "c", null, null)["load_cv"] == "same"
    assert _pair(tmp_path / "d", null, {"load_cv": metric([1.0], "ratio", "lower", exact=True)})["load_cv"] == "new"
    skipped = _runs(_doc([_run({}, status="skipped")]), tmp_path / "e", "n")
    rows = C.compare(_runs(_doc([_run(same)]), tmp_path / "e", "b"), skipped, C.Settings())
    assert [(r.metric, r.verdict, r.regression) for r in rows] == [("run", "missing", True)]


def test_the_baselines_thresholds_govern_not_the_new_files(tmp_path):
    base = _runs(_doc([_run({"step_time_s": metric(_times(0.010), "s", "lower")})]), tmp_path, "b")
    slow = {"step_time_s": metric(_times(0.0115, seed=1), "s", "lower")}
    loosened = _runs(_doc([_run(slow)], thresholds={"step_time_s": 0.5}), tmp_path, "n")
    assert _verdicts(C.compare(base, loosened, C.Settings()))["step_time_s"] == "slower"


def test_pytest_benchmark_summaries_without_data_are_judged_on_medians(tmp_path):
    def bench(median):
        stats = {"median": median, "min": median, "max": median, "rounds": 5}
        return {
            "machine_info": {"cpu": {"count": 2}},
            "benchmarks": [{"name": "t", "fullname": "m.py::t", "stats": stats}],
        }

    (tmp_path / "a.json").write_text(json.dumps(bench(1.0)))
    (tmp_path / "b.json").write_text(json.dumps(bench(1.2)))
    (row,) = C.compare(C.load([tmp_path / "a.json"]), C.load([tmp_path / "b.json"]), C.Settings())
    assert (row.verdict, row.p) == ("slower", None) and "no raw samples" in row.note


# -------------------------------------------------------------------------------------------
# Values a ratio or a rank test cannot judge are refused, never read as "same"


def _raw(path: Path, doc: dict) -> Path:
    """Write ``doc`` as JSON as another tool might (NaN and Infinity kept, not made null)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def _edited(edit) -> dict:
    m = metric(_times(0.010), "s", "lower")
    edit(m)
    return _doc([_run({"step_time_s": m})])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(median=math.nan), "metrics.step_time_s.median = NaN is invalid: accepted a finite number"),
        (lambda m: m.update(p99=math.inf), "metrics.step_time_s.p99 = Infinity is invalid"),
        (lambda m: m["samples"].__setitem__(3, "0.01"), 'step_time_s.samples[3] = "0.01" is invalid'),
        (lambda m: m["samples"].__setitem__(0, math.nan), "step_time_s.samples[0] = NaN is invalid"),
        (lambda m: m["samples"].__setitem__(5, True), "step_time_s.samples[5] = true is invalid"),
        (lambda m: m["samples"].__setitem__(2, -0.01), "samples[2] = -0.01 is invalid: accepted a finite number >= 0"),
        (lambda m: m.update(min=-1.0), "step_time_s.min = -1.0 is invalid: accepted a finite number >= 0 (a time)"),
    ],
)
def test_nan_inf_text_or_negative_times_in_a_result_are_refused_naming_the_value(tmp_path, capsys, edit, message):
    base = _raw(tmp_path / "base" / "demo.json", _doc([_run({"step_time_s": metric(_times(0.010), "s", "lower")})]))
    new = _raw(tmp_path / "new" / "demo.json", _edited(edit))
    assert main(["compare", str(base), str(new)]) == 2
    err = capsys.readouterr().err
    assert f"{new}: runs[0]." in err and message in err and len(err.strip().splitlines()) == 1


def test_a_difference_of_times_may_be_negative_and_is_compared():
    exposed = metric([-0.001, 0.0, 0.001], "s", "lower")
    C._check_values("x", "exposed_comm_s", exposed)  # metrics.SIGNED: no error
    with pytest.raises(ValueError, match=r"x\.min = -0\.001 is invalid"):
        C._check_values("x", "step_time_s", exposed)


def test_null_samples_are_left_out_of_the_rank_test_not_read_as_same(tmp_path):
    base = metric(_times(0.010), "s", "lower")
    slow = metric(_times(0.0115, seed=1), "s", "lower")
    slow["samples"] = [*slow["samples"][:10], None, *slow["samples"][10:]]  # a NaN sample, written as null
    verdict, _, p, _ = C.judge_metric("step_time_s", base, slow, 0.05, 0.01)
    assert verdict == "slower" and p < 1e-6


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ({"min_effect": "5%"}, '[compare] min_effect = "5%" is invalid: accepted a fraction from 0 to 100'),
        ({"step_time_s": -1}, "[compare] step_time_s = -1 is invalid: accepted a fraction from 0 to 100"),
        ({"alpha": 2}, "[compare] alpha = 2 is invalid: accepted a number in (0, 1)"),
        ({"min_effect": int("9" * 400)}, "[compare] min_effect = 9999"),
        ([1], "scenario.compare = [1] is invalid: accepted a table"),
    ],
)
def test_a_bad_compare_section_in_a_baseline_is_one_line_naming_the_file_key_and_value(
    tmp_path, capsys, thresholds, message
):
    m = {"step_time_s": metric(_times(0.010), "s", "lower")}
    base = _raw(tmp_path / "base" / "demo.json", _doc([_run(m)], thresholds=thresholds))
    new = _raw(tmp_path / "new" / "demo.json", _doc([_run(m)]))
    assert main(["compare", str(base), str(new)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{base}: " in err and message in err and len(err.splitlines()) == 1
    assert "could not convert" not in err and len(err) < 300


def test_a_run_twice_in_one_file_is_refused_naming_the_file(tmp_path, capsys):
    twice = _raw(tmp_path / "new" / "demo.json", _doc([_run({}), _run({})]))
    assert main(["compare", str(twice), str(twice)]) == 2
    assert f"{twice}: run demo [world_size=2] is twice in that file" in capsys.readouterr().err
