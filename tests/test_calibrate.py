"""Calibrating the plan model from result files: the experts kind, the fits, held-out errors,
and when fitted factors are (not) applied to a plan."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch
from test_plan import write_plan
from test_results import spec

from moebench import kinds
from moebench.kinds import experts
from moebench.launch.spawn import RankContext
from moebench.plan import calibrate as C
from moebench.plan import model as Mo

# A machine to fake: large GEMMs at R = 2 TFLOP/s, half of that at 64 rows per expert;
# an all-to-all of α = 30 us plus bytes at β = 20 GB/s.
R, HALF, ALPHA, BETA = 2e12, 64.0, 30e-6, 20e9


def _metric(value: float, unit: str = "s") -> dict:
    return {"unit": unit, "better": "lower", "exact": False, "samples": [value], "n": 1, "median": value,
            "p90": value, "p99": value, "min": value, "max": value, "cv": 0.0}  # fmt: skip


def _run(params: dict, config: dict, metrics: dict, world: int = 1) -> dict:
    return {"params": params, "config": config, "world_size": world, "device": "cpu", "backend": "gloo",
            "status": "ok", "error": None, "metrics": metrics, "checks": [], "slo": []}  # fmt: skip


def _doc(name: str, kind: str, runs: list, cpu: str = "Test CPU 9000") -> dict:
    return {"schema": "moebench.result/1", "source": f"{name}.toml", "created_utc": "2026-11-21T00:00:00+00:00",
            "scenario": {"scenario": {"name": name, "kind": kind}},
            "environment": {"cpu": cpu, "gpus": [], "cpu_count": 2}, "runs": runs}  # fmt: skip


def gemm_runs(noise=lambda i: 1.0) -> list:
    runs = []
    for i, (tokens, hidden) in enumerate((t, h) for h in (256, 512) for t in (16, 64, 256, 1024)):
        model = {"hidden": hidden, "ffn_hidden": 1024, "num_experts": 8, "top_k": 2, "activation": "gelu", "layers": 1}
        rows = tokens * 2
        flops = 2.0 * rows * 2 * hidden * 1024
        t = flops / (R * (rows / 8) / (rows / 8 + HALF)) * noise(i)
        config = {"model": model, "workload": {"tokens_per_rank": tokens}}
        runs.append(_run({"tokens_per_rank": tokens, "hidden": hidden}, config, {"expert_time_s": _metric(t)}))
    return runs


def a2a_runs(count: int = 4) -> list:
    runs = []
    for tokens in [64 * 4**i for i in range(count)]:
        model = {"hidden": 256, "layers": 2, "top_k": 2, "activation": "gelu", "num_experts": 8, "ffn_hidden": 512}
        size = tokens * 2 * 256 * 4  # one layer's nccl-tests size S
        per_layer = ALPHA + size / 2 / BETA  # half of it leaves the rank at W = 2
        t = 2 * per_layer
        metrics = {"a2a_time_s": _metric(t), "a2a_algbw_gbps": _metric(2 * size / t / 1e9, "GB/s")}
        runs.append(_run({"tokens_per_rank": tokens}, {"model": model, "workload": {"tokens_per_rank": tokens}},
                         metrics, world=2))  # fmt: skip
    return runs


def write_results(folder, gemm: list, a2a: list, cpu: str = "Test CPU 9000"):
    folder.mkdir(exist_ok=True)
    (folder / "gemm.json").write_text(json.dumps(_doc("g", "experts", gemm, cpu)))
    (folder / "a2a.json").write_text(json.dumps(_doc("a", "dispatch", a2a, cpu)))
    return folder


@pytest.fixture
def plan(tmp_path):
    from moebench.plan.spec import load_plan

    return load_plan(str(write_plan(tmp_path, hardware__name="test cpu", hardware__peak_flops="4 TFLOP/s")))


def test_fits_recover_a_machine_that_follows_the_model_exactly(tmp_path, plan):
    cal = C.calibrate(plan, [str(write_results(tmp_path / "r", gemm_runs(), a2a_runs()))])
    f = cal.factors
    assert f["gemm_rate"] == pytest.approx(R, rel=1e-6) and f["gemm_half_rows"] == pytest.approx(HALF, rel=1e-6)
    assert f["mfu"] == pytest.approx(R / 4e12, rel=1e-6)
    assert f["intra_node_latency"] == pytest.approx(ALPHA, rel=1e-6)
    assert f["intra_node_bandwidth"] == pytest.approx(BETA, rel=1e-6)
    assert max(abs(e) for e in cal.gemm.errors() + cal.a2a.errors()) < 1e-6
    assert not cal.h2d.fitted and cal.h2d.reason == "0 offload (with copies) runs found; the fit needs at least 3"
    assert not cal.offload.fitted and "no host-to-device fit" in cal.offload.reason


def test_held_out_error_shows_a_run_that_breaks_the_model(tmp_path, plan):
    # one run 1.5× slower than the model says: its own held-out error is the largest, and positive
    cal = C.calibrate(
        plan, [str(write_results(tmp_path / "r", gemm_runs(lambda i: 1.5 if i == 2 else 1.0), a2a_runs()))]
    )
    errors = cal.gemm.errors()
    worst = max(range(len(errors)), key=lambda i: abs(errors[i]))
    assert worst == 2 and errors[2] < -0.2  # predicted from the others: about 1/1.5 of what was measured
    doc = C.to_json(cal)
    assert doc["fits"]["gemm"]["held_out_abs_error_max"] == pytest.approx(abs(errors[2]))


def test_calibrated_factors_apply_only_on_the_plans_hardware(tmp_path, plan):
    cal = C.calibrate(plan, [str(write_results(tmp_path / "r", gemm_runs(), a2a_runs()))])
    assert cal.applies and cal.devices == ("Test CPU 9000",)
    tuned = C.applied(plan, cal)
    assert tuned.hardware.mfu == pytest.approx(0.5) and tuned.hardware.gemm_half_rows == pytest.approx(HALF)
    assert tuned.hardware.intra_node_bandwidth == pytest.approx(BETA)
    assert Mo.estimate(tuned)["ttft"] != Mo.estimate(plan)["ttft"]
    other = C.calibrate(plan, [str(write_results(tmp_path / "o", gemm_runs(), a2a_runs(), cpu="Other CPU"))])
    assert not other.applies and "Other CPU" in other.why_not


def test_too_few_runs_are_not_fitted_and_say_why(tmp_path, plan):
    cal = C.calibrate(plan, [str(write_results(tmp_path / "r", gemm_runs()[:2], a2a_runs(count=2)))])
    assert not cal.gemm.fitted and "2 experts runs found; the fit needs at least 3" in cal.gemm.reason
    assert not cal.a2a.fitted and "mfu" not in cal.factors and "intra_node_bandwidth" not in cal.factors
    assert "not fitted" in C.render(C.to_json(cal))


def test_cli_calibrate_reports_the_fits(tmp_path, capsys, plan):
    from moebench.cli import main

    results = write_results(tmp_path / "r", gemm_runs(), a2a_runs())
    assert main(["plan", plan.path, "--calibrate", str(results), "--json", "-"]) in (0, 1)
    doc = json.loads(capsys.readouterr().out)
    assert doc["calibration"]["applied"] is True
    assert doc["calibration"]["factors"]["gemm_half_rows"] == pytest.approx(HALF, rel=1e-6)


def test_experts_kind_times_the_ffn_alone():
    s = spec("experts", world=1)
    s = replace(s, parallel=s.parallel | {"threads_per_rank": 0})
    ctx = RankContext(0, 1, None, torch.device("cpu"), "gloo")
    raw = kinds.measure(ctx, s, None)
    metrics, checks, _ = kinds.evaluate(s, [raw])
    flops = 2.0 * 100 * 1 * 2 * 8 * 8  # rows · m · D · F, gelu
    assert experts.expert_flops(s) == flops
    t = metrics["expert_time_s"]["median"]
    assert metrics["expert_tflops"]["median"] == pytest.approx(flops / t / 1e12)  # 3 samples: the middle one
    assert metrics["rows_per_expert"]["median"] == 25 and metrics["rows_per_expert"]["exact"]
    assert checks[0]["name"] == "finite_output" and checks[0]["pass"]
    # The loop floor is timed in the same rounds: one sample of each per round.
    assert len(raw["experts"]) == len(raw["loop_floor"]) == s.scenario["repeats"]
    assert metrics["loop_floor_time_s"]["samples"] == raw["loop_floor"]
    rounds = zip(raw["experts"], raw["loop_floor"], strict=True)
    assert metrics["experts_over_loop"]["samples"] == [a / b for a, b in rounds]


# A machine whose expert copies run at H2D = 10 GB/s and whose offloaded step is the resident step
# plus its copies, one after the other.
H2D = 10e9


def offload_runs(noise=lambda i: 1.0) -> list:
    runs = []
    for i, (slots, misses) in enumerate(((1, 40), (2, 25), (4, 10), (6, 4))):
        expert_bytes, repeats, world = 3 * 10**6, 8, 2
        copied = misses * expert_bytes  # over both ranks and all rounds
        per_step = copied / world / repeats
        resident = 2e-3
        offloaded = (resident + per_step / H2D) * noise(i)
        caches = [[{"h2d_bytes": copied // 4, "copy_s": copied / 4 / H2D}] * 2] * 2  # 2 ranks x 2 layers
        metrics = {"resident_step_time_s": _metric(resident), "offload_step_time_s": _metric(offloaded)}
        metrics["offload_step_time_s"]["n"] = repeats
        run = _run({"cache_slots": slots}, {"model": {}, "workload": {}}, metrics, world=world)
        runs.append(run | {"details": {"offload": caches}})
    return runs


def test_host_to_device_fit_recovers_the_copy_rate_and_predicts_the_offloaded_step(tmp_path, plan):
    folder = write_results(tmp_path / "r", gemm_runs(), a2a_runs())
    (folder / "off.json").write_text(json.dumps(_doc("o", "throughput", offload_runs())))
    cal = C.calibrate(plan, [str(folder)])
    assert cal.factors["host_to_device_bandwidth"] == pytest.approx(H2D, rel=1e-6)
    assert len(cal.h2d.observations) == len(cal.offload.observations) == 4
    assert max(abs(e) for e in cal.h2d.errors() + cal.offload.errors()) < 1e-6
    # a run 1.4x slower than resident + copies: its own held-out error is the largest, and shows it
    (folder / "off.json").write_text(json.dumps(_doc("o", "throughput", offload_runs(lambda i: 1.4 if i == 1 else 1))))
    errors = C.calibrate(plan, [str(folder)]).offload.errors()
    assert max(range(4), key=lambda i: abs(errors[i])) == 1 and errors[1] == pytest.approx(1 / 1.4 - 1, rel=1e-6)
    doc = C.to_json(cal)
    assert doc["fits"]["offloaded_step"]["fitted"] and "offloaded step" in C.render(doc)
    assert C.applied(
        replace(plan, hardware=replace(plan.hardware, name="test cpu")), cal
    ).hardware.host_to_device_bandwidth == pytest.approx(H2D)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda runs: runs[2]["metrics"]["expert_time_s"].update(median=float("inf")), "runs[2].metrics.expert_time_s"),
        (lambda runs: runs[0]["metrics"]["expert_time_s"].update(median=float("nan")), "runs[0].metrics.expert_time_s"),
        (lambda runs: runs[1]["metrics"]["expert_time_s"].update(median=-1.0), "runs[1].metrics.expert_time_s"),
    ],
)
def test_a_time_that_is_infinite_nan_or_negative_is_refused_naming_the_run_not_fitted_to_0(
    tmp_path, capsys, plan, edit, message
):
    from moebench.cli import main

    gemm = gemm_runs()
    edit(gemm)
    folder = write_results(tmp_path / "r", gemm, a2a_runs())  # json.dumps keeps NaN and Infinity
    with pytest.raises(ValueError, match=re.escape(f"gemm.json: {message}.median = ")):
        C.calibrate(plan, [str(folder)])
    assert main(["plan", plan.path, "--calibrate", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "accepted a finite number > 0 or null" in err and len(err.splitlines()) == 1 and "nan%" not in err


def test_offload_caches_of_another_type_or_an_infinite_copy_time_are_refused_naming_the_field(tmp_path, plan):
    folder = write_results(tmp_path / "r", gemm_runs(), a2a_runs())
    runs = offload_runs()
    runs[1]["details"]["offload"] = [[{"h2d_bytes": 10, "copy_s": float("inf")}]]
    (folder / "off.json").write_text(json.dumps(_doc("o", "throughput", runs)))
    with pytest.raises(ValueError, match=r"off\.json: runs\[1\]\.details\.offload\[0\]\[0\]\.copy_s = Infinity"):
        C.calibrate(plan, [str(folder)])
    runs[1]["details"]["offload"] = [["not a table"]]
    (folder / "off.json").write_text(json.dumps(_doc("o", "throughput", runs)))
    with pytest.raises(ValueError, match=r"runs\[1\]\.details\.offload is invalid: accepted a list \(ranks\)"):
        C.calibrate(plan, [str(folder)])
