"""The deployment plan's alerts: when a per-step series fires one (Prometheus ``for:`` semantics, on
hand-made series), the series a run's ranks record, the [alerts] section of a scenario, and the
alerts.toml scenario end to end (one load fires expert_overload, the other fires nothing)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from moebench.launch.spawn import RankContext
from moebench.measure import alerts as A
from moebench.measure import series as S
from moebench.measure.common import setup, step_fn, stream_inputs
from moebench.scenario import ScenarioError, load
from tests.test_results import spec

REPO = Path(__file__).resolve().parents[1]
KEYS = {"name", "first_s", "duration_s", "peak", "threshold"}


# -------------------------------------------------------------------------------------------
# Spans and firing (pure)


def test_a_span_fires_when_held_exactly_for_s_between_its_first_and_last_samples():
    times, values = [0.0, 1.0, 2.0, 3.0, 4.0], [0.5, 0.95, 0.97, 0.96, 0.5]
    (alert,) = A.fired(times, values, 0.9, ">", 2.0, "expert_overload")
    assert alert == {"name": "expert_overload", "first_s": 1.0, "duration_s": 2.0, "peak": 0.97, "threshold": 0.9}
    assert A.fired(times, values, 0.9, ">", 2.001, "expert_overload") == []  # held 2 s, not more


def test_a_span_reaching_the_end_of_the_series_counts_to_its_last_sample():
    (alert,) = A.fired([0.0, 1.0, 2.0, 3.0], [0.1, 1.0, 1.0, 1.0], 0.9, ">", 0.0, "x")
    assert (alert["first_s"], alert["duration_s"]) == (1.0, 2.0)
    assert A.spans([0.0, 1.0, 2.0, 3.0], [1.0, 0.1, 1.0, 1.0], 0.9, ">") == [(0, 0), (2, 3)]


def test_one_sample_past_the_threshold_has_held_zero_seconds_and_fires_only_without_a_sustain():
    times, values = [0.0, 0.5, 1.0], [0.1, 2.0, 0.1]
    (alert,) = A.fired(times, values, 1.0, ">", 0.0, "x")
    assert (alert["first_s"], alert["duration_s"], alert["peak"]) == (0.5, 0.0, 2.0)
    assert A.fired(times, values, 1.0, ">", 1e-9, "x") == []


def test_a_value_equal_to_the_threshold_does_not_hold():
    assert A.spans([0.0, 1.0], [0.9, 0.9], 0.9, ">") == []
    assert A.spans([0.0, 1.0], [80.0, 79.0], 80.0, "<") == [(1, 1)]


def test_a_missing_or_nan_sample_ends_a_span_so_two_short_spans_do_not_add_up():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    for gap in (None, math.nan):
        values = [1.0, 1.0, gap, 1.0, 1.0]
        assert [a["duration_s"] for a in A.fired(times, values, 0.5, ">", 1.0, "x")] == [1.0, 1.0]
        assert A.fired(times, values, 0.5, ">", 2.0, "x") == []  # 0..4 would be 4 s without the gap


def test_a_floor_alert_fires_below_its_threshold_and_its_peak_is_the_lowest_value():
    times, values = [0.0, 10.0, 20.0, 30.0, 40.0], [90e3, 70e3, 60e3, 75e3, 85e3]
    (alert,) = A.fired(times, values, 80e3, "<", 20.0, "low_throughput")
    assert (alert["first_s"], alert["duration_s"], alert["peak"]) == (10.0, 20.0, 60e3)


def test_evaluate_uses_each_alerts_keys_fills_defaults_and_skips_unrecorded_series():
    series = {
        "t_s": [0.0, 10.0, 20.0, 30.0, 40.0],
        "expert_load_ratio": [0.95] * 5,  # held 40 s > the default 30 s
        "memory_used": [0.5, 0.9, 0.5, 0.5, 0.5],  # one sample over 0.85: memory is not sustained
        "tokens_per_s_per_gpu": [50e3] * 3 + [90e3] * 2,  # held 20 s < throughput_for_s
    }
    fired = A.evaluate(series, {"throughput_for_s": 20.0})
    assert [a["name"] for a in fired] == ["expert_overload", "memory_used", "low_throughput"]
    assert all(set(a) == KEYS for a in fired)
    assert [a["threshold"] for a in fired] == [0.9, 0.85, 80e3]  # the plan's defaults
    assert [a["name"] for a in A.evaluate(series, {})] == ["expert_overload", "memory_used"]  # 20 s < 30 s
    assert A.evaluate(series, {"overload_for_s": 41.0, "memory_used": 0.95, "min_tokens_per_s_per_gpu": 0}) == []


def test_a_series_whose_times_go_back_or_whose_lengths_differ_is_refused():
    with pytest.raises(ValueError, match="must not decrease"):
        A.spans([0.0, 2.0, 1.0], [1, 1, 1], 0.5, ">")
    with pytest.raises(ValueError, match="one time per value"):
        A.spans([0.0, 1.0], [1.0], 0.5, ">")


# -------------------------------------------------------------------------------------------
# The recorded series (pure parts)


def test_load_ratio_is_the_busiest_expert_over_capacity_of_the_worst_layer():
    # layer 0: experts get 20, 2, 9, 9 of 40 copies; C = ceil(1.0 · 40 · 1 / 4) = 10 -> 2.0
    layer0 = [[10, 0, 5, 5], [10, 2, 4, 4]]
    layer1 = [[5, 5, 5, 5], [5, 5, 5, 5]]  # 10 each: 1.0
    assert S.load_ratio([layer1, layer0], 1.0, 1) == 2.0
    assert S.load_ratio([layer1], 1.25, 1) == 10 / 13  # C = ceil(12.5) = 13
    # top-2: 40 copies are 20 tokens; C = ceil(1.0 · 20 · 2 / 4) = 10, as the router's expert_capacity
    assert S.load_ratio([layer0], 1.0, 2) == 2.0


def test_the_models_own_capacity_factor_is_used_when_it_drops_else_the_alerts_one():
    assert S.capacity_factor(1.2, 1.25) == 1.2
    assert S.capacity_factor(0.0, 1.25) == 1.25


def test_exchange_splits_send_each_ranks_kept_copies_to_the_experts_owners():
    kept_WE = [[3, 1, 4, 1], [5, 9, 2, 6]]  # round robin: rank 0 owns experts 0 and 2
    assert S.exchange_splits(kept_WE, [0, 1, 0, 1], 0) == ([7, 7], [7, 2])  # (received, sent)
    assert S.exchange_splits(kept_WE, [0, 1, 0, 1], 1) == ([2, 15], [7, 15])


def _rank(step_s, memory, scope="host", a2a=None, load=(1.0, 1.0)) -> dict:
    series = {"t_s": [0.1, 0.2], "step_s": step_s, "load_ratio": list(load), "a2a_s": a2a, "memory": memory}
    return {"series": series | {"memory_scope": scope}}


def test_run_series_takes_the_slowest_rank_per_step_and_sums_host_memory_but_not_device_memory(spec_2):
    per_rank = [_rank([0.01, 0.04], [0.2, 0.3], a2a=[0.001, 0.003]), _rank([0.02, 0.01], [0.1, 0.2], a2a=[0.002, 0.0])]
    out = S.run_series(spec_2, per_rank)
    assert out["tokens_per_s_per_gpu"] == [100 / 0.02, 100 / 0.04]  # tokens_per_rank = 100
    assert out["a2a_time_s"] == [0.002, 0.003]
    assert out["memory_used"] == pytest.approx([0.3, 0.5])  # one host: the ranks' shares add up
    per_rank = [_rank([0.01, 0.01], [0.2, 0.6], "device"), _rank([0.01, 0.01], [0.4, 0.1], "device")]
    out = S.run_series(spec_2, per_rank)
    assert out["memory_used"] == [0.4, 0.6] and "a2a_time_s" not in out  # one device each: the fullest


def test_alert_results_count_what_fired_as_the_alerts_metric(spec_2):
    per_rank = [_rank([0.01, 0.01], [0.2, 0.2], load=(3.0, 3.0))] * 2
    metrics, details = S.alert_results(spec_2, per_rank)
    assert metrics["alerts"]["median"] == 1 and [a["name"] for a in details["alerts"]] == ["expert_overload"]
    assert details["alerts"][0]["duration_s"] == pytest.approx(0.1)
    assert S.alert_results(spec_2, [{"step": [0.1]}]) == ({}, {})  # a run without [alerts]


@pytest.fixture
def spec_2():
    """A throughput run on 2 ranks of 100 tokens each, with [alerts] (overload sustained 0.05 s)."""
    return dataclasses.replace(spec("throughput"), alerts=A.DEFAULTS | {"overload_for_s": 0.05})


# -------------------------------------------------------------------------------------------
# The [alerts] section


def _scenario(tmp_path, extra: str = "", kind: str = "throughput") -> Path:
    path = tmp_path / "s.toml"
    path.write_text(
        f'[scenario]\nname = "s"\nkind = "{kind}"\n[model]\nhidden = 8\nffn_hidden = 8\nnum_experts = 4\n'
        f"[workload]\ntokens_per_rank = 16\n{extra}"
    )
    return path


def test_a_scenario_without_alerts_records_no_series_and_an_empty_alerts_section_takes_the_plans_defaults(tmp_path):
    (run,) = load(_scenario(tmp_path)).runs
    assert run.alerts == {} and "alerts" not in run.resolved()
    (run,) = load(_scenario(tmp_path, "[alerts]\n")).runs
    assert run.alerts == A.DEFAULTS and run.resolved()["alerts"] == A.DEFAULTS
    (run,) = load(_scenario(tmp_path, "[alerts]\nexpert_overload = 1.5\n")).runs
    assert run.alerts == A.DEFAULTS | {"expert_overload": 1.5}


def test_a_max_alerts_gate_alone_turns_the_alerts_on_with_the_defaults(tmp_path):
    (run,) = load(_scenario(tmp_path, "[slo]\nmax_alerts = 0\n", kind="latency")).runs
    assert run.alerts == A.DEFAULTS and [(s.metric, s.op, s.limit) for s in run.slos] == [("alerts", "max", 0.0)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "[alerts]\nmemory_used = -1\n",
            r"s\.toml: \[alerts\] memory_used = -1 is invalid: accepted a finite number > 0",
        ),
        ("[alerts]\nwindow = 3\n", r"s\.toml: \[alerts\] window is not a known key: accepted expert_overload, "),
        ("[alerts]\noverload_for_s = [1, 2]\n", r"\[alerts\] overload_for_s = \[1, 2\] is invalid: .*lists sweep only"),
    ],
)
def test_a_bad_alerts_key_is_one_line_naming_the_file_key_and_value(tmp_path, extra, message):
    with pytest.raises(ScenarioError, match=message):
        load(_scenario(tmp_path, extra))


def test_alerts_on_a_kind_without_per_step_series_is_refused_naming_the_kinds_that_accept_them(tmp_path):
    with pytest.raises(ScenarioError, match=r'\[alerts\] = .* is invalid for kind = "dispatch": accepted only with '
                       r'kind "throughput" or "latency"'):  # fmt: skip
        load(_scenario(tmp_path, "[alerts]\n", kind="dispatch"))
    with pytest.raises(ScenarioError, match=r"\[slo\] max_alerts is not a known gate"):
        load(_scenario(tmp_path, "[slo]\nmax_alerts = 0\n", kind="dispatch"))


# -------------------------------------------------------------------------------------------
# scenarios/alerts.toml, end to end


@pytest.mark.multiproc
@pytest.mark.slow  # the whole scenario; the alert rules and series are unit-tested above
def test_the_alerts_scenario_fires_expert_overload_under_zipf_and_nothing_under_uniform_routing():
    from moebench.runner import run_one

    scenario = load(REPO / "scenarios" / "alerts.toml", {("scenario", "repeats"): 1, ("scenario", "warmup"): 0})
    runs = {spec.params["skew"]: run_one(spec, None) for spec in scenario.runs}
    assert {skew: run["status"] for skew, run in runs.items()} == {"uniform": "ok", "zipf": "ok"}, runs
    zipf, uniform = runs["zipf"], runs["uniform"]
    assert [a["name"] for a in zipf["alerts"]] == ["expert_overload"] and uniform["alerts"] == []
    (alert,) = zipf["alerts"]
    assert alert["threshold"] == 1.5 and alert["peak"] > 2.0 and alert["first_s"] == zipf["details"]["series"]["t_s"][0]
    assert len(zipf["details"]["series"]["t_s"]) == 8  # the [workload] steps stream, once
    assert max(uniform["details"]["series"]["expert_load_ratio"]) < 1.5
    assert zipf["metrics"]["alerts"]["median"] == 1 and uniform["metrics"]["alerts"]["median"] == 0
    assert [s["pass"] for s in zipf["slo"]] == [True]  # max_alerts = 1


def test_series_record_on_one_rank_times_each_stream_step_once():
    """The rank side on W = 1, without spawning: one entry per stream step, times increasing, the
    load ratio of the routing the step used, no all-to-all series at W = 1."""
    scenario = load(REPO / "scenarios" / "alerts.toml", {("parallel", "world_size"): 1})
    run = dataclasses.replace(scenario.runs[1], alerts=A.DEFAULTS | {"capacity_factor": 1.0})
    ctx = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")
    stack, group, x_TD = setup(ctx, run)
    stream = stream_inputs(ctx, run, x_TD)
    out = S.record(ctx, run, stack, stream, step_fn(ctx, run, stack, x_TD, stream), group)
    assert len(out["t_s"]) == 8 and out["t_s"] == sorted(out["t_s"]) and out["a2a_s"] is None
    with torch.no_grad():
        _, results = stack(stream[3])
    assert out["load_ratio"][3] == S.load_ratio([r.counts_WE for r in results], 1.0, 1)
    assert out["memory_scope"] == "host" and all(0 < m < 1 for m in out["memory"])
