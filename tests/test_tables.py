"""Result tables: checks apart from SLOs, the world size always shown, fitting the width, --columns, and list."""

from __future__ import annotations

import pytest

from moebench import kinds
from moebench.cli import main
from moebench.report.results import SCHEMA, TableStyle, check_columns, render, write_atomic


def _metric(value: float) -> dict:
    return {"unit": "s", "median": value, "p90": value, "p99": value, "min": value, "max": value, "n": 3}


def _run(world: int = 2, params: dict | None = None, checks=(True,), slo_pass=None, status="ok") -> dict:
    names = {column.partition(":")[0] for column, _, _, _ in kinds.get("throughput").columns}
    gate = {"gate": "min_tokens_per_s", "metric": "tokens_per_s", "stat": "median", "op": "min", "limit": 1e4}
    slo = [] if slo_pass is None else [gate | {"value": 1234.5678, "pass": slo_pass}]
    return {
        "params": {"world_size": world} if params is None else params,
        "world_size": world,
        "device": "cpu",
        "backend": "gloo",
        "status": status,
        "error": None if status == "ok" else "RuntimeError: x",
        "metrics": {name: _metric(1234.5678) for name in names} if status == "ok" else {},
        "checks": [{"name": f"check{i}", "pass": ok} for i, ok in enumerate(checks)],
        "slo": slo,
        "telemetry": {"peak_host_memory_bytes": 2**30},
    }


def _doc(runs: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "source": "scenarios/t.toml",
        "scenario": {"scenario": {"name": "t", "kind": "throughput", "description": "d"}},
        "columns": [list(column) for column in kinds.get("throughput").columns],
        "environment": {"git_sha": "abc"},
        "runs": runs,
    }


def _cells(text: str, row: int, header: str) -> str:
    """The text of one cell: the row's characters under the header's dashes."""
    lines = text.splitlines()
    dashes = lines[3]
    spans, start = [], 0
    for part in dashes.split("  "):
        spans.append((start, start + len(part)))
        start += len(part) + 2
    for a, b in spans:
        if lines[2][a:b].strip() == header:
            return lines[4 + row][a:b].strip()
    raise KeyError(header)


def test_a_missed_slo_with_every_check_passing_reads_checks_ok_slo_missed_verdict_fail():
    text = render(_doc([_run(slo_pass=False), _run(checks=(True, False), slo_pass=True), _run(slo_pass=True)]))
    assert [_cells(text, i, "checks") for i in range(3)] == ["ok", "FAIL: check1", "ok"]
    assert [_cells(text, i, "SLO") for i in range(3)] == ["missed: min_tokens_per_s", "met", "met"]
    assert [_cells(text, i, "verdict") for i in range(3)] == ["FAIL", "FAIL", "ok"]


def test_a_run_that_did_not_finish_has_no_check_verdicts():
    text = render(_doc([_run(status="error")]))
    assert (_cells(text, 0, "checks"), _cells(text, 0, "verdict")) == ("-", "error")


@pytest.mark.parametrize(
    ("params", "world"),
    [({"world_size": 4}, 4), ({}, 2), ({"skew": "zipf"}, 8)],  # swept, overridden by --world-size, fixed
)
def test_the_world_size_shows_whether_or_not_it_was_swept(params, world):
    text = render(_doc([_run(world, params)]))
    assert _cells(text, 0, "ranks") == str(world)
    assert "world_size" not in text.splitlines()[2]  # once, as ranks
    assert all(_cells(text, 0, k) == v for k, v in params.items() if k != "world_size")


def test_a_table_fits_the_width_by_leaving_out_the_last_columns_and_says_which():
    doc = _doc([_run(1), _run(2, checks=(False,))])
    full = render(doc)
    assert max(map(len, full.splitlines()[2:6])) > 150  # every metric: far wider than a terminal
    for width in (80, 100, 120):
        text = render(doc, TableStyle(width=width))
        table = [line for line in text.splitlines()[2:] if not line.startswith("  ")]
        assert max(map(len, table)) <= width
        assert all(len(line) <= width for line in text.splitlines()[2:])  # the notes wrap too
        headers = " ".join(table[:2])
        assert all(h in headers for h in ("ranks", "device", "tokens/s", "checks", "verdict"))
        note = " ".join(line.strip() for line in text.splitlines() if line.startswith("  "))
        assert f"left out to fit {width} characters: peak_mem, tokens_dropped" in note
    narrow = render(doc, TableStyle(width=100))
    assert "step p50" in narrow and "moe/dense" not in narrow and "moe_over_dense" in narrow  # named in the note
    assert render(doc, TableStyle(width=1000)) == full and render(doc, TableStyle("markdown", width=60)).count("|") > 40


def test_columns_choose_the_value_columns_and_their_order():
    text = render(_doc([_run()]), TableStyle(columns=("slo", "step_time_s:p99", "tokens_per_s", "load_cv")))
    header = ["ranks", "device", "SLO", "step_time_s", "p99", "(s)", "tokens/s", "verdict"]  # name, stat, unit
    assert text.splitlines()[2].split() == header
    assert "left out" not in render(_doc([_run()]), TableStyle(columns=("tokens_per_s",), width=20))


def test_a_file_that_records_no_columns_shows_one_column_per_measured_metric():
    """Files written before result files recorded their kind's columns still render, from the file alone."""
    doc = _doc([_run()])
    del doc["columns"]
    header = render(doc).splitlines()[2].split()
    names = [c.partition(":")[0] for c, _, _, _ in kinds.get("throughput").columns]
    assert [h for h in header if h in names] == list(doc["runs"][0]["metrics"])  # each metric, in the run's order
    assert "tokens/s" not in header  # the kind's headers come only from the file


def test_unknown_columns_are_refused_naming_what_is_accepted():
    metrics = ["step_time_s", "tokens_per_s"]
    assert check_columns(["step_time_s:p99", "peak_mem", "peak_mem"], metrics) == ("step_time_s:p99", "peak_mem")
    for bad in ("nope", "peak_mem:p90", "step_time_s:p42", "x" * 500, "load_cv"):
        with pytest.raises(ValueError, match="is not a column: accepted energy, peak_mem, checks, slo or a metric"):
            check_columns([bad], metrics)
    with pytest.raises(ValueError) as err:
        check_columns(["x" * 500], metrics)
    assert len(str(err.value)) < 300  # a long value is cut


def test_report_columns_and_terminal_width_from_the_command_line(tmp_path, capsys, monkeypatch):
    write_atomic(tmp_path / "t.json", _doc([_run()]))
    assert main(["report", str(tmp_path), "--columns", "tokens_per_s,checks"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split() == ["ranks", "device", "tokens/s", "checks", "verdict"]
    monkeypatch.setenv("COLUMNS", "90")
    assert main(["report", str(tmp_path)]) == 0
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 90


@pytest.mark.parametrize("command", ["run", "report"])
def test_unknown_columns_are_a_usage_error_before_anything_runs(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(tmp_path), "--columns", "tokens_per_s,bogus"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"moebench {command}: error: argument --columns: 'bogus' is not a column")


def test_list_shows_every_shipped_set_and_the_plans_under_a_header_each(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("scenarios")]
    assert headers == [
        "scenarios/  (moebench run scenarios)",
        "scenarios/calibrate/  (moebench run scenarios/calibrate)",
        "scenarios/multigpu/  (moebench run scenarios/multigpu)",
        "scenarios/plans/  (moebench plan scenarios/plans/FILE.toml)",
        "scenarios/plans/models/  (moebench plan scenarios/plans/models/FILE.toml)",
        "scenarios/real-models/  (moebench run scenarios/real-models)",
        "scenarios/regress/  (moebench run scenarios/regress)",
        "scenarios/sweeps/  (moebench run scenarios/sweeps)",
    ]
    names = {line.split()[0] for line in out.splitlines() if line[:1].strip()}
    shipped = {"seed-throughput", "calibrate-gemm", "gpu-seed-throughput", "regress-dispatch", "seed-002"}
    shipped.add("mixtral-8x7b")  # a published model's plan, under scenarios/plans/models/
    assert shipped <= names
    (plan,) = [line.split() for line in out.splitlines() if line.startswith("seed-002")]
    assert plan[1:4] == ["plan", "-", "seed-002.toml"]


def test_list_of_a_folder_without_scenarios_is_one_line_exit_2(tmp_path, capsys):
    assert main(["list", str(tmp_path)]) == 2
    assert "no scenario or plan files (*.toml) under this folder" in capsys.readouterr().err
