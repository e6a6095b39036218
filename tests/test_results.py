"""Result files and tables, and the metrics each kind derives from its ranks' raw data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from moebench import kinds
from moebench.kinds import equivalence
from moebench.measure import common
from moebench.report.results import SCHEMA, read, render, verdict, write_atomic
from moebench.runner import _judge_slos
from moebench.scenario import RunSpec, Slo


def spec(kind: str, world: int = 2, **workload) -> RunSpec:
    return RunSpec(
        path="t.toml",
        scenario={"name": "t", "kind": kind, "description": "", "warmup": 0, "repeats": 3},
        model={
            "hidden": 8,
            "ffn_hidden": 8,
            "num_experts": 4,
            "top_k": 1,
            "activation": "gelu",
            "dtype": "float32",
            "layers": 1,
            "expert_backend": "auto",
        },
        routing={"capacity_factor": 0.0, "aux_loss_coef": 0.0, "z_loss_coef": 0.0, "normalize_topk": False},
        parallel={"world_size": world, "placement": "round_robin", "device": "cpu", "backend": "gloo"},
        workload={"tokens_per_rank": 100, "skew": "uniform", "skew_param": None, "seed": 0, "train": False} | workload,
        slos=(Slo("tokens_per_s", "min", 1500.0, "scenario"), Slo("a2a_busbw_gbps", "min", 1.0, "scenario")),
    )


# One layer, 2 ranks, 4 experts placed round robin; rank w routed counts_WE[w], kept kept_WE[w].
RAW = {
    "step": [0.1, 0.2, 0.4],
    "dispatch": [0.01, 0.02, 0.03],
    "combine": [0.02, 0.02, 0.02],
    "a2a": [0.001, 0.002, 0.004],
    "paired_step": [0.1, 0.3, 0.2],
    "dense": [0.05, 0.1, 0.2],
    "counts_WE": [[[60, 20, 10, 10], [30, 30, 20, 20]]],
    "kept_WE": [[[50, 20, 10, 10], [30, 30, 20, 20]]],
    "expert_to_rank": [0, 1, 0, 1],
    "finite": True,
}


def test_throughput_metrics_from_raw_samples_match_hand_computation():
    metrics, checks, _ = kinds.evaluate(spec("throughput"), [RAW, RAW | {"finite": True}])
    assert metrics["tokens_per_s"]["median"] == 200 / 0.2  # 2 ranks x 100 tokens per step
    assert metrics["tokens_per_s_per_gpu"]["samples"] == [1000.0, 500.0, 250.0]
    assert metrics["step_time_s"]["p90"] == 0.4 and metrics["dispatch_time_s"]["median"] == 0.02
    assert metrics["tokens_dropped"]["median"] == 10  # expert 0 on rank 0: 60 routed, 50 kept
    # Row = 8 fp32 = 32 B. Sent: rank 0 90 rows, rank 1 100 rows. Received: experts 0, 2 -> rank 0:
    # 50+10+30+20 = 110 rows; experts 1, 3 -> rank 1: 20+10+30+20 = 80 rows. S = 110 rows = 3520 B.
    assert metrics["bytes_per_token"]["median"] == 2 * 190 * 32 / 200
    assert metrics["a2a_algbw_gbps"]["median"] == pytest.approx(3520 / 0.002 / 1e9)
    assert metrics["a2a_busbw_gbps"]["median"] == pytest.approx(3520 / 0.002 / 1e9 / 2)
    assert metrics["a2a_time_s"]["unit"] == "s" and metrics["a2a_busbw_gbps"]["better"] == "higher"
    # within-run ratios are taken round by round, then summarised
    assert metrics["dispatch_over_a2a"]["samples"] == pytest.approx([10.0, 10.0, 7.5])
    assert metrics["combine_over_a2a"]["samples"] == pytest.approx([20.0, 10.0, 5.0])
    assert metrics["moe_over_dense"]["samples"] == pytest.approx([2.0, 3.0, 1.0])
    assert metrics["moe_over_dense"]["median"] == pytest.approx(2.0)
    # timings are sampled, counts and bytes are exact (compare judges them differently)
    assert not metrics["step_time_s"]["exact"] and not metrics["dispatch_over_a2a"]["exact"]
    assert metrics["tokens_dropped"]["exact"] and metrics["bytes_per_token"]["exact"]
    assert checks == [{"name": "finite_output", "pass": True, "detail": "every rank's output is finite"}]
    _, checks, _ = kinds.evaluate(spec("throughput"), [RAW, RAW | {"finite": False}])
    assert checks[0]["pass"] is False


def test_dispatch_kind_reports_the_collectives_and_the_round_trip_check():
    raw = {k: v for k, v in RAW.items() if k not in ("step", "paired_step", "dense", "finite")}
    metrics, checks, _ = kinds.evaluate(
        spec("dispatch"), [raw | {"round_trip_error": 1e-7}, raw | {"round_trip_error": 0}]
    )
    assert "step_time_s" not in metrics and "moe_over_dense" not in metrics
    assert metrics["dispatch_over_a2a"]["median"] == pytest.approx(10.0)
    assert metrics["bytes_per_token"]["median"] == 2 * 190 * 32 / 200
    # copies routed per expert 90, 50, 30, 30 (mean 50); per rank (experts 0, 2 | 1, 3) 120, 80 (mean 100)
    assert metrics["imbalance_max_mean"]["median"] == pytest.approx(1.8)
    assert metrics["rank_imbalance_max_mean"]["median"] == pytest.approx(1.2)
    assert checks[0]["name"] == "combine_inverts_dispatch" and checks[0]["pass"] is True
    _, checks, _ = kinds.evaluate(spec("dispatch"), [raw | {"round_trip_error": 1e-3}, raw | {"round_trip_error": 0}])
    assert checks[0]["pass"] is False and "worst rank 1.00e-03" in checks[0]["detail"]


def test_single_rank_throughput_has_no_all_to_all_metrics():
    raw = RAW | {"a2a": None, "counts_WE": [[[60, 20, 10, 10]]], "kept_WE": [[[50, 20, 10, 10]]]}
    metrics, _, _ = kinds.evaluate(spec("throughput", world=1), [raw])
    assert "a2a_busbw_gbps" not in metrics and "a2a_time_s" not in metrics
    assert metrics["tokens_per_s"]["median"] == 100 / 0.2
    assert "dispatch_over_floor" not in metrics  # timed without floors (results from before them)
    floors = {"dispatch_floor": [0.005, 0.01, 0.02], "combine_floor": [0.01, 0.04, 0.01]}
    metrics, _, _ = kinds.evaluate(spec("throughput", world=1), [raw | floors])
    assert metrics["dispatch_over_floor"]["samples"] == pytest.approx([2.0, 2.0, 1.5])  # round by round
    assert metrics["combine_over_floor"]["samples"] == pytest.approx([2.0, 0.5, 2.0])


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])  # dropless, and dropping copies
def test_the_floors_compute_what_dispatch_and_combine_compute(capacity_factor):
    """The W = 1 references do the same work as the dispatcher: the same rows out, bit for bit."""
    s = spec("dispatch", world=1)
    s.model.update(layers=2, top_k=2, num_experts=4)
    s.routing["capacity_factor"] = capacity_factor
    ctx = type("Ctx", (), {"group": None, "device": torch.device("cpu")})()
    x_TD = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    jobs = common.dispatch_jobs(common.build_stack(ctx, s), x_TD, torch.float32)
    dispatched, combined = [], []
    common.floor_fns(jobs, sink=dispatched)["dispatch_floor"]()
    common.floor_fns(jobs, sink=combined)["combine_floor"]()
    for (layer, plan, _, x_RD, meta), floor_x, floor_y in zip(jobs, dispatched, combined, strict=True):
        assert torch.equal(floor_x, x_RD)
        assert torch.equal(floor_y, layer.dispatcher.combine(x_RD, plan.routing.weights_TK, meta))
    dropped = sum(int(plan.keep_TK.numel() - plan.keep_TK.sum()) for _, plan, *_ in jobs)
    assert (dropped > 0) == (capacity_factor > 0)  # the dropping case does drop


def test_slo_verdicts_use_the_median_and_skip_metrics_a_run_lacks():
    s = spec("throughput", world=1)
    metrics, _, _ = kinds.evaluate(
        s, [RAW | {"a2a": None, "counts_WE": [[[60, 20, 10, 10]]], "kept_WE": [[[50, 20, 10, 10]]]}]
    )
    tokens, busbw = _judge_slos(s, metrics)
    assert (tokens["value"], tokens["pass"]) == (500.0, False)  # 100 tokens / 0.2 s < 1500
    assert busbw["pass"] is None and busbw["value"] is None
    metrics["tokens_per_s"]["median"] = math.nan
    assert _judge_slos(s, metrics)[0]["pass"] is False  # NaN never passes


def test_load_balance_metrics_per_batch_and_per_layer():
    batch_a = {"counts_WE": [[[4, 0, 0, 0], [4, 0, 0, 0]]], "kept_WE": [[[2, 0, 0, 0], [0, 0, 0, 0]]]}
    batch_b = {"counts_WE": [[[1, 1, 1, 1], [1, 1, 1, 1]]], "kept_WE": [[[1, 1, 1, 1], [1, 1, 1, 1]]]}
    raw = {"batches": [b | {"expert_to_rank": [0, 1, 0, 1]} for b in (batch_a, batch_b)]}
    metrics, checks, details = kinds.evaluate(spec("load_balance", tokens_per_rank=4), [raw])
    assert metrics["imbalance_max_mean"]["samples"] == [4.0, 1.0]  # all 8 on expert 0; then even
    assert metrics["rank_imbalance_max_mean"]["samples"] == [2.0, 1.0]
    assert metrics["load_cv"]["samples"] == [pytest.approx(math.sqrt(3)), 0.0]
    assert metrics["tokens_dropped"]["samples"] == [6.0, 0.0]
    assert metrics["tokens_dropped_fraction"]["samples"] == [6 / 8, 0.0]  # of 2 ranks x 4 tokens x top-1
    (layer,) = details["layers"]
    assert layer["expert_tokens"] == [10, 2, 2, 2] and layer["rank_tokens"] == [12, 4]
    assert layer["imbalance_max_mean"] == 2.5 and checks == []


def doc_with(runs: list[dict]) -> dict:
    return {
        "schema": SCHEMA,
        "source": "scenarios/x.toml",
        "scenario": {"scenario": {"name": "x", "kind": "latency", "description": "d"}},
        "columns": [list(column) for column in kinds.get("latency").columns],
        "environment": {"git_sha": "abcdef1234567", "git_dirty": False},
        "runs": runs,
    }


def run_with(step_median: float, status: str = "ok", check: bool = True, error: str | None = None) -> dict:
    metric = {"median": step_median, "p90": step_median, "p99": step_median, "n": 5}
    return {
        "params": {"world_size": 2},
        "device": "cpu",
        "backend": "gloo",
        "status": status,
        "error": error,
        "metrics": {"step_time_s": metric} if status == "ok" else {},
        "checks": [{"name": "c", "pass": check}],
        "slo": [],
        "telemetry": {"available": False, "peak_host_memory_bytes": 3 * 2**20},
    }


def test_table_has_units_a_device_column_and_the_verdicts():
    doc = doc_with([run_with(0.0125), run_with(0.02, check=False), run_with(0, "error", error="RuntimeError: x")])
    text = render(doc)
    lines = text.splitlines()
    assert lines[0] == "x (latency) — d" and "git abcdef1234" in lines[1]
    header = lines[2].split()
    assert header[:3] == ["ranks", "device", "p50"] and "(ms)" in lines[2]
    assert header[-2:] == ["checks", "verdict"] and "SLO" not in header  # no gates: no SLO column
    rows = [line.split() for line in lines[4:7]]
    assert rows[0][:3] == ["2", "cpu/gloo", "12.500"] and rows[0][-3:] == ["3", "ok", "ok"]
    assert rows[1][-3:] == ["FAIL:", "c", "FAIL"] and rows[2][-2:] == ["-", "error"]
    assert lines[-1].strip() == "{'world_size': 2}: error: RuntimeError: x"
    assert [verdict(r) for r in doc["runs"]] == ["ok", "FAIL", "error"]
    assert "J/token" not in text  # no energy without NVML: no column
    doc["runs"][0]["telemetry"] = {"energy_j_per_token": 0.0025, "peak_memory_bytes": 2**30}
    energy_row = render(doc).splitlines()[4].split()
    assert "J/token" in render(doc).splitlines()[2] and energy_row[-4:-2] == ["0.0025", "1024"]
    markdown = render(doc, "markdown")
    assert markdown.startswith("### x (latency)") and "| ranks" in markdown


def test_atomic_write_replaces_whole_files_and_keeps_the_old_one_on_failure(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_atomic(path, doc_with([run_with(0.5)]) | {"nan": math.nan})
    saved = json.loads(path.read_text())  # strict JSON: NaN was written as null
    assert saved["nan"] is None and read(path)["runs"][0]["metrics"]["step_time_s"]["median"] == 0.5
    with pytest.raises(TypeError):
        write_atomic(path, doc_with([run_with(0.5)]) | {"bad": object()})
    assert json.loads(path.read_text()) == saved  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind


def test_read_refuses_other_schemas_and_bad_json(tmp_path):
    other = tmp_path / "o.json"
    other.write_text(json.dumps({"schema": "pytest-benchmark"}))
    with pytest.raises(
        ValueError, match=r"o\.json: schema = .pytest-benchmark. is invalid: accepted .moebench\.result/1."
    ):
        read(other)
    broken = tmp_path / "b.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match=r"b\.json: not a readable result file"):
        read(broken)


def test_bandwidth_sums_each_layers_busiest_rank_and_energy_counts_only_timed_tokens():
    layer_2 = [[0, 40, 0, 0], [0, 0, 0, 10]]  # rank 0 sends 40 rows to rank 1; rank 1 keeps 10
    raw = RAW | {"counts_WE": RAW["counts_WE"] + [layer_2], "kept_WE": RAW["kept_WE"] + [layer_2]}
    two_layers = spec("throughput")
    two_layers.model["layers"] = 2
    metrics, _, _ = kinds.evaluate(two_layers, [raw, raw])
    # Layer 1: S = 110 rows (as above). Layer 2: rank 1 receives 50 rows, the most of any direction.
    assert metrics["a2a_algbw_gbps"]["median"] == pytest.approx((110 + 50) * 32 / 0.002 / 1e9)
    assert metrics["bytes_per_token"]["median"] == 2 * (190 + 50) * 32 / 200
    assert kinds.window_tokens(spec("throughput")) == 200 * 3  # N tokens x 3 timed repeats, no warm-up
    assert kinds.window_tokens(spec("equivalence")) == 200  # one forward + backward


def test_gates_can_judge_a_percentile_and_unmeasured_gates_are_shown():
    s = spec("latency", world=1)
    s = RunSpec(**{**s.__dict__, "slos": (Slo("step_time_s", "max", 0.3, "scenario", "p99"),)})
    metrics, _, _ = kinds.evaluate(s, [RAW])
    (gate,) = _judge_slos(s, metrics)
    assert (gate["gate"], gate["value"], gate["pass"]) == ("max_step_time_s_p99", 0.4, False)  # median passes
    run = run_with(0.01) | {"slo": [gate | {"pass": None}]}
    assert "1 not measured" in render(doc_with([run])).splitlines()[4]


def test_equivalence_check_fails_when_the_error_exceeds_the_tolerance(monkeypatch):
    from moebench.launch.spawn import RankContext

    s = spec("equivalence", world=1, tokens_per_rank=24)
    per_rank = [equivalence.run_rank(RankContext(0, 1, None, torch.device("cpu"), "gloo"), equivalence.case(s))]
    metrics, checks, _ = kinds.evaluate(s, per_rank)
    assert metrics["rel_error_forward"]["median"] < 1e-5 and [c["pass"] for c in checks] == [True, True]
    monkeypatch.setitem(equivalence.TOLERANCE, "float32", 1e-12)  # fp32 rounding alone now exceeds it
    _, checks, _ = kinds.evaluate(s, per_rank)
    assert checks[0]["pass"] is False and "tolerance 1e-12" in checks[0]["detail"]


def test_every_metric_a_kind_names_has_a_row_in_docs_results():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "docs" / "results.md"
    rows = {line.split("|")[1].strip() for line in readme.read_text().splitlines() if line.startswith("| `")}
    missing = [(k.name, n) for k in kinds.REGISTRY.values() for n in k.metrics if f"`{n}`" not in rows]
    assert missing == []


@pytest.mark.parametrize("fmt", ["d", ">999999999", "s", "{}", 3])
def test_a_recorded_column_whose_format_cannot_format_a_number_is_refused_naming_the_file(tmp_path, fmt):
    doc = doc_with([run_with(0.0125)])
    doc["columns"] = [["step_time_s", "step (ms)", 1e3, fmt]]
    path = tmp_path / "x.json"
    write_atomic(path, doc)
    with pytest.raises(ValueError, match=r"x\.json: malformed .*columns must be a list of \[metric, header, scale"):
        read(path)
    doc["columns"] = [["step_time_s", "step (ms)", 1e3, ".2f"]]  # a good one renders, scaled
    write_atomic(path, doc)
    assert "12.50" in render(read(path))
