"""Calibrating the plan's TTFT and TPOT from ``serve`` runs: a serve run mapped onto a plan, the fits
measured = a + b · predicted with their held-out errors, the plan's calibrated TTFT and TPOT, and runs
that are skipped or refused."""

from __future__ import annotations

import json
import re

import pytest
from test_calibrate import _doc, _metric, a2a_runs, gemm_runs, write_results
from test_plan import write_plan

from moebench.plan import calibrate as C
from moebench.plan import model as Mo
from moebench.plan import serve_runs as SR
from moebench.plan.spec import load_plan

# A machine whose idle TTFT is 2 ms + 1.5× the model's prefill, and whose TPOT is 0.5 ms + 3× its decode.
TTFT_A, TTFT_B, TPOT_A, TPOT_B = 2e-3, 1.5, 5e-4, 3.0


@pytest.fixture
def plan(tmp_path):
    return load_plan(
        str(
            write_plan(
                tmp_path,
                hardware__name="test cpu",
                hardware__peak_flops="4 TFLOP/s",
                hardware__intra_node_bandwidth="20 GB/s",
                hardware__intra_node_latency="30 us",
            )
        )
    )


def serve_run(world=2, mode="ep", prompt=128, decode_batch=3.0, inputs=(100, 140), outputs=(20, 40), **model) -> dict:
    """One serve run in the result format; its times are filled in by ``timed``."""
    config = {
        "scenario": {"name": "s", "kind": "serve"},
        "model": {"hidden": 256, "ffn_hidden": 512, "num_experts": 8, "top_k": 2, "layers": 2, "activation": "gelu",
                  "dtype": "float32", "expert_backend": "auto", "attention_heads": 8, "kv_heads": 4, "head_dim": 32,
                  "dense_layers": 0, "shared_experts": 0, "vocab": 0} | model,
        "routing": {"capacity_factor": 0.0}, "parallel": {"world_size": world, "mode": mode},
        "workload": {"seed": 0},
        "serve": {"requests": 4, "request_rate": 8.0, "input_len": list(inputs), "output_len": list(outputs)},
    }  # fmt: skip
    requests = [
        {"id": j, "rank": j % world, "input_len": inputs[j % 2], "output_len": outputs[j % 2]} for j in range(4)
    ]
    details = {"requests": requests, "idle_prompt_len": prompt,
               "engine": {"steps": 50, "mean_decode_batch": decode_batch, "mean_batch_tokens": 40.0}}  # fmt: skip
    params = {"world_size": world, "mode": mode, "prompt": prompt, "decode_batch": decode_batch}
    return {"params": params, "config": config, "world_size": world, "device": "cpu", "backend": "gloo",
            "status": "ok", "error": None, "metrics": {}, "checks": [], "slo": [], "details": details}  # fmt: skip


def timed(plan, runs: list, ttft_noise=lambda i: 1.0) -> list:
    """The runs with idle_ttft_s and tpot_s exactly a + b · the model's prediction (times a noise factor)."""
    for i, run in enumerate(runs):
        ttft = TTFT_A + TTFT_B * SR.predicted(plan, run, "prefill")
        tpot = TPOT_A + TPOT_B * SR.predicted(plan, run, "decode")
        run["metrics"] |= {"idle_ttft_s": _metric(ttft * ttft_noise(i)), "tpot_s": _metric(tpot)}
    return runs


def sweep() -> list:
    return [
        serve_run(world=1, prompt=64, decode_batch=1.0),
        serve_run(world=2, prompt=256, decode_batch=2.5, inputs=(200, 300)),
        serve_run(world=2, mode="dp", prompt=512, decode_batch=4.0),
        serve_run(world=4, prompt=1024, decode_batch=6.0, inputs=(800, 1000), outputs=(60, 100)),
        serve_run(world=4, mode="dp", prompt=32, decode_batch=0.5),
    ]


def write_serve(folder, runs: list, cpu: str = "Test CPU 9000"):
    folder.mkdir(exist_ok=True)
    (folder / "serve.json").write_text(json.dumps(_doc("s", "serve", runs, cpu)))
    return folder


# -------------------------------------------------------------------------------------------
# A serve run as a plan


def test_a_serve_run_maps_onto_the_plans_hardware_with_its_model_degrees_and_workload(plan):
    run = serve_run(world=4, prompt=300, decode_batch=2.6, inputs=(100, 151), outputs=(20, 41), dtype="bfloat16")
    pre = SR.plan_for_serve_run(plan, run, "prefill")
    m = pre.model
    assert (m.hidden, m.ffn_hidden, m.experts, m.top_k, m.layers) == (256, 512, 8, 2, 2)
    assert (m.heads, m.kv_heads, m.head_dim, m.vocab, m.precision, m.activation) == (8, 4, 32, 0, "bf16", "gelu")
    assert pre.hardware == plan.hardware
    par = pre.parallel
    assert (par.ep, par.dp, par.tp, par.pp, par.capacity_factor, par.offload_cache_slots) == (4, 1, 1, 1, 0.0, 0)
    wl = pre.workload
    assert (wl.batch, wl.seq_len_max, wl.seq_len_min, wl.microbatches) == (4, 300, 300, 1)  # one prompt per rank
    assert Mo.seqs_per_rank(pre) == 1
    dec = SR.plan_for_serve_run(plan, run, "decode").workload
    # round(2.6 · 4) = 10 sequences; the requests' mean lengths (100 + 151)/2 and (20 + 41)/2, rounded
    assert (dec.batch, dec.seq_len_max, dec.output_tokens, dec.microbatches) == (10, 126, 30, 1)
    assert SR.predicted(plan, run, "decode") == Mo.decode(SR.plan_for_serve_run(plan, run, "decode")).total


def test_dp_mode_is_data_parallel_and_a_tiny_decode_batch_is_at_least_one_sequence(plan):
    run = serve_run(world=4, mode="dp", decode_batch=0.1)
    p = SR.plan_for_serve_run(plan, run, "decode")
    assert (p.parallel.ep, p.parallel.dp) == (1, 4)
    assert p.workload.batch == 1  # round(0.1 · 4) = 0, at least 1
    assert Mo.all_to_all(p, 8).total == 0.0  # no expert parallelism: no all-to-all


def test_without_requests_the_mean_lengths_come_from_the_serve_config(plan):
    run = serve_run(inputs=(100, 200), outputs=(10, 30))
    run["details"].pop("requests")
    wl = SR.plan_for_serve_run(plan, run, "decode").workload
    assert (wl.seq_len_max, wl.output_tokens) == (150, 20)
    run["config"]["serve"] |= {"input_len": 64, "output_len": 8}
    wl = SR.plan_for_serve_run(plan, run, "decode").workload
    assert (wl.seq_len_max, wl.output_tokens) == (64, 8)


# -------------------------------------------------------------------------------------------
# The fits


def test_serve_fits_recover_a_and_b_with_zero_held_out_error(tmp_path, plan):
    cal = C.calibrate(plan, [str(write_serve(tmp_path / "r", timed(plan, sweep())))])
    assert cal.ttft.coefs == pytest.approx((TTFT_A, TTFT_B), rel=1e-6)
    assert cal.tpot.coefs == pytest.approx((TPOT_A, TPOT_B), rel=1e-6)
    assert len(cal.ttft.observations) == len(cal.tpot.observations) == 5
    assert max(abs(e) for e in cal.ttft.errors() + cal.tpot.errors()) < 1e-6
    # predictions differ from run to run (else the fit had nothing to fit a slope to)
    assert len({o.features[1] for o in cal.ttft.observations}) == 5
    # the plan's own, calibrated: a + b · its predicted TTFT and TPOT
    assert cal.applies
    assert cal.calibrated["ttft"]["model_s"] == Mo.prefill(plan).total
    assert cal.calibrated["ttft"]["calibrated_s"] == pytest.approx(TTFT_A + TTFT_B * Mo.prefill(plan).total)
    assert cal.calibrated["tpot"]["calibrated_s"] == pytest.approx(TPOT_A + TPOT_B * Mo.decode(plan).total)
    doc = C.to_json(cal)
    assert doc["fits"]["ttft"]["coefficients"] == pytest.approx([TTFT_A, TTFT_B], rel=1e-6)
    assert doc["fits"]["tpot"]["held_out_abs_error_max"] < 1e-6 and len(doc["fits"]["tpot"]["runs"]) == 5
    text = C.render(doc)
    assert "TTFT, serve (a + b · model)" in text and "a = 2 ms, b = 1.5" in text
    assert "calibrated TTFT of the plan" in text and "calibrated TPOT of the plan" in text


def test_held_out_error_shows_a_serve_run_that_breaks_the_model(tmp_path, plan):
    runs = timed(plan, sweep(), ttft_noise=lambda i: 1.5 if i == 3 else 1.0)
    cal = C.calibrate(plan, [str(write_serve(tmp_path / "r", runs))])
    errors = cal.ttft.errors()
    assert max(range(5), key=lambda i: abs(errors[i])) == 3
    assert errors[3] == pytest.approx(1 / 1.5 - 1, rel=1e-6)  # the other four fit exactly without it
    assert max(abs(e) for e in cal.tpot.errors()) < 1e-6  # its TPOT follows the model: untouched


def test_serve_fits_are_not_applied_to_a_plan_on_other_hardware(tmp_path, plan):
    cal = C.calibrate(plan, [str(write_serve(tmp_path / "r", timed(plan, sweep()), cpu="Other CPU"))])
    assert cal.ttft.fitted and not cal.applies and cal.calibrated == {}
    text = C.render(C.to_json(cal))
    assert "not applied: the results ran on Other CPU" in text
    assert "no calibrated TTFT or TPOT for the plan" in text and "calibrated TTFT of the plan" not in text


def test_too_few_serve_runs_say_why_and_runs_without_the_figures_are_skipped(tmp_path, plan):
    runs = timed(plan, sweep()[:4])
    runs[0]["metrics"].pop("idle_ttft_s")  # no idle TTFT: out of the TTFT fit, still in TPOT's
    runs[1]["details"].pop("idle_prompt_len")  # no idle prompt: the same
    runs[2]["details"]["engine"].pop("mean_decode_batch")  # no decode batch: out of the TPOT fit
    runs[3]["status"] = "error"  # not ok: out of both
    cal = C.calibrate(plan, [str(write_serve(tmp_path / "r", runs))])
    assert [o.label for o in cal.ttft.observations] == ["s world_size=2 mode=dp prompt=512 decode_batch=4.0"]
    assert len(cal.tpot.observations) == 2
    assert not cal.ttft.fitted and cal.ttft.reason == "1 serve (with idle_ttft_s) runs found; the fit needs at least 3"
    assert not cal.tpot.fitted and cal.tpot.reason == "2 serve (with tpot_s) runs found; the fit needs at least 3"
    assert cal.calibrated == {}
    text = C.render(C.to_json(cal))
    assert "not fitted: 1 serve (with idle_ttft_s) runs found" in text and "calibrated TTFT" not in text


def test_a_folder_mixing_kinds_keeps_the_other_fits_and_the_cli_reports_the_serve_fits(tmp_path, capsys, plan):
    from moebench.cli import main

    alone = C.calibrate(plan, [str(write_results(tmp_path / "a", gemm_runs(), a2a_runs()))])
    machine = C.applied(plan, alone)  # the serve runs are predicted on the machine the other fits describe
    folder = write_serve(write_results(tmp_path / "m", gemm_runs(), a2a_runs()), timed(machine, sweep()))
    mixed = C.calibrate(plan, [str(folder)])
    assert mixed.factors == alone.factors and mixed.gemm.held_out == alone.gemm.held_out
    assert mixed.ttft.coefs == pytest.approx((TTFT_A, TTFT_B), rel=1e-6)
    assert not alone.ttft.fitted and alone.ttft.reason.startswith("0 serve")
    assert main(["plan", plan.path, "--calibrate", str(folder), "--json", "-"]) in (0, 1)
    doc = json.loads(capsys.readouterr().out)["calibration"]
    assert doc["fits"]["tpot"]["coefficients"] == pytest.approx([TPOT_A, TPOT_B], rel=1e-6)
    assert doc["calibrated"]["ttft"]["calibrated_s"] == pytest.approx(TTFT_A + TTFT_B * Mo.prefill(machine).total)
    assert Mo.prefill(machine).total != pytest.approx(Mo.prefill(plan).total)  # the fitted GEMM rate mattered


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda run: run["details"].update(idle_prompt_len="long"), 'runs[1].details.idle_prompt_len = "long"'),
        (lambda run: run["details"]["engine"].update(mean_decode_batch=-2), "details.engine.mean_decode_batch = -2"),
        (lambda run: run["config"]["model"].update(dtype="int4"), 'runs[1].config.model.dtype = "int4"'),
        (lambda run: run["config"]["parallel"].update(mode="tp"), 'runs[1].config.parallel.mode = "tp"'),
    ],
)
def test_a_serve_field_no_run_writes_is_refused_in_one_line_naming_it(tmp_path, capsys, plan, edit, message):
    from moebench.cli import main

    runs = timed(plan, sweep())
    edit(runs[1])
    folder = write_serve(tmp_path / "r", runs)
    with pytest.raises(ValueError, match=re.escape(message) + " is invalid: accepted "):
        C.calibrate(plan, [str(folder)])
    assert main(["plan", plan.path, "--calibrate", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert "serve.json: runs[1]" in err and len(err.splitlines()) == 1
