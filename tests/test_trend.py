"""``moebench compare A B C ...``: the trend table, its verdict and exit code, and its plots, on hand-built results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from result_docs import result_doc as _doc
from result_docs import run_record as _run

from moebench.cli import main
from moebench.metrics import metric
from moebench.regress import compare as C
from moebench.regress import trend as T
from moebench.report.results import write_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _samples(median: float) -> list[float]:
    """21 samples spread ±10 % in 1 % steps: their median is exactly ``median``."""
    return [median * (1 + k / 100) for k in range(-10, 11)]


def _metrics(step_s: float, dropped: int = 100) -> dict:
    return {
        "step_time_s": metric(_samples(step_s), "s", "lower"),
        "tokens_dropped": metric([dropped], "copies", "lower", exact=True),
    }


def _write_sets(tmp_path: Path, steps: list[float], dropped=None, checks=None) -> list[str]:
    """One folder per set (``s0``, ``s1``, ...) holding one result file of the ``demo`` scenario."""
    dropped = dropped or [100] * len(steps)
    checks = checks or [None] * len(steps)
    paths = []
    for i, (step, drop, check) in enumerate(zip(steps, dropped, checks, strict=True)):
        path = tmp_path / f"s{i}"
        write_atomic(path / "demo.json", _doc([_run(_metrics(step, drop), checks=check)]))
        paths.append(str(path))
    return paths


def _trend(paths: list[str]) -> tuple[list[T.TrendRow], list[C.Row]]:
    return T.trend(T.load_sets(paths), C.Settings())


def _row(rows: list[T.TrendRow], name: str) -> T.TrendRow:
    return next(r for r in rows if r.metric == name)


# -------------------------------------------------------------------------------------------
# The table


def test_trend_rows_hold_each_sets_median_in_order_and_the_newest_verdict(tmp_path):
    paths = _write_sets(tmp_path, [0.010, 0.011, 0.012, 0.012], dropped=[100, 100, 100, 110])
    rows, last = _trend(paths)
    step, dropped = _row(rows, "step_time_s"), _row(rows, "tokens_dropped")
    assert step.medians == pytest.approx((0.010, 0.011, 0.012, 0.012))
    assert step.verdict == "same" and step.ratio == pytest.approx(1.0)
    assert dropped.medians == (100, 100, 100, 110)
    assert dropped.verdict == "worse" and dropped.ratio == pytest.approx(1.1)  # 10 % > the 5 % tolerance
    assert (step.run, step.unit, dropped.unit) == ("world_size=2", "s", "copies")
    # the cells the table prints: run, metric, unit, one median per set, ratio, verdict, note
    assert T._cells(step) == [
        "world_size=2",
        "step_time_s",
        "s",
        "0.01",
        "0.011",
        "0.012",
        "0.012",
        "1.000",
        "same",
        "",
    ]
    assert T._cells(dropped)[3:9] == ["100", "100", "100", "110", "1.100", "WORSE"]
    text = T.render(T.load_sets(paths), rows, last)
    assert "s0" in text and "s3" in text and "s3 vs s2: 1 regression" in text


def test_the_verdicts_are_the_two_set_compare_of_the_newest_two(tmp_path):
    paths = _write_sets(tmp_path, [0.010, 0.013, 0.010], dropped=[100, 120, 100])
    rows, last = _trend(paths)
    two = C.compare(C.load([paths[1]]), C.load([paths[2]]), C.Settings())
    assert {r.metric: r.verdict for r in last} == {r.metric: r.verdict for r in two}
    assert _row(rows, "step_time_s").verdict == "faster" and _row(rows, "tokens_dropped").verdict == "better"


def test_a_set_without_the_run_shows_a_dash_and_the_newest_steps_run_rows_are_listed(tmp_path):
    paths = _write_sets(tmp_path, [0.010, 0.010, 0.010])
    write_atomic(tmp_path / "s1" / "demo.json", _doc([_run(_metrics(0.010), params={"world_size": 4}, world=4)]))
    rows, last = T.trend(T.load_sets(paths), C.Settings())
    w2 = next(r for r in rows if r.metric == "step_time_s" and r.run == "world_size=2")
    w4 = next(r for r in rows if r.metric == "step_time_s" and r.run == "world_size=4")
    assert w2.medians == pytest.approx((0.010, None, 0.010)) and w2.medians[1] is None
    assert w4.medians == (None, pytest.approx(0.010), None)
    assert T._cells(w2)[3:6] == ["0.01", "-", "0.01"]
    extra = T.other_rows(rows, last)  # s1 -> s2: the w=4 run vanished, w=2 appeared; nothing to judge per metric
    assert {(r.run, r.metric, r.verdict) for r in extra} == {
        ("world_size=4", "run", "missing"),
        ("world_size=2", "run", "new"),
    }
    assert w2.verdict == "-" and T.regressed(last)


def test_a_check_that_fails_in_the_newest_set_is_a_row_and_a_regression(tmp_path):
    failing = [{"name": "finite_output", "pass": False, "detail": ""}]
    paths = _write_sets(tmp_path, [0.010, 0.010, 0.010], checks=[None, None, failing])
    rows, last = _trend(paths)
    (extra,) = T.other_rows(rows, last)
    assert (extra.metric, extra.verdict) == ("check finite_output", "fails now")
    cells = T._other_cells(extra, 3)
    assert cells[3:6] == ["", "pass", "fail"] and cells[-2] == "FAILS NOW"


def test_labels_are_folder_names_and_the_paths_when_names_repeat(tmp_path):
    assert T.set_labels([str(tmp_path / "a"), str(tmp_path / "b")]) == ["a", "b"]
    repeated = [str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run")]
    assert T.set_labels(repeated) == repeated


# -------------------------------------------------------------------------------------------
# The command and its exit code


def test_a_regression_in_the_newest_set_exits_1_and_one_in_a_middle_set_does_not(tmp_path, capsys):
    middle = _write_sets(tmp_path / "middle", [0.010, 0.013, 0.010])  # s1 is 30 % slower than s0; s2 recovers
    assert main(["compare", *middle]) == 0
    out = capsys.readouterr().out
    assert "faster" in out and "SLOWER" not in out
    newest = _write_sets(tmp_path / "newest", [0.010, 0.010, 0.013])
    assert main(["compare", *newest]) == 1
    out = capsys.readouterr().out
    assert "SLOWER" in out and "s2 vs s1: 1 regression" in out
    # the two-set form is unchanged: the same newest pair exits 1, the same middle pair 1, its recovery 0
    assert main(["compare", newest[1], newest[2]]) == 1
    assert main(["compare", middle[1], middle[2]]) == 0


def test_trend_json_and_markdown(tmp_path, capsys):
    paths = _write_sets(tmp_path, [0.010, 0.011, 0.014])
    md = tmp_path / "trend.md"
    assert main(["compare", *paths, "--json", "-", "--markdown", str(md)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["schema"] == "moebench.regress.trend/1" and doc["regressions"] == 1
    assert [s["label"] for s in doc["sets"]] == ["s0", "s1", "s2"]
    step = next(r for r in doc["rows"] if r["metric"] == "step_time_s")
    assert step["medians"] == pytest.approx([0.010, 0.011, 0.014]) and step["verdict"] == "slower"
    assert doc["last"]["schema"] == "moebench.regress.compare/1" and doc["last"]["new"] == paths[2]
    text = md.read_text()
    assert text.startswith("## moebench compare (trend): REGRESSION") and "| SLOWER" in text


def test_min_effect_naming_no_metric_of_any_set_is_an_error(tmp_path, capsys):
    paths = _write_sets(tmp_path, [0.010, 0.010, 0.010])
    assert main(["compare", *paths, "--min-effect", "step_tme_s=0.2"]) == 2
    assert "step_tme_s=0.2: no metric of that name in any set" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------
# Plots


def test_plot_series_are_the_medians_in_order_with_p10_p90_of_the_samples(tmp_path):
    paths = _write_sets(tmp_path, [0.010, 0.012, 0.011, 0.013])
    rows, _ = _trend(paths)
    series = {s.file: s for s in T.plot_series(rows, ["s0", "s1", "s2", "s3"])}
    step = series["demo__world_size=2__step_time_s.png"]
    assert step.labels == ("s0", "s1", "s2", "s3")
    assert step.medians == pytest.approx((0.010, 0.012, 0.011, 0.013))
    # nearest rank over 21 sorted samples: p10 is the 3rd (index floor(2.1) = 2), p90 the 19th (index 18)
    assert step.lows == pytest.approx(tuple(m * 0.92 for m in (0.010, 0.012, 0.011, 0.013)))
    assert step.highs == pytest.approx(tuple(m * 1.08 for m in (0.010, 0.012, 0.011, 0.013)))
    assert step.spread_kinds == ("p10-p90",)
    assert series["demo__world_size=2__tokens_dropped.png"].medians == (100, 100, 100, 100)


def test_spread_falls_back_to_min_max_without_samples():
    assert T.spread({"median": 2.0, "samples": [], "min": 1.5, "max": 3.0}) == T.Spread(1.5, 3.0, "min-max")
    assert T.spread({"median": 2.0}) is None


def test_plots_are_png_files_one_per_metric(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = _write_sets(tmp_path, [0.010, 0.012, 0.011])
    assert main(["compare", *paths, "--plots", str(tmp_path / "plots")]) == 0
    files = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert files == ["demo__world_size=2__step_time_s.png", "demo__world_size=2__tokens_dropped.png"]
    for name in files:
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_SIGNATURE
    assert "wrote " in capsys.readouterr().err


def test_plots_without_matplotlib_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    paths = _write_sets(tmp_path, [0.010, 0.010, 0.010])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["compare", *paths, "--plots", str(tmp_path / "plots")]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == ["moebench: error: " + T.PLOTS_HINT]
    assert "pip install 'moebench[plots]'" in captured.err and captured.out == ""
    assert not (tmp_path / "plots").exists()
