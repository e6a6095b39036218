"""Confirmation by rerun (``moebench compare --confirm N``): the rule on hand-built rows, and the
command end to end on a real scenario whose result is doctored on one side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.metrics import metric
from moebench.regress import compare as C
from moebench.regress.confirm import NO_INVOCATION, _options, confirm, plan, rerun_dirs
from moebench.report.results import write_atomic
from tests.result_docs import result_doc, run_record


def _row(metric_name: str, verdict: str, ratio: float | None = 1.0, run: str = "-") -> C.Row:
    return C.Row("demo", run, metric_name, "ratio", 1.0, ratio, ratio, 0.001, 0.15, verdict)


def test_a_slower_row_stands_only_when_every_rerun_reads_slower():
    rows = [_row("a", "slower", 1.3), _row("b", "slower", 1.3), _row("c", "slower", 1.3), _row("d", "slower", 1.3)]
    reruns = [
        [_row("a", "slower", 1.28), _row("b", "slower", 1.25), _row("c", "same", 1.02)],
        [_row("a", "slower", 1.31), _row("b", "noisy", 1.2), _row("c", "slower", 1.3)],
    ]
    out = {r.metric: r for r in confirm(rows, reruns)}
    assert out["a"].verdict == "slower" and out["a"].regression
    assert "confirmed: 2 rerun(s) read slower too (1.280, 1.310)" in out["a"].note
    for name in ("b", "c"):  # one rerun that does not repeat it is enough to clear it
        assert out[name].verdict == "unconfirmed" and not out[name].regression
    assert "noisy" in out["b"].note and "same" in out["c"].note
    # a row the reruns lack cannot be judged by them: it stays a regression (the gate fails closed)
    assert out["d"].verdict == "slower" and "kept: a rerun could not judge it (missing, missing)" in out["d"].note
    assert out["a"].ratio == 1.3  # the row keeps its own figures


def test_a_rerun_that_failed_or_ran_elsewhere_keeps_the_regression():
    rows = [_row("t", "slower", 1.3, run="a"), _row("t", "slower", 1.3, run="b"), _row("t", "slower", 1.3, run="c")]
    rerun = [
        C.Row("demo", "a", "run", verdict="failed", note="RuntimeError: boom"),
        C.Row("demo", "b", "environment", verdict="env differs"),
        _row("t", "same", 1.0, run="c"),
    ]
    out = {r.run: r for r in confirm(rows, [rerun])}
    assert out["a"].verdict == "slower" and "(failed)" in out["a"].note
    assert out["b"].verdict == "slower" and "(env differs)" in out["b"].note
    assert out["c"].verdict == "unconfirmed"
    # runs that cannot be rerun at all (pytest-benchmark results) keep their rows, saying why
    kept = confirm([_row("time_s", "slower", 1.3)], [], {("demo", "-"): "x.json is a pytest-benchmark result"})
    assert kept[0].verdict == "slower" and "not confirmed, kept: x.json is a pytest-benchmark result" in kept[0].note


def test_a_rerun_that_could_not_judge_keeps_the_regression_whatever_another_rerun_read():
    rows = [_row("t", "slower", 1.3, run=r) for r in ("a", "b", "c", "d")]
    first = [
        C.Row("demo", "a", "run", verdict="failed", note="RuntimeError: boom"),
        C.Row("demo", "b", "environment", verdict="env differs"),
        # c: the first rerun lacks the metric
        C.Row("demo", "d", "run", verdict="failed", note="RuntimeError: boom"),
    ]
    second = [_row("t", "same", 1.0, run="a"), _row("t", "faster", 0.8, run="b"), _row("t", "noisy", 1.1, run="c")]
    second.append(_row("t", "slower", 1.3, run="d"))
    out = {r.run: r for r in confirm(rows, [first, second])}
    # one rerun read it not slower, but the other measured nothing: only a measurement clears a regression
    assert out["a"].verdict == "slower" and "kept: a rerun could not judge it (failed, same)" in out["a"].note
    assert out["b"].verdict == "slower" and "kept: a rerun could not judge it (env differs, faster)" in out["b"].note
    assert out["c"].verdict == "slower" and "kept: a rerun could not judge it (missing, noisy)" in out["c"].note
    # one rerun read slower and the other could not judge: kept, not "confirmed by 2 reruns"
    assert out["d"].verdict == "slower" and "kept: a rerun could not judge it (failed, slower)" in out["d"].note
    assert all(r.regression for r in out.values())


def test_only_slower_rows_are_confirmed_and_no_rerun_changes_nothing():
    rows = [_row("err", "worse", 3.0), _row("gone", "missing", None), _row("t", "faster", 0.8), _row("s", "slower")]
    clean = [[_row("err", "same"), _row("gone", "same"), _row("t", "same"), _row("s", "same")]]
    out = {r.metric: r.verdict for r in confirm(rows, clean)}
    # an exact metric is the same in every run of a seed, and a missing one is no timing event
    assert out == {"err": "worse", "gone": "missing", "t": "faster", "s": "unconfirmed"}
    assert confirm(rows, []) == rows


def test_rerun_folders_sit_beside_new_never_inside_it_and_never_reuse_one(tmp_path, monkeypatch):
    (tmp_path / "new").mkdir()
    assert rerun_dirs(tmp_path / "new", 2) == [tmp_path / "new-confirm-1", tmp_path / "new-confirm-2"]
    (tmp_path / "new-confirm-1").mkdir()  # an earlier rerun is kept, and skipped
    assert rerun_dirs(tmp_path / "new", 1) == [tmp_path / "new-confirm-2"]
    # a file NEW: beside its folder, which a compare of that folder would otherwise read
    assert rerun_dirs(tmp_path / "new" / "x.json", 1) == [tmp_path / "new-x-confirm-1"]
    monkeypatch.chdir(tmp_path / "new")
    assert rerun_dirs(".", 1) == [tmp_path / "new-confirm-2"]  # "." is a folder with a name


def test_a_result_without_its_run_settings_is_refused_in_one_line():
    doc = {"scenario": {"scenario": {"name": "x"}}, "invocation": {"argv": [], "flags": {}}, "runs": []}
    with pytest.raises(ValueError, match=r"--confirm: x.json lacks its scenario's warmup or repeats, or its invo"):
        _options("x.json", doc)


FLAGS = {"device": None, "world_size": None, "warmup": None, "repeats": None, "no_telemetry": False}
FLAGS |= {"telemetry_interval": 0.1, "record_routing": None, "trace": None}


def _doc_invoked(flags: dict | None, parallel: dict | None = None, telemetry_reason: str | None = None) -> dict:
    """A result file of a scenario with warmup 2 and repeats 40; ``flags``: its invocation's (None: none recorded)."""
    run = run_record({"step_time_s": metric([0.01], "s", "lower")})
    run["telemetry"] = {"per_rank": [{"available": False, "reason": telemetry_reason}]}
    doc = result_doc([run], name="tiny-dispatch", kind="dispatch")
    doc["scenario"] |= {"scenario": {"name": "tiny-dispatch", "kind": "dispatch", "warmup": 2, "repeats": 40}}
    doc["scenario"]["parallel"] = parallel or {"world_size": [1, 2], "device": "auto"}
    if flags is not None:
        doc["invocation"] = {"argv": ["run", "x.toml"], "flags": flags}
    return doc


def test_the_rerun_options_are_the_recorded_invocations_flags_not_read_from_message_text():
    off = _doc_invoked(FLAGS | {"no_telemetry": True, "device": "cpu", "world_size": 2})
    pinned = ["--device", "cpu", "--world-size", "2"]  # the flags, over the scenario's own "auto" and sweep
    assert _options("x.json", off) == ["--warmup", "2", "--repeats", "40", *pinned, "--no-telemetry"]
    # runs whose telemetry reason reads like --no-telemetry's, made with telemetry on (interval 0.5): the flags decide
    on = _doc_invoked(FLAGS | {"telemetry_interval": 0.5}, telemetry_reason="telemetry switched off (--no-telemetry)")
    assert _options("x.json", on)[4:] == ["--device", "auto", "--telemetry-interval", "0.5"]
    # no flag given: a device and world size the scenario fixes (scalars) still pin the rerun
    fixed = _doc_invoked(FLAGS, parallel={"world_size": 1, "device": "cpu"})
    assert _options("x.json", fixed)[4:] == ["--device", "cpu", "--world-size", "1", "--telemetry-interval", "0.1"]


@pytest.mark.parametrize("invocation", [{}, "run x.toml", {"argv": [], "flags": None}, {"flags": ["cpu"]}])
def test_an_invocation_without_a_table_of_flags_is_treated_as_none_recorded(invocation):
    doc = _doc_invoked(FLAGS)
    doc["invocation"] = invocation
    assert _options("x.json", doc) is None  # not rerun, its slower rows kept: the same as a file without one


@pytest.mark.parametrize(("warmup", "repeats"), [(float("inf"), 40), (True, 40), (2, 1e999), (2, -1), (2.0, 40)])
def test_a_warmup_or_repeats_that_is_no_count_is_one_line_never_a_crash(warmup, repeats):
    doc = _doc_invoked(FLAGS)
    doc["scenario"]["scenario"] |= {"warmup": warmup, "repeats": repeats}
    with pytest.raises(ValueError, match=r"^--confirm: x.json lacks its scenario's warmup or repeats"):
        _options("x.json", doc)


def test_flags_of_the_wrong_type_or_size_are_not_passed_on():
    odd = _doc_invoked(FLAGS | {"world_size": True, "telemetry_interval": 10**400}, parallel={"device": "auto"})
    assert _options("x.json", odd) == ["--warmup", "2", "--repeats", "40", "--device", "auto"]


def test_a_result_without_an_invocation_is_not_rerun_and_its_slower_rows_say_why(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    old = _doc_invoked(None)
    old["source"] = str(scenario)
    write_atomic(tmp_path / "old" / "tiny-dispatch.json", old)
    new = C.load([tmp_path / "old"])
    rows = [C.Row("tiny-dispatch", new[0].label, "step_time_s", "s", 1.0, 1.3, 1.3, 0.001, 0.05, "slower")]
    plans, cannot = plan(rows, new)
    file = str(tmp_path / "old" / "tiny-dispatch.json")
    assert plans == [] and cannot == {("tiny-dispatch", new[0].label): f"{file} {NO_INVOCATION}"}
    assert capsys.readouterr().err == f"confirming: {file} {NO_INVOCATION}\n"  # said once, in one line
    (kept,) = confirm(rows, [], cannot)
    assert kept.verdict == "slower" and kept.regression and "records no invocation" in kept.note


def test_run_records_its_argv_and_flags_in_every_result_file(tmp_path, monkeypatch):
    from moebench import runner

    seen = []
    monkeypatch.setattr(runner, "run_scenarios", lambda *args: seen.append(args[-1]) or 0)
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    argv = ["run", str(scenario), "--out", str(tmp_path / "o"), "--world-size", "1", "--no-telemetry"]
    assert main([*argv, "--trace", str(tmp_path / "t"), "--repeats", "3"]) == 0
    flags = FLAGS | {"world_size": 1, "no_telemetry": True, "repeats": 3, "trace": str(tmp_path / "t")}
    assert seen == [{"argv": [*argv, "--trace", str(tmp_path / "t"), "--repeats", "3"], "flags": flags}]


SCENARIO = """
[scenario]
name = "tiny-dispatch"
kind = "dispatch"
warmup = 2
repeats = 40
[model]
hidden = 16
ffn_hidden = 16
num_experts = 4
top_k = 2
layers = 1
[parallel]
world_size = 1
device = "cpu"
threads_per_rank = 1
[workload]
tokens_per_rank = 32
[compare]
dispatch_over_floor = 0.5
combine_over_floor = 0.5
min_effect = 100.0
"""


def _scaled(src: Path, dst: Path, factor: float) -> None:
    """``src``'s result with every ``dispatch_over_floor`` sample times ``factor``."""
    doc = json.loads(src.read_text())
    for run in doc["runs"]:
        m = run["metrics"]["dispatch_over_floor"]
        run["metrics"]["dispatch_over_floor"] = metric([v * factor for v in m["samples"]], m["unit"], m["better"])
    write_atomic(dst, doc)


@pytest.mark.slow
@pytest.mark.multiproc
def test_cli_confirm_keeps_a_regression_every_rerun_shows_and_clears_a_one_run_spike(tmp_path, capsys):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(SCENARIO)
    real = tmp_path / "real"
    assert main(["run", str(scenario), "--out", str(real), "--no-telemetry"]) == 0
    result = real / "tiny-dispatch.json"
    invoked = json.loads(result.read_text())["invocation"]  # what the rerun below is built from
    assert invoked["argv"] == ["run", str(scenario), "--out", str(real), "--no-telemetry"]
    assert invoked["flags"]["no_telemetry"] is True and invoked["flags"]["world_size"] is None
    # the code "got 4x slower" (the baseline is 4x faster than this code runs): every rerun shows it
    _scaled(result, tmp_path / "fast-base" / "tiny-dispatch.json", 0.25)
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "fast-base"), str(real), "--confirm", "1"]) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "confirmed: 1 rerun(s) read slower too" in out
    assert (tmp_path / "real-confirm-1" / "tiny-dispatch.json").is_file()  # the rerun is kept, beside NEW
    # a one-run spike: NEW's figures 4x a run of the same code; the rerun reads about 1x
    _scaled(result, tmp_path / "spike" / "tiny-dispatch.json", 4.0)
    report, md = tmp_path / "compare.json", tmp_path / "compare.md"
    argv = ["compare", str(real), str(tmp_path / "spike"), "--json", str(report), "--markdown", str(md)]
    assert main([*argv, "--confirm", "1"]) == 0
    out = capsys.readouterr().out
    assert "unconfirmed" in out and "not repeated by 1 rerun(s): same" in out
    rerun_dir = str(tmp_path / "spike-confirm-1")
    assert json.loads(report.read_text())["confirmation"] == {"times": 1, "reruns": [rerun_dir]}
    assert f"--confirm 1: slower rows rerun into `{rerun_dir}`" in out and rerun_dir in md.read_text()
    # without --confirm the spike is a regression: the option is what clears it
    assert main(argv) == 1
    assert json.loads(report.read_text())["confirmation"] == {"times": 0, "reruns": []}
    assert "--confirm" not in capsys.readouterr().out + md.read_text()
    runs = C.load([tmp_path / "spike"])
    rows = C.compare(C.load([real]), runs, C.Settings())
    ((source, options, _),), cannot = plan(rows, runs)
    assert source == scenario and not cannot
    assert options == ["--warmup", "2", "--repeats", "40", "--device", "cpu", "--world-size", "1", "--no-telemetry"]
    # a NEW made from other code is not confirmed by a rerun of this checkout's code
    doc = json.loads((tmp_path / "spike" / "tiny-dispatch.json").read_text())
    doc["environment"]["git_sha"] = "0" * 40
    write_atomic(tmp_path / "old" / "tiny-dispatch.json", doc)
    assert main(["compare", str(real), str(tmp_path / "old"), "--confirm", "1"]) == 2
    assert f"NEW was made with git commit {'0' * 40}, the rerun" in capsys.readouterr().err


def test_confirm_usage_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit, code 2
        main(["compare", str(tmp_path), str(tmp_path), "--confirm", "11"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "argument --confirm: 11: accepted an integer from 0 to 10" in err[0]
    for side in ("a", "b", "c"):
        write_atomic(tmp_path / side / "x.json", {"schema": "bogus"})
    args = ["compare", *(str(tmp_path / s) for s in "abc"), "--confirm", "1"]
    assert main(args) == 2
    assert "--confirm 1 with 3 sets: accepted with BASELINE and one NEW" in capsys.readouterr().err


def test_the_a_a_tool_confirms_each_pair_against_a_third_run(tmp_path):
    """Runs 0 and 2 read 1.0; run 1 spiked to 1.5 (one event). Pair (0, 1) reads slower, and its
    stand-in rerun, run 2, reads same: unconfirmed. With runs 1 and 2 both slow, it stands."""
    from result_docs import result_doc, run_record, times

    from moebench.tools.false_alarms import confirmed, pairs, pairwise

    def folders(levels):
        out = []
        for i, level in enumerate(levels):
            m = {"dispatch_over_floor": metric(times(level, seed=i), "ratio", "lower")}
            write_atomic(tmp_path / f"{levels}" / f"run{i}" / "demo.json", result_doc([run_record(m)]))
            out.append(tmp_path / f"{levels}" / f"run{i}")
        return out

    def alarms(comparisons):
        return [(i, j) for (i, j), rows in zip(pairs(3), comparisons, strict=True) if any(r.regression for r in rows)]

    spike = folders((1.0, 1.5, 1.0))
    assert alarms(pairwise(spike)) == [(0, 1)]  # before confirmation
    assert alarms(confirmed(spike, pairwise(spike))) == []
    real = folders((1.0, 1.5, 1.5))  # what a slower code from run 1 on looks like
    assert alarms(confirmed(real, pairwise(real))) == [(0, 1), (0, 2)]
    with pytest.raises(ValueError, match="confirmation needs a third run: got 2"):
        confirmed(spike[:2], pairwise(spike[:2]))


def test_the_confirmation_line_says_how_many_reruns_went_where_or_that_none_ran():
    assert C.confirmation_line(None) == "" and C.confirmation_line({"times": 0, "reruns": []}) == ""
    line = C.confirmation_line({"times": 2, "reruns": ["r/a-confirm-1", "r/a-confirm-2"]})
    assert line == "--confirm 2: slower rows rerun into `r/a-confirm-1`, `r/a-confirm-2`"
    assert C.confirmation_line({"times": 1, "reruns": []}).startswith("--confirm 1: nothing rerun")
    rows = [C.Row("s", "r", "step_time_s", "s", 1.0, 1.0, 1.0, 0.5, 0.05, "same")]
    doc = C.to_json(rows, "b", "n", {"times": 1, "reruns": ["x"]})
    assert doc["confirmation"] == {"times": 1, "reruns": ["x"]}
    assert "--confirm 1: slower rows rerun into `x`" in C.markdown_report(rows, "b", "n", {"times": 1, "reruns": ["x"]})
