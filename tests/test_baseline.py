"""``moebench baseline``: passing results into their class folder, several runs merged into one."""

from __future__ import annotations

import json
import re

import pytest
from result_docs import result_doc as _doc
from result_docs import run_record as _run
from result_docs import times as _times

from moebench.cli import main
from moebench.metrics import metric
from moebench.regress import compare as C
from moebench.regress.baseline import RULE, folder_for, update
from moebench.report.results import write_atomic


def test_baseline_update_writes_passing_results_into_their_class_folder(tmp_path):
    results = tmp_path / "results"
    write_atomic(results / "demo.json", _doc([_run({"step_time_s": metric([1.0, 1.1], "s", "lower")})]))
    written = update([results], tmp_path / "baselines")
    assert written == [(tmp_path / "baselines" / "cpu-2core" / "demo.json", 1)]
    doc = json.loads(written[0][0].read_text())
    assert doc["runs"][0]["metrics"]["step_time_s"]["median"] == pytest.approx(1.05)
    assert doc["baseline_of"] == {"runs": 1, "rule": RULE, "sources": [str(results / "demo.json")]}
    assert folder_for([results], tmp_path / "baselines") == tmp_path / "baselines" / "cpu-2core"


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        (_doc([_run({})], knobs={"MOEBENCH_TEST_ONLY_SLOW_DISPATCH": "0.15"}), "test-only knobs set"),
        (_doc([_run({}, status="error")]), "is error: a baseline holds passing runs only"),
        (_doc([_run({}, checks=[{"name": "finite_output", "pass": False}])]), "is failed finite_output"),
        (
            _doc([_run({"step_time_s": metric([1.0, 1.1], "s", "lower")}, host_busy=True)]),
            "ran on a busy host (host_busy): its timings would hide regressions",
        ),
    ],
)
def test_baseline_update_refuses_results_that_must_not_be_baselines(tmp_path, doc, reason):
    good = tmp_path / "results" / "a.json"
    write_atomic(good, _doc([_run({})]))
    write_atomic(tmp_path / "results" / "b.json", doc)
    with pytest.raises(ValueError, match=re.escape(reason)):
        update([tmp_path / "results"], tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()  # nothing is written when any file is refused


def test_a_busy_run_becomes_a_baseline_only_when_allowed_and_stays_marked_busy(tmp_path):
    timed = {"step_time_s": metric([1.0, 1.1], "s", "lower")}
    for name, busy in (("a", False), ("b", True), ("c", False)):
        write_atomic(tmp_path / name / "demo.json", _doc([_run(timed, host_busy=busy)]))
    folders = [tmp_path / name for name in "abc"]
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'b' / 'demo.json'}: not written")):
        update(folders, tmp_path / "baselines")
    ((path, runs),) = update(folders, tmp_path / "baselines", allow_busy=True)
    assert runs == 3 and json.loads(path.read_text())["runs"][0]["host_busy"] is True


def test_a_busy_run_of_exact_metrics_only_becomes_a_baseline(tmp_path):
    """A busy host moves timings, not seeded load counts: a load_balance run over more ranks than
    cores (busy by its own threads) is a fine baseline."""
    loads = {"load_cv": metric([0.5], "ratio", "lower", exact=True)}
    write_atomic(tmp_path / "a" / "demo.json", _doc([_run(loads, host_busy=True)]))
    ((path, _),) = update([tmp_path / "a"], tmp_path / "baselines")
    assert json.loads(path.read_text())["runs"][0]["metrics"]["load_cv"]["median"] == 0.5


# -------------------------------------------------------------------------------------------
# Several runs: the median of the medians


def _three_runs(tmp_path, medians=(1.68, 1.49, 1.50), rates=(100.0, 200.0, 300.0)) -> list:
    """Folders a, b, c: one run each of the scenarios demo and other (as three `moebench run`s of a set)."""
    folders = []
    for i, (name, median, rate) in enumerate(zip("abc", medians, rates, strict=True)):
        metrics = {
            "combine_over_floor": metric(_times(median, n=40, seed=i), "ratio", "lower"),
            "tokens_per_s": metric(_times(rate, seed=i), "tokens/s", "higher"),
            "tokens_dropped": metric([7], "copies", "lower", exact=True),
        }
        write_atomic(tmp_path / name / "demo.json", _doc([_run(metrics)]))
        write_atomic(tmp_path / name / "other.json", _doc([_run({})], name="other"))
        folders.append(tmp_path / name)
    return folders


def test_three_runs_merge_each_metric_into_the_record_of_its_median_run(tmp_path):
    folders = _three_runs(tmp_path)
    written = update(folders, tmp_path / "baselines")
    target = tmp_path / "baselines" / "cpu-2core"
    assert written == [(target / "demo.json", 3), (target / "other.json", 3)]
    merged = json.loads((target / "demo.json").read_text())
    sources = [json.loads((folder / "demo.json").read_text())["runs"][0]["metrics"] for folder in folders]
    metrics = merged["runs"][0]["metrics"]
    # combine_over_floor: medians 1.68 (a), 1.49 (b), 1.50 (c): the median is c's, the 1.68 outlier is gone
    assert metrics["combine_over_floor"] == sources[2]["combine_over_floor"]
    assert metrics["combine_over_floor"]["median"] == pytest.approx(1.50, rel=0.01)
    assert len(metrics["combine_over_floor"]["samples"]) == 40  # one run's samples, not the three pooled
    assert metrics["tokens_per_s"] == sources[1]["tokens_per_s"]  # each metric its own median run: b's
    assert metrics["tokens_dropped"]["median"] == 7
    names = [str(folder / "demo.json") for folder in folders]
    assert merged["baseline_of"] == {"runs": 3, "rule": RULE, "sources": names}
    provenance = merged["runs"][0]["baseline_of"]
    assert provenance["medians"]["combine_over_floor"] == [s["combine_over_floor"]["median"] for s in sources]
    assert provenance["picked"] == {
        "combine_over_floor": names[2],
        "tokens_per_s": names[1],
        "tokens_dropped": names[1],  # equal medians: the middle run
    }


def test_a_merged_baseline_compares_with_the_median_run_as_same_and_says_how_it_was_made(tmp_path):
    folders = _three_runs(tmp_path)
    update(folders, tmp_path / "baselines")
    base = C.load([tmp_path / "baselines" / "cpu-2core" / "demo.json"])
    rows = C.compare(base, C.load([folders[2] / "demo.json"]), C.Settings())
    assert {r.metric: r.verdict for r in rows}["combine_over_floor"] == "same"
    assert C.software_notes(base, [])[0].endswith("baseline of 3 runs (median of medians)")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc["environment"].update(git_sha="def"), "environment.git_sha = 'def' differs from 'abc'"),
        (lambda doc: doc["environment"].update(torch="2.12.0"), "environment.torch = '2.12.0' differs from '2.13.0'"),
        (lambda doc: doc["runs"][0].update(params={"world_size": 4}), "runs[0].params.world_size = 4 differs from 2"),
        (lambda doc: doc["scenario"].update(compare={"min_effect": 0.5}), "scenario.compare.min_effect = 0.5 differs"),
        (lambda doc: doc["runs"][0]["metrics"].pop("tokens_per_s"), "runs[0].metrics = ['combine_over_floor', 'tok"),
        (lambda doc: doc["runs"].append(doc["runs"][0]), "runs = '2 runs' differs from '1 runs'"),
    ],
)
def test_runs_of_different_code_settings_or_params_are_not_merged(tmp_path, change, message):
    folders = _three_runs(tmp_path)
    doc = json.loads((folders[1] / "demo.json").read_text())
    change(doc)
    write_atomic(folders[1] / "demo.json", doc)
    with pytest.raises(ValueError, match=re.escape(f"{folders[1] / 'demo.json'}: {message}")):
        update(folders, tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_an_even_or_uneven_number_of_runs_is_refused(tmp_path):
    folders = _three_runs(tmp_path)
    with pytest.raises(ValueError, match=r"2 runs of one scenario: accepted an odd number \(1, 3, 5, \.\.\.\)"):
        update(folders[:2], tmp_path / "baselines")
    (folders[2] / "other.json").unlink()
    with pytest.raises(
        ValueError, match=re.escape("every scenario needs the same number of runs: demo.json in 3, other.json in 2")
    ):
        update(folders, tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_a_metric_with_a_value_in_some_runs_only_is_not_merged(tmp_path):
    folders = _three_runs(tmp_path)
    doc = json.loads((folders[2] / "demo.json").read_text())
    doc["runs"][0]["metrics"]["tokens_dropped"]["median"] = None
    write_atomic(folders[2] / "demo.json", doc)
    with pytest.raises(ValueError, match="metric tokens_dropped has no value \\(NaN\\) there but has in others"):
        update(folders, tmp_path / "baselines")


def test_cli_baseline_update_and_path(tmp_path, capsys):
    results = tmp_path / "results"
    write_atomic(results / "demo.json", _doc([_run({"step_time_s": metric([1.0, 1.1], "s", "lower")})]))
    root = tmp_path / "baselines"
    assert main(["baseline", "update", str(results), "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {root / 'cpu-2core' / 'demo.json'}"
    assert main(["baseline", "path", str(results), "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(root / "cpu-2core")
    write_atomic(results / "demo.json", _doc([_run({}, status="error")]))
    assert main(["baseline", "update", str(results), "--root", str(root)]) == 2
    assert "not written as a baseline" in capsys.readouterr().err


def test_cli_baseline_update_of_three_runs_says_it_merged_them(tmp_path, capsys):
    folders = _three_runs(tmp_path)
    root = tmp_path / "baselines"
    assert main(["baseline", "update", *map(str, folders), "--root", str(root)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {root / 'cpu-2core' / 'demo.json'} (median of 3 runs)",
        f"wrote {root / 'cpu-2core' / 'other.json'} (median of 3 runs)",
    ]
    assert main(["baseline", "update", *map(str, folders[:2]), "--root", str(root)]) == 2
    err = capsys.readouterr().err
    assert "accepted an odd number" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(median=float("nan")), "step_time_s.median = NaN is invalid"),
        (lambda m: m.update(max=float("inf")), "step_time_s.max = Infinity is invalid"),
        (lambda m: m["samples"].__setitem__(0, "1.0"), 'step_time_s.samples[0] = "1.0" is invalid'),
        (lambda m: m["samples"].__setitem__(1, -1.0), "step_time_s.samples[1] = -1.0 is invalid"),
    ],
)
def test_baseline_update_refuses_what_compare_would_refuse_and_writes_nothing(tmp_path, edit, message):
    m = metric([1.0, 1.1], "s", "lower")
    edit(m)
    path = tmp_path / "results" / "demo.json"
    path.parent.mkdir()
    path.write_text(json.dumps(_doc([_run({"step_time_s": m})])))  # NaN and Infinity as another tool writes them
    with pytest.raises(ValueError, match=re.escape(f"{path}: runs[0].metrics.{message}")):
        update([tmp_path / "results"], tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


@pytest.mark.parametrize("where", ["one file", "two files"])
def test_baseline_update_refuses_a_duplicated_run_that_compare_would_refuse(tmp_path, where):
    if where == "one file":
        write_atomic(tmp_path / "results" / "demo.json", _doc([_run({}), _run({})]))
        message = "demo.json: run demo [world_size=2] is twice in that file"
    else:
        write_atomic(tmp_path / "results" / "a.json", _doc([_run({})]))
        write_atomic(tmp_path / "results" / "b.json", _doc([_run({})]))
        message = f"b.json: run demo [world_size=2] is also in {tmp_path / 'results' / 'a.json'}"
    with pytest.raises(ValueError, match=re.escape(message)):
        update([tmp_path / "results"], tmp_path / "baselines")
    assert not (tmp_path / "baselines").exists()


def test_baseline_update_with_a_root_that_is_a_file_is_one_line_and_leaves_the_file(tmp_path, capsys):
    write_atomic(tmp_path / "results" / "demo.json", _doc([_run({})]))
    root = tmp_path / "root.txt"
    root.write_text("mine\n")
    assert main(["baseline", "update", str(tmp_path / "results"), "--root", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"moebench: error: --root {root}: not a folder: accepted a folder (made if missing) for the baselines"
    assert root.read_text() == "mine\n"
    (tmp_path / "base" / "cpu-2core").mkdir(parents=True)
    (tmp_path / "base" / "cpu-2core" / "demo.json").mkdir()  # a folder where the baseline file would go
    assert main(["baseline", "update", str(tmp_path / "results"), "--root", str(tmp_path / "base")]) == 2
    assert "demo.json: cannot write the baseline: a folder has its name" in capsys.readouterr().err
