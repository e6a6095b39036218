"""The fault kind (moebench/kinds/fault.py): each fault type injected on 2 gloo ranks, detected and
named; the [fault] section's checks; the verdict when the culprit is misnamed."""

from __future__ import annotations

import pytest
from test_scenario import MINIMAL, with_key, write

from moebench import runner
from moebench.kinds import fault
from moebench.results import read
from moebench.scenario import ScenarioError, load


def _doc(**fault_keys) -> dict:
    doc = with_key("scenario", "kind", "fault")
    doc["scenario"] |= {"warmup": 2, "repeats": 6}
    doc["model"] |= {"top_k": 2, "layers": 2}
    doc["workload"] |= {"tokens_per_rank": 64}
    doc["parallel"] = {"world_size": 2, "device": "cpu", "threads_per_rank": 1}
    doc["fault"] = {"rank": 1, "layer": 1, "expert": 1, "at_step": 3, "detect_timeout_s": 1.0} | fault_keys
    return doc


@pytest.mark.multiproc
def test_every_fault_type_is_detected_and_named_on_two_ranks(tmp_path):
    doc = _doc(type=["crash", "hang", "nan", "straggler"])
    assert runner.run_scenarios([load(write(tmp_path, doc))], tmp_path / "out", None) == 0
    runs = {r["params"]["type"]: r for r in read(tmp_path / "out" / "t.json")["runs"]}
    for kind, run in runs.items():
        f = run["details"]["fault"]
        check = run["checks"][0]
        assert run["status"] == "ok" and (check["name"], check["pass"]) == ("fault_detected", True)
        assert f["detected"] is True and f["culprit_rank"] == 1, kind
        assert set(fault.DETAIL_KEYS) <= f.keys()
        assert run["metrics"]["detected_after_s"]["median"] >= 0
    assert runs["crash"]["details"]["fault"]["culprit_layer"] == 1  # its last heartbeat: step 3, layer 1
    assert runs["crash"]["details"]["fault"]["steps_lost"] == 8 - 3
    hang = runs["hang"]["metrics"]["detected_after_s"]["median"]
    assert 1.0 <= hang < 1.0 + 5  # the timeout, plus at most the documented poll slack
    nan = runs["nan"]["details"]["fault"]
    assert (nan["culprit_layer"], nan["culprit_expert"]) == (1, 1)
    straggler = runs["straggler"]["details"]["fault"]
    assert straggler["straggler_score_W"][0] == 1.0 and straggler["straggler_score_W"][1] < fault.STRAGGLER_SCORE
    assert runs["crash"]["config"]["fault"]["type"] == "crash"


def test_a_misnamed_culprit_fails_the_check():
    (spec,) = load_doc(_doc(type="crash"))
    stopped = [{"failure": {"rank": 0, "how": "crashed", "step": 3, "layer": 1, "after_s": 0.01}, "telemetry": {}}]
    _, (check,), details = fault.evaluate(spec, stopped)
    assert check["pass"] is False and details["fault"]["culprit_rank"] == 0 and "expected" in check["detail"]
    hung = [{"failure": {"rank": 1, "how": "hung", "step": 3, "layer": 1, "after_s": 1.2}, "telemetry": {}}]
    assert fault.evaluate(spec, hung)[1][0]["pass"] is False  # a crash reported as a hang is misnamed


def load_doc(doc: dict):
    import tempfile
    from pathlib import Path

    return load(write(Path(tempfile.mkdtemp()), doc)).runs


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_key("fault", "type", "crash"), '[fault] type = "crash" is invalid for kind = "throughput": accepted'),
        (_doc(), "[fault] type is missing: accepted one of crash, hang, nan, straggler"),
        (_doc(type="rank_loss"), '[fault] type = "rank_loss" is not built yet (it needs redundant experts)'),
        (_doc(type="crash", rank=2), "[fault] rank = 2 is invalid: accepted 0 to world_size - 1 = 1"),
        (_doc(type="nan", expert=4), "[fault] expert = 4 is invalid: accepted 0 to num_experts - 1 = 3"),
        (_doc(type="hang", at_step=8), "[fault] at_step = 8 is invalid: accepted 0 to warmup + repeats - 1 = 7"),
        (_doc(type="straggler", at_step=0), "[fault] at_step = 0 is invalid for a straggler: accepted 1 or more"),
        (_doc(type="hang", detect_timeout_s=0.1), "[fault] detect_timeout_s = 0.1 is invalid: accepted a finite"),
        (_doc(type="boom"), '[fault] type = "boom" is invalid: accepted one of'),
    ],
)
def test_bad_fault_settings_are_refused_in_one_line(tmp_path, doc, message):
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_other_kinds_record_no_fault():
    (run,) = load_doc(MINIMAL)
    assert run.fault["type"] is None and "fault" not in run.resolved()


@pytest.mark.multiproc
def test_the_soak_tool_counts_what_went_wrong(tmp_path, monkeypatch):
    from moebench.tools import fault_soak

    result = fault_soak.soak(3, seed=1, timeout=1.0, folder=tmp_path)
    assert result["counts"] == {"faults": 3, "hangs": 0, "orphans": 0, "late": 0, "undetected": 0, "misnamed": 0}
    assert [row[0] for row in result["rows"]] == [0, 1, 2] and all(row[7] for row in result["rows"])
    # a fault seen but named wrong, or not seen at all, is counted
    misnamed = {"status": "ok", "checks": [{"pass": False}], "metrics": {}, "details": {"fault": {"detected": True}}}
    monkeypatch.setattr(fault_soak.runner, "run_one", lambda spec, interval: misnamed)
    assert fault_soak.soak(1, seed=1, timeout=1.0, folder=tmp_path)["counts"]["misnamed"] == 1
    missed = misnamed | {"details": {"fault": {"detected": False}}}
    monkeypatch.setattr(fault_soak.runner, "run_one", lambda spec, interval: missed)
    counts = fault_soak.soak(1, seed=1, timeout=1.0, folder=tmp_path)["counts"]
    assert (counts["undetected"], counts["misnamed"]) == (1, 0)
