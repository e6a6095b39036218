"""Hostile or broken input gives one line naming the file, key and value (exit 2), never a traceback;
a crash of the tool itself is exit 3; result files are written whatever their values, with the
user's umask, and a result that cannot be written does not stop the other scenarios."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from moebench import cli
from moebench.cli import main
from moebench.plan.spec import PlanError, load_plan
from moebench.report import results
from moebench.scenario import MAX_RUNS, ScenarioError, load
from runtime.config import DTYPES

SEED_PLAN = Path(__file__).resolve().parent.parent / "scenarios" / "plans" / "seed-002.toml"

SCENARIO = """
[scenario]
name = "{name}"
kind = "throughput"
warmup = 1
repeats = 2

[model]
hidden = {hidden}
ffn_hidden = 32
num_experts = 4
top_k = 2
dtype = "{dtype}"
expert_backend = "{backend}"

[parallel]
world_size = 1
device = "cpu"

[workload]
tokens_per_rank = 32
"""


def scenario(folder: Path, name="ok", hidden=16, dtype="float32", backend="auto", extra="") -> Path:
    path = folder / f"{name[:50]}.toml"
    path.write_text(SCENARIO.format(name=name, hidden=hidden, dtype=dtype, backend=backend) + extra)
    return path


def plan(folder: Path, section: str, key: str, value: str) -> Path:
    """The seed plan with ``[section] key = value`` (value as TOML text) set or added."""
    lines, current, done = [], None, False
    for line in SEED_PLAN.read_text().splitlines():
        if m := re.match(r"\[(\w+)\]", line):
            if current == section and not done:
                lines.append(f"{key} = {value}")
                done = True
            current = m.group(1)
        if current == section and re.match(rf"{key}\s*=", line):
            line, done = f"{key} = {value}", True
        lines.append(line)
    path = folder / "plan.toml"
    path.write_text("\n".join(lines) + ("" if done else f"\n[{section}]\n{key} = {value}") + "\n")
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -------------------------------------------------------------------------------------------
# Files that are not what they claim to be


@pytest.mark.parametrize("command", ["run", "plan"])
def test_deeply_nested_toml_is_a_one_line_error_naming_the_file(tmp_path, capsys, command):
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 1000 + "1" + "]" * 1000 + "\n")
    assert main([command, str(path)]) == 2
    err = one_line_error(capsys)
    assert f"{path}: not valid TOML here: arrays or tables nested too deeply" in err


@pytest.mark.parametrize("command", ["run", "plan"])
def test_a_file_that_is_not_utf8_is_named_with_the_offending_byte(tmp_path, capsys, command):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[scenario]\nname = "caf\xe9"\n')
    assert main([command, str(path)]) == 2
    assert f"{path}: not UTF-8 text (byte 0xe9 at offset 22)" in one_line_error(capsys)


def test_a_result_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_bytes(b'{"schema": "\xff"}')
    assert main(["report", str(path)]) == 2
    assert f"{path}: not a readable result file" in one_line_error(capsys)


def test_plan_on_a_scenario_file_points_to_moebench_run(tmp_path, capsys):
    path = scenario(tmp_path)
    assert main(["plan", str(path)]) == 2
    assert one_line_error(capsys).endswith(
        f"{path}: this is a scenario file ([scenario]), not a plan: run it with moebench run"
    )


def test_run_on_a_plan_file_points_to_moebench_plan(capsys):
    assert main(["run", str(SEED_PLAN)]) == 2
    assert one_line_error(capsys).endswith(
        f"{SEED_PLAN}: this is a deployment-plan file ([plan]), not a scenario: validate it with moebench plan"
    )


# -------------------------------------------------------------------------------------------
# Scenario values: bounded names, bounded sweeps, huge numbers, long values cut short


def test_a_scenario_name_over_100_characters_is_refused_at_load(tmp_path):
    load(scenario(tmp_path, name="n" * 100))
    with pytest.raises(
        ScenarioError, match=r"\[scenario\] name = \"n{59}… \(103 characters\) is invalid: accepted at most 100"
    ):
        load(scenario(tmp_path, name="n" * 101))


def test_sweeps_over_the_cap_are_refused_with_their_count_before_expanding(tmp_path):
    path = scenario(tmp_path)
    text = path.read_text().replace("tokens_per_rank = 32", f"tokens_per_rank = {list(range(1, 102))}")
    path.write_text(text.replace("hidden = 16", f"hidden = {list(range(4, 404, 4))}"))
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: the sweeps expand to 10,100 runs ([model] hidden (100) × [workload] tokens_per_rank (101)): "
        f"accepted at most {MAX_RUNS:,} runs per file"
    )


def test_the_sweep_cap_counts_without_expanding_a_sweep_that_would_not_fit_in_memory(tmp_path):
    path = scenario(tmp_path)
    text = path.read_text().replace("tokens_per_rank = 32", f"tokens_per_rank = {list(range(1, 3000))}")
    text = text.replace("hidden = 16", f"hidden = {list(range(4, 200, 4))}")
    path.write_text(text + f"seed = {list(range(1000))}\n")
    with pytest.raises(ScenarioError, match="the sweeps expand to 146,951,000 runs"):
        load(path)


@pytest.mark.parametrize(
    ("section", "line", "key"),
    [
        ("routing", "capacity_factor = 1" + "0" * 400, "capacity_factor"),
        ("slo", "max_step_time_s = 1" + "0" * 400, "max_step_time_s"),
        ("compare", "step_time_s = 1" + "0" * 400, "step_time_s"),
    ],
    ids=["routing", "slo", "compare"],
)
def test_a_400_digit_number_is_a_one_line_error_not_an_overflow(tmp_path, section, line, key):
    path = scenario(tmp_path, extra=f"\n[{section}]\n{line}\n")
    with pytest.raises(ScenarioError, match=rf"\[{section}\] {key} = 1000.*… \(401 characters\) is invalid"):
        load(path)


def test_a_million_character_value_comes_back_as_60_characters_and_its_length(tmp_path, capsys):
    path = scenario(tmp_path)
    path.write_text(path.read_text().replace('kind = "throughput"', f'kind = "{"k" * 1_000_000}"'))
    assert main(["run", str(path)]) == 2
    err = one_line_error(capsys)
    assert f'[scenario] kind = "{"k" * 59}… (1,000,002 characters) is invalid' in err and len(err) < 400


def test_a_million_character_key_is_cut_short_too(tmp_path, capsys):
    path = scenario(tmp_path, extra=f"\n[routing]\n{'k' * 1_000_000} = 1\n")
    assert main(["run", str(path)]) == 2
    assert len(one_line_error(capsys)) < 600


# -------------------------------------------------------------------------------------------
# grouped_mm shapes torch cannot run are refused at load


@pytest.mark.parametrize(("dtype", "hidden"), [("float16", 4), ("bfloat16", 12), ("float32", 2), ("float32", 6)])
def test_grouped_mm_rows_that_are_not_16_bytes_are_refused_at_load(tmp_path, dtype, hidden):
    multiple = 16 // DTYPES[dtype].itemsize
    with pytest.raises(
        ScenarioError,
        match=rf"\[model\] hidden = {hidden} is invalid with expert_backend = \"grouped_mm\" and dtype = "
        rf"\"{dtype}\": accepted a multiple of {multiple}",
    ):
        load(scenario(tmp_path, hidden=hidden, dtype=dtype, backend="grouped_mm"))
    load(scenario(tmp_path, hidden=hidden, dtype=dtype, backend="loop"))  # the other backends run it


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_grouped_mm_load_check_matches_what_torch_runs_on_cpu(tmp_path, dtype):
    """The loader accepts exactly the (hidden, ffn_hidden) torch._grouped_mm computes on this CPU."""
    from moebench.scenario import _check_grouped_mm

    for hidden in (2, 4, 6, 8, 12, 16):
        model = {"expert_backend": "grouped_mm", "dtype": dtype, "hidden": hidden, "ffn_hidden": 16}
        try:
            _check_grouped_mm(model)
            accepted = True
        except ValueError:
            accepted = False
        x_RD, w_LDH = torch.ones(6, hidden, dtype=DTYPES[dtype]), torch.ones(2, hidden, 16, dtype=DTYPES[dtype])
        try:
            torch.ops.aten._grouped_mm(x_RD, w_LDH, offs=torch.tensor([3, 6], dtype=torch.int32))
            runs = True
        except RuntimeError:
            runs = False
        assert accepted == runs, (dtype, hidden)


# -------------------------------------------------------------------------------------------
# Plan values: overflow, underflow, subnormals


@pytest.mark.parametrize(
    ("section", "key", "value", "accepted"),
    [
        ("model", "params", "1" + "0" * 310, "accepted a number from 1 to 1e30"),
        ("model", "layers", "1" + "0" * 310, "accepted an integer from 1 to 1e9"),
        ("claims", "ttft", '"1e-320 s"', "accepted a number from 1e-30 to 1e30 in s"),
        ("claims", "ttft", "5e-324", "accepted a number from 1e-30 to 1e30 in s"),
        ("claims", "tpot", '"1e999 s"', "accepted a number from 1e-30 to 1e30 in s"),
        ("hardware", "peak_flops", "1e300", "accepted a number from 1e-30 to 1e30 in FLOP/s"),
        ("hardware", "mfu", "1e-320", "accepted a number from 1e-30 to 1"),
        ("parallel", "capacity_factor", "1e-320", "accepted 0 or a number from 1e-30 to 1e30"),
        ("workload", "routing_skew", "inf", "accepted a number from 1 to 1e30"),
    ],
    ids=lambda v: v if len(str(v)) < 20 else f"{str(v)[:8]}...",
)
def test_plan_numbers_out_of_range_are_one_line_errors_naming_file_key_and_value(
    tmp_path, section, key, value, accepted
):
    path = plan(tmp_path, section, key, value)
    with pytest.raises(PlanError) as err:
        load_plan(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: [{section}] {key} = ") and accepted in message and len(message) < 400


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [("claims", "ttft", '"1e-30 s"'), ("claims", "ttft", '"1e30 s"'), ("model", "layers", str(10**9)),
     ("hardware", "mfu", "1e-30"), ("parallel", "capacity_factor", "0")],
)  # fmt: skip
def test_plans_at_the_ends_of_the_accepted_range_are_judged_not_crashed(tmp_path, capsys, section, key, value):
    assert main(["plan", str(plan(tmp_path, section, key, value)), "--search", "--max-gpus", "16"]) in (0, 1)
    assert "error" in capsys.readouterr().out.lower()  # the seed plan's findings are still reported


# -------------------------------------------------------------------------------------------
# Crashes of the tool: exit 3, one line, the traceback kept


def _crash(args):
    raise TypeError("planted bug\nsecond line of the message")


def test_an_unexpected_crash_exits_3_with_one_line_naming_the_traceback_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_list", _crash)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert main(["list"]) == 3
    err = one_line_error(capsys)
    assert err.startswith("moebench: internal error (a bug in moebench): TypeError: second line of the message")
    path = Path(re.search(r"traceback in (\S+?);", err).group(1))
    assert path.parent == tmp_path and "planted bug" in path.read_text() and "Traceback" in path.read_text()


def test_moebench_debug_prints_the_traceback_of_a_crash(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_list", _crash)
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert main(["list"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "_crash" in err


def test_the_exit_codes_are_documented_in_help(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for code in (
        "0 ok",
        "1 a check or SLO failed",
        "2 a usage or input error",
        "3 an unexpected crash",
        "130 interrupted",
    ):
        assert code in text


# -------------------------------------------------------------------------------------------
# Writing results


def test_inf_and_nan_values_are_written_as_null_and_read_back(tmp_path):
    doc = {"metrics": {"a": {"median": math.inf, "max": -math.inf}, "b": [math.nan, 1.0]}, "error": math.nan}
    path = tmp_path / "r.json"
    results.write_atomic(path, doc)

    def refuse(name):
        raise AssertionError(f"{name} written into strict JSON")

    back = json.loads(path.read_text(), parse_constant=refuse)
    assert back == {"metrics": {"a": {"median": None, "max": None}, "b": [None, 1.0]}, "error": None}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        results.write_atomic(tmp_path / "r.json", {"x": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left


def test_routing_traces_follow_the_umask_too(tmp_path):
    from moebench.workload import trace

    old = os.umask(0o022)
    try:
        trace.save(tmp_path / "t.npz", [[[0], [1]]], 2)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "t.npz").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


def test_a_reader_that_leaves_the_pipe_is_not_a_crash(tmp_path):
    doc = tmp_path / "r.json"
    results.write_atomic(doc, json.loads((results.REPO / "results/baselines/cpu-2core/regress-local.json").read_text()))
    env = {**os.environ, "PYTHONPATH": str(results.REPO)}
    command = f"{sys.executable} -m moebench report {doc} {doc} {doc} | head -c 1"
    done = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, env=env, timeout=120
    )
    assert (done.returncode, done.stderr) == (0, "")  # moebench's own exit code: not 3, no crash message


def test_an_unwritable_record_routing_folder_fails_before_any_run(tmp_path, capsys):
    from moebench.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["run", str(scenario(tmp_path)), "--out", str(tmp_path / "out"), "--record-routing", str(blocker / "r")]
    assert main(args) == 2
    assert "--record-routing" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran, and the --out folder it made is gone


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_result_that_cannot_be_written_is_one_line_and_the_other_scenarios_still_run(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "a-first.json").mkdir(parents=True)  # renaming a file over a folder fails
    first, second = scenario(tmp_path, name="a-first"), scenario(tmp_path, name="b-second")
    assert main(["run", str(first), str(second), "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"moebench: error: {out / 'a-first.json'}: cannot write the result file: Is a directory" in captured.err
    assert "Traceback" not in captured.err
    assert "a-first" in captured.out  # its table is still shown
    assert json.loads((out / "b-second.json").read_text())["runs"][0]["status"] == "ok"


def test_a_deeply_nested_json_file_given_to_compare_is_one_line(tmp_path):
    from moebench.report.results import read_any

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=f"{deep}: not a readable result file: nested too deeply"):
        read_any(deep)


# -------------------------------------------------------------------------------------------
# Result files whose optional records have another type than moebench writes


def _fault_result(tmp_path, where: tuple, value) -> Path:
    """A fault run's result file with the field at ``where`` (keys below the run) set to ``value``."""
    from result_docs import result_doc, run_record

    run = run_record({}, params={"type": "straggler"}, checks=[{"name": "fault_detected", "pass": True}])
    run["details"] = {
        "fault": {
            "injected": {"type": "straggler", "rank": 1, "layer": 0, "expert": 0, "at_step": 2},
            "detected": True,
            "culprit_rank": 1,
            "recovered": "not needed",
            "steps_lost": 0,
            "tokens_rerouted": None,
            "rel_error_vs_healthy": 0.5,
        }
    }
    doc = result_doc([run], kind="fault")
    record = run
    for key in where[:-1]:
        record = record[key]
    record[where[-1]] = value
    path = tmp_path / "fault.json"
    path.write_text(json.dumps(doc))
    return path


@pytest.mark.parametrize(
    ("where", "value", "named"),
    [
        (("details",), 1, "runs[0].details = 1 is invalid: accepted a table or null"),
        (("details", "fault"), [1], "runs[0].details.fault = [1] is invalid: accepted a table"),
        (("details", "fault", "injected"), 1, "runs[0].details.fault.injected = 1 is invalid: accepted a table"),
        (("details", "fault", "injected", "type"), [], "fault.injected.type = [] is invalid: accepted a string"),
        (("details", "fault", "injected", "rank"), "1", 'fault.injected.rank = "1" is invalid: accepted an integer'),
        (("details", "fault", "steps_lost"), 1.5, "fault.steps_lost = 1.5 is invalid: accepted an integer"),
        (("details", "fault", "tokens_rerouted"), [], "fault.tokens_rerouted = [] is invalid: accepted an integer"),
        (("details", "fault", "rel_error_vs_healthy"), {}, "rel_error_vs_healthy = {} is invalid: accepted a number"),
        (("details", "fault", "detected"), "yes", 'fault.detected = "yes" is invalid: accepted true, false or null'),
        (("details", "fault", "culprit_rank"), True, "fault.culprit_rank = true is invalid: accepted an integer"),
    ],
)
def test_report_on_a_fault_record_of_another_type_is_one_line_naming_the_file_and_field(
    tmp_path, capsys, where, value, named
):
    path = _fault_result(tmp_path, where, value)
    assert main(["report", str(path)]) == 2
    err = one_line_error(capsys)
    assert f"{path}: malformed moebench.result/1 file: " in err and named in err


def test_report_shows_the_fault_table_of_a_sound_fault_record(tmp_path, capsys):
    path = _fault_result(tmp_path, ("details", "fault", "culprit_layer"), None)
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Fault table: 1 fault run" in out and "straggler at rank 1, step 2" in out and "0.5" in out


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("name", None, "scenario.scenario needs a name and a kind (strings)"),
        ("git_sha", [1], "environment.git_sha must be a string"),
        ("gpus", [1], "environment.gpus must be a list of strings"),
    ],
)
def test_a_result_whose_name_or_environment_has_another_type_is_refused_naming_it(tmp_path, key, value, named):
    from result_docs import result_doc, run_record

    doc = result_doc([run_record({})])
    (doc["scenario"]["scenario"] if key == "name" else doc["environment"])[key] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=re.escape(f"{path}: malformed moebench.result/1 file: {named}")):
        results.read(path)
