"""The serve plot's data: medians against the request rate, inf last, one series per other params."""

from __future__ import annotations

import math

from moebench.report.plots import plots_for, run_label
from moebench.report.serve_plots import rate_series


def _run(rate, batching, goodput=None, ttft=0.1):
    metrics = {"ttft_s": {"median": ttft, "samples": [ttft]}, "request_throughput": {"median": 2.0, "samples": [2.0]}}
    if goodput is not None:
        metrics["goodput"] = {"median": goodput, "samples": [goodput]}
    return {"params": {"request_rate": rate, "batching": batching}, "metrics": metrics, "status": "ok", "checks": []}


def test_rates_sort_numerically_with_inf_last_and_each_series_has_a_value_per_rate():
    runs = [_run("inf", "static", 1.0, 0.9), _run(16.0, "static", 2.0, 0.5), _run(4.0, "static", 3.0, 0.2),
            _run(4.0, "continuous", 3.5), _run("inf", "continuous", 1.5)]  # fmt: skip
    rates, panels = rate_series(runs, run_label)
    assert rates == [4.0, 16.0, math.inf]
    assert panels["goodput"] == {"batching=static": [3.0, 2.0, 1.0], "batching=continuous": [3.5, None, 1.5]}
    assert panels["ttft_s"]["batching=static"] == [0.2, 0.5, 0.9]
    assert "tpot_s" not in panels  # no run has it: no empty panel


def test_no_rate_sweep_no_plot():
    assert rate_series([_run(4.0, "static", 1.0)], run_label) == ([], {})


def test_a_serve_file_gets_the_rate_plot_and_the_ttft_cdf():
    doc = {
        "scenario": {"scenario": {"name": "s", "kind": "serve"}},
        "runs": [_run(4.0, "static", 1.0), _run(8.0, "static", 0.5)],
    }
    assert [p.name for p in plots_for(doc)] == ["s.serve-rate", "s.ttft-cdf"]
