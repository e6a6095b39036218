"""The serve kind as the harness sees it: its scenario keys and refusals, the seeded requests, the
metric formulas on hand-made rank records (docs/results.md, "serve"), and one W = 1 run through the
runner whose metrics are recomputed from its ``details.requests``. The decoder and the engine are
tested in test_model.py, test_engine.py, test_serve_parallel.py and test_reference_decoder.py."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_scenario import write

from moebench import runner
from moebench.kinds import serve
from moebench.launch.spawn import RankContext
from moebench.measure.eplb import EPLB_METRICS
from moebench.scenario import SCHEMA, ScenarioError, load
from moebench.workload.requests import Draw, arrivals, draw_requests, prompt

ROOT = Path(__file__).resolve().parent.parent
CTX = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")

SERVE = {
    "scenario": {"name": "s", "kind": "serve", "warmup": 0, "repeats": 2},
    "model": {"hidden": 32, "ffn_hidden": 32, "num_experts": 4, "layers": 2, "attention_heads": 4},
    "parallel": {"device": "cpu"},
}
THROUGHPUT = {
    "scenario": {"name": "t", "kind": "throughput"},
    "model": {"hidden": 8, "ffn_hidden": 16, "num_experts": 4},
    "workload": {"tokens_per_rank": 16},
}


def doc_with(base: dict, **sections: dict) -> dict:
    """``base`` with each section's keys added (a section set to None is removed)."""
    doc = {s: dict(t) for s, t in base.items()}
    for section, table in sections.items():
        if table is None:
            doc.pop(section, None)
        else:
            doc.setdefault(section, {}).update(table)
    return doc


def refusal(tmp_path: Path, doc: dict) -> str:
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


# -------------------------------------------------------------------------------------------
# Scenario files


def test_minimal_serve_file_without_workload_loads_with_every_serve_default(tmp_path):
    (run,) = load(write(tmp_path, SERVE)).runs
    assert run.serve == {key: spec.default for key, spec in SCHEMA["serve"].items()}
    assert run.serve["request_rate"] == "inf" and run.workload["tokens_per_rank"] is None
    resolved = run.resolved()
    assert resolved["serve"] == run.serve and resolved["model"]["attention_heads"] == 4
    assert resolved["parallel"]["mode"] == "ep"


def test_serve_accepts_mode_dp_which_holds_every_expert_on_every_rank(tmp_path):
    (run,) = load(write(tmp_path, doc_with(SERVE, parallel={"world_size": 2, "mode": "dp"}))).runs
    assert run.parallel_config().ep_size == 1 and run.resolved()["parallel"]["mode"] == "dp"


def test_serve_qk_norm_key_reaches_the_decoder_config(tmp_path):
    (run,) = load(write(tmp_path, doc_with(SERVE, model={"qk_norm": "head"}))).runs
    assert run.decoder_config().qk_norm == "head" and run.resolved()["model"]["qk_norm"] == "head"
    (plain,) = load(write(tmp_path, SERVE)).runs
    assert plain.decoder_config().qk_norm == "none"


@pytest.mark.parametrize("written", [math.inf, "inf"])
def test_request_rate_inf_is_recorded_as_the_string_inf(tmp_path, written):
    (run,) = load(write(tmp_path, doc_with(SERVE, serve={"request_rate": written}))).runs
    assert run.serve["request_rate"] == "inf" and run.resolved()["serve"]["request_rate"] == "inf"


def test_a_request_rate_sweep_with_inf_records_inf_as_a_string_in_its_run_and_params(tmp_path):
    runs = load(write(tmp_path, doc_with(SERVE, serve={"request_rate": [4.0, math.inf]}))).runs
    assert [r.serve["request_rate"] for r in runs] == [4.0, "inf"]
    assert [r.params for r in runs] == [{"request_rate": 4.0}, {"request_rate": "inf"}]


def test_a_min_max_length_is_one_value_and_a_list_of_ranges_is_a_sweep(tmp_path):
    (run,) = load(write(tmp_path, doc_with(SERVE, serve={"input_len": [8, 32]}))).runs
    assert run.serve["input_len"] == [8, 32] and run.params == {}
    runs = load(write(tmp_path, doc_with(SERVE, serve={"input_len": [[8, 32], [64, 64]]}))).runs
    assert [r.serve["input_len"] for r in runs] == [[8, 32], [64, 64]]
    assert [r.params for r in runs] == [{"input_len": [8, 32]}, {"input_len": [64, 64]}]


@pytest.mark.parametrize("value", [[1, 2, 3], [8, 4], [0, 4]])
def test_a_length_list_that_is_not_a_min_max_range_is_refused(tmp_path, value):
    message = refusal(tmp_path, doc_with(SERVE, serve={"input_len": value}))
    spelled = "[" + ", ".join(map(str, value)) + "]"
    assert f"[serve] input_len = {spelled} is invalid: accepted an integer from 1 to 16777216, or [min, max]" in message


REFUSALS = {
    "decoder key for throughput": (
        doc_with(THROUGHPUT, model={"kv_heads": 2}),
        '[model] kv_heads = 2 is invalid for kind = "throughput": accepted only with kind "serve"',
    ),
    "[serve] for throughput": (
        doc_with(THROUGHPUT, serve={"requests": 4}),
        '[serve] requests = 4 is invalid for kind = "throughput": accepted only with kind "serve"',
    ),
    "mode dp for throughput": (
        doc_with(THROUGHPUT, parallel={"mode": "dp"}),
        '[parallel] mode = "dp" is invalid for kind = "throughput": accepted only with kind "serve"',
    ),
    "serve without attention heads": (
        {**SERVE, "model": {"hidden": 32, "ffn_hidden": 32, "num_experts": 4}},
        "[model] attention_heads is missing: accepted an integer from 1 to 4096 (kind serve)",
    ),
    "kv_heads not dividing attention_heads": (
        doc_with(SERVE, model={"kv_heads": 3}),
        "[model] kv_heads = 3 is invalid: accepted a divisor of attention_heads (4)",
    ),
    "qk_norm not a choice": (
        doc_with(SERVE, model={"qk_norm": "layer"}),
        '[model] qk_norm = "layer" is invalid: accepted one of',
    ),
    "qk_norm for throughput": (
        doc_with(THROUGHPUT, model={"qk_norm": "head"}),
        '[model] qk_norm = "head" is invalid for kind = "throughput": accepted only with kind "serve"',
    ),
    "capacity factor for serve": (
        doc_with(SERVE, routing={"capacity_factor": 1.25}),
        "[routing] capacity_factor = 1.25 is invalid for kind serve: accepted 0",
    ),
    "max_batch_tokens below max_running": (
        doc_with(SERVE, serve={"max_running": 8, "max_batch_tokens": 7}),
        "[serve] max_batch_tokens = 7 is invalid with max_running = 8: accepted max_batch_tokens >= max_running",
    ),
    "tokens_per_rank for serve": (
        doc_with(SERVE, workload={"tokens_per_rank": 16}),
        "[workload] tokens_per_rank = 16 is invalid for kind serve: accepted none",
    ),
    "throughput without tokens_per_rank": (
        {**THROUGHPUT, "workload": {"seed": 1}},
        "[workload] tokens_per_rank is missing: accepted an integer",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_serve_key_out_of_place_is_refused_in_one_line_naming_the_key(tmp_path, case):
    doc, expected = REFUSALS[case]
    assert expected in refusal(tmp_path, doc)


def test_cli_run_of_a_bad_serve_file_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, doc_with(SERVE, model={"kv_heads": 3}))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "moebench", "run", str(path)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [
        f"moebench: error: {path}: [model] kv_heads = 3 is invalid: accepted a divisor of attention_heads (4)"
    ]


# -------------------------------------------------------------------------------------------
# Requests


def table(**keys) -> dict:
    return {key: spec.default for key, spec in SCHEMA["serve"].items()} | keys


def test_arrivals_start_at_zero_and_never_go_back():
    times = arrivals(np.random.default_rng(3), 500, 10.0, 0.5)
    assert times[0] == 0.0 and len(times) == 500
    assert times == sorted(times) and times[-1] > 0


def test_rate_inf_sends_every_request_at_zero():
    assert arrivals(np.random.default_rng(0), 5, math.inf, 1.0) == [0.0] * 5
    assert [d.arrival_s for d in draw_requests(table(requests=6, request_rate="inf"), 2, 0)] == [0.0] * 6


@pytest.mark.parametrize(("burstiness", "cv"), [(1.0, 1.0), (4.0, 0.5), (0.25, 2.0)])
def test_gaps_have_mean_one_over_rate_and_gamma_cv_one_over_sqrt_burstiness(burstiness, cv):
    rate, n = 5.0, 40_001
    gaps = np.diff(arrivals(np.random.default_rng([7, 1]), n, rate, burstiness))
    # 40,000 gaps: the mean's standard error is cv / 5 / 200 (<= 0.002 s); the CV's is < 2 % of it
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_lengths_are_drawn_within_min_max_with_both_ends_reached():
    draws = draw_requests(table(requests=300, input_len=[3, 5], output_len=7), 1, 0)
    assert {d.input_len for d in draws} == {3, 4, 5}
    assert {d.output_len for d in draws} == {7}


def test_request_i_is_served_by_rank_i_mod_world_size_in_arrival_order():
    draws = draw_requests(table(requests=7, request_rate=2.0), 3, 0)
    assert [d.id for d in draws] == list(range(7))
    assert [d.rank for d in draws] == [0, 1, 2, 0, 1, 2, 0]


def test_the_same_seed_draws_the_same_requests_and_another_seed_others():
    keys = table(requests=20, request_rate=3.0, input_len=[1, 100], output_len=[1, 100])
    assert draw_requests(keys, 2, 5) == draw_requests(keys, 2, 5)
    other = draw_requests(keys, 2, 6)
    assert [d.arrival_s for d in other] != [d.arrival_s for d in draw_requests(keys, 2, 5)]
    assert [d.input_len for d in other] != [d.input_len for d in draw_requests(keys, 2, 5)]


def test_a_prompt_is_a_function_of_seed_and_request_id_only():
    d = Draw(id=3, rank=1, arrival_s=0.5, input_len=5, output_len=2)
    x = prompt(d, 8, 0, seed=2)
    assert x.shape == (5, 8) and x.dtype == torch.float32
    assert torch.equal(x, prompt(Draw(3, 0, 9.0, 5, 7), 8, 0, seed=2))  # any rank rebuilds it
    assert not torch.equal(x, prompt(Draw(4, 1, 0.5, 5, 2), 8, 0, seed=2))
    assert not torch.equal(x, prompt(d, 8, 0, seed=3))
    ids = prompt(Draw(3, 1, 0.5, 400, 2), 8, 11, seed=2)
    assert ids.shape == (400,) and ids.dtype == torch.int64
    assert int(ids.min()) == 0 and int(ids.max()) == 10
    assert torch.equal(ids, prompt(Draw(3, 1, 0.5, 400, 2), 8, 11, seed=2))


# -------------------------------------------------------------------------------------------
# Metric formulas on hand-made rank records

# Four requests at W 2, seed 16: its draws give output lengths 3, 1, 3, 2 (asserted below). Arrival
# times are set here by hand (the formulas subtract them); every time is a binary fraction, so the
# expected values are exact.
#   id rank arrival scheduled tokens            TTFT E2EL TPOT        ITL       queue
#   0  0    0       0         1.0 1.5 2.0       1.0  2.0  0.5         0.5 0.5   0
#   1  1    0       0.5       2.0               2.0  2.0  (one token) -         0.5
#   2  0    1.0     1.5       2.0 3.0 5.0       1.0  4.0  1.5         1.0 2.0   0.5
#   3  1    1.0     1.0       1.5 2.0           0.5  1.0  0.5         0.5       0
ROWS = [(0, 0, 0.0, 0.0, [1.0, 1.5, 2.0]), (1, 1, 0.0, 0.5, [2.0]), (2, 0, 1.0, 1.5, [2.0, 3.0, 5.0]),
        (3, 1, 1.0, 1.0, [1.5, 2.0])]  # fmt: skip


def record(id_: int, rank: int, arrival: float, scheduled: float, times: list[float]) -> dict:
    return {
        "id": id_,
        "rank": rank,
        "input_len": 4,
        "output_len": len(times),
        "arrival_s": arrival,
        "scheduled_s": scheduled,
        "first_token_s": times[0],
        "finish_s": times[-1],
        "token_times_s": times,
    }


def step(iteration: float, step_s: float, forward: float, tokens: int, decode: int) -> dict:
    return {"iteration_s": iteration, "step_s": step_s, "forward_s": forward, "tokens": tokens, "decode_tokens": decode}


def hand_spec(tmp_path: Path, **keys):
    serve_keys = {"requests": 4, "input_len": 4, "output_len": [1, 3]} | keys
    doc = doc_with(SERVE, parallel={"world_size": 2}, workload={"seed": 16}, serve=serve_keys)
    (spec,) = load(write(tmp_path, doc)).runs
    return spec


def hand_ranks(rounds: bool = True) -> list[dict]:
    """What ``measure_serve`` returns on each rank (plus the runner's ``threads``)."""
    common = {"finite": True, "kv_cache_bytes_per_token": 512, "kv_cache_bytes": 65536, "telemetry": {},
              "idle_ttft": [0.75, 0.5], "bare_prefill": [0.25, 0.5], "idle_prompt_len": 4, "threads": 1}  # fmt: skip
    rank0 = {
        "requests": [record(*r) for r in ROWS if r[1] == 0],
        "steps": [step(1.0, 0.75, 0.5, 4, 0), step(0.5, 0.5, 0.25, 2, 2), step(0.5, 0.25, 0.25, 0, 0)],
        "window_s": 5.0,
        "batching_rounds": {"continuous": [1.0, 2.0], "static": [3.0, 2.0]}
        if rounds
        else {"continuous": [], "static": []},
    }
    rank1 = {
        "requests": [record(*r) for r in ROWS if r[1] == 1],
        "steps": [step(0.25, 0.125, 0.0625, 0, 0), step(1.0, 0.75, 0.25, 3, 3)],
        "window_s": 8.0,
        "batching_rounds": {"continuous": [1.5, 1.0], "static": [2.0, 5.0]}
        if rounds
        else {"continuous": [], "static": []},
    }
    return [common | rank0, common | rank1]


def test_the_hand_made_requests_match_the_seeded_draws(tmp_path):
    draws = draw_requests(hand_spec(tmp_path).serve, 2, 16)
    assert [(d.id, d.rank, d.output_len) for d in draws] == [(r[0], r[1], len(r[4])) for r in ROWS]


def test_latencies_are_ttft_e2el_tpot_over_output_minus_one_pooled_itl_and_queue():
    lat = serve.latencies([record(*r) for r in ROWS])
    assert lat == {
        "ttft_s": [1.0, 2.0, 1.0, 0.5],
        "tpot_s": [0.5, 1.5, 0.5],  # request 1 has one token: no TPOT sample
        "itl_s": [0.5, 0.5, 1.0, 2.0, 0.5],
        "e2el_s": [2.0, 2.0, 4.0, 1.0],
        "queue_time_s": [0.0, 0.5, 0.5, 0.0],
    }


def test_evaluate_reports_each_latency_from_every_ranks_records(tmp_path):
    metrics, checks, details = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    assert [c["pass"] for c in checks] == [True, True]
    assert [r["id"] for r in details["requests"]] == [0, 1, 2, 3]
    assert metrics["ttft_s"]["samples"] == [1.0, 2.0, 1.0, 0.5] and metrics["ttft_s"]["median"] == 1.0
    assert metrics["tpot_s"]["samples"] == [0.5, 1.5, 0.5] and metrics["tpot_s"]["n"] == 3
    assert metrics["itl_s"]["samples"] == [0.5, 0.5, 1.0, 2.0, 0.5]
    assert metrics["e2el_s"]["samples"] == [2.0, 2.0, 4.0, 1.0]
    assert metrics["queue_time_s"]["samples"] == [0.0, 0.5, 0.5, 0.0]


def test_rates_are_over_the_longest_ranks_window(tmp_path):
    metrics, _, details = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    assert details["duration_s"] == 8.0  # rank 1's window, not rank 0's 5 s
    assert metrics["request_throughput"]["samples"] == [4 / 8]
    assert metrics["output_tokens_per_s"]["samples"] == [9 / 8]  # 3 + 1 + 3 + 2 output tokens
    assert metrics["output_tokens_per_s_per_gpu"]["samples"] == [9 / 8 / 2]


@pytest.mark.parametrize(
    ("slos", "met"),
    [
        ({"slo_ttft_s": 1.0}, 3),  # TTFT <= 1.0: requests 0, 2 (exactly 1.0) and 3
        ({"slo_tpot_s": 1.0}, 3),  # TPOT <= 1.0: requests 0 and 3, and 1 (one token: exempt); 2 (1.5) misses
        ({"slo_ttft_s": 1.0, "slo_tpot_s": 1.0}, 2),  # both: requests 0 and 3
        ({"slo_ttft_s": 0.5, "slo_tpot_s": 0.25}, 0),
    ],
)
def test_goodput_counts_requests_meeting_every_slo_given_over_the_window(tmp_path, slos, met):
    metrics, _, _ = serve.evaluate(hand_spec(tmp_path, **slos), hand_ranks())
    assert metrics["goodput"]["samples"] == [met / 8]
    good = [serve.good(record(*r), slos.get("slo_ttft_s"), slos.get("slo_tpot_s")) for r in ROWS]
    assert sum(good) == met


def test_goodput_is_absent_without_an_slo(tmp_path):
    metrics, _, _ = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    assert "goodput" not in metrics


def test_a_one_token_request_is_exempt_from_the_tpot_slo_but_not_the_ttft_slo():
    one = record(1, 1, 0.0, 0.5, [2.0])
    assert serve.good(one, None, 1e-9) is True
    assert serve.good(one, 1.0, None) is False and serve.good(one, 2.0, 1e-9) is True


def test_ttft_over_prefill_is_the_median_of_round_by_round_ratios(tmp_path):
    metrics, _, details = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    assert metrics["ttft_over_prefill"]["samples"] == [3.0, 1.0]  # 0.75 / 0.25, 0.5 / 0.5
    assert metrics["ttft_over_prefill"]["median"] == 2.0  # not the ratio of the medians (0.625 / 0.375)
    assert metrics["idle_ttft_s"]["samples"] == [0.75, 0.5] and metrics["prefill_time_s"]["samples"] == [0.25, 0.5]
    assert details["idle_prompt_len"] == 4


def test_engine_overhead_is_step_over_forward_minus_one_on_steps_with_tokens(tmp_path):
    metrics, _, _ = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    # rank 0: 0.75 / 0.5 − 1, 0.5 / 0.25 − 1; rank 1: 0.75 / 0.25 − 1; the empty steps are left out
    assert metrics["engine_overhead"]["samples"] == [0.5, 1.0, 2.0]


def test_rank_idle_fraction_is_each_ranks_empty_steps_share_of_its_iteration_time(tmp_path):
    metrics, _, details = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    # rank 0: 0.5 of 1.0 + 0.5 + 0.5 s; rank 1: 0.25 of 0.25 + 1.0 s
    assert metrics["rank_idle_fraction"]["samples"] == [0.25, 0.2] == details["rank_idle_fraction"]
    # the loop's time outside the step: rank 0 (0.25 + 0 + 0.25) / 2.0, rank 1 (0.125 + 0.25) / 1.25
    assert details["agree_fraction"] == [0.25, 0.3]


def test_continuous_over_static_is_per_round_the_slowest_ranks_static_over_continuous_window(tmp_path):
    metrics, _, _ = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    # rounds' longest windows: static 3.0 and 5.0, continuous 1.5 and 2.0
    assert metrics["continuous_over_static"]["samples"] == [2.0, 2.5]
    metrics, _, _ = serve.evaluate(hand_spec(tmp_path), hand_ranks(rounds=False))
    assert "continuous_over_static" not in metrics


def test_engine_details_average_decode_batches_over_steps_that_decoded(tmp_path):
    metrics, _, details = serve.evaluate(hand_spec(tmp_path), hand_ranks())
    engine = details["engine"]
    assert engine["mean_decode_batch"] == 2.5  # decode steps of 2 (rank 0) and 3 (rank 1) tokens
    assert engine["mean_batch_tokens"] == 3.0  # steps of 4, 2 and 3 tokens; the empty ones left out
    assert (engine["steps"], engine["forward_s"], engine["step_s"], engine["iteration_s"]) == (3, 1.0, 1.5, 2.0)
    assert engine["kv_cache_bytes"] == 65536 and metrics["kv_cache_bytes_per_token"]["samples"] == [512]


def test_every_request_served_fails_when_a_request_is_missing_or_short(tmp_path):
    spec = hand_spec(tmp_path)
    missing = hand_ranks()
    missing[1]["requests"] = missing[1]["requests"][1:]  # request 1 never finished
    short = hand_ranks()
    short[0]["requests"][1]["token_times_s"] = [2.0, 3.0]  # request 2 got 2 of its 3 tokens
    for per_rank, served in ((missing, "3 of 4"), (short, "3 of 4")):
        _, checks, _ = serve.evaluate(spec, per_rank)
        check = next(c for c in checks if c["name"] == "every_request_served")
        assert check["pass"] is False and check["detail"].startswith(served)


def test_finite_output_fails_when_any_rank_reports_a_non_finite_output(tmp_path):
    per_rank = hand_ranks()
    per_rank[1]["finite"] = False
    _, checks, _ = serve.evaluate(hand_spec(tmp_path), per_rank)
    assert [(c["name"], c["pass"]) for c in checks] == [("finite_output", False), ("every_request_served", True)]


# -------------------------------------------------------------------------------------------
# One run through the runner


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny W = 1 serve run through ``runner.run_one``, its rank in this process."""
    doc = doc_with(SERVE, serve={"requests": 8, "request_rate": math.inf, "input_len": [2, 6], "output_len": [1, 4],
                                 "max_running": 3, "max_batch_tokens": 8, "baseline_rounds": 1})  # fmt: skip
    (spec,) = load(write(tmp_path_factory.mktemp("serve"), doc)).runs
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "launch", lambda fn, world, *args, **kw: [fn(CTX, *args)])
        return spec, runner.run_one(spec, None)


def test_a_w1_run_is_ok_and_passes_every_check(served):
    _, run = served
    assert run["status"] == "ok", run["error"]
    assert [c["name"] for c in run["checks"]] == ["finite_output", "every_request_served"]
    assert all(c["pass"] for c in run["checks"])
    assert run["config"]["serve"]["request_rate"] == "inf"
    assert set(serve.METRICS) - {"goodput", *EPLB_METRICS} <= set(run["metrics"])  # EPLB: with [eplb] only
    assert run["details"]["rank_idle_fraction"] == [0.0]  # a rank alone steps only when it has work


def test_a_w1_runs_request_records_are_whole_and_ordered_in_time(served):
    spec, run = served
    draws = draw_requests(spec.serve, 1, spec.workload["seed"])
    records = run["details"]["requests"]
    assert [(r["id"], r["output_len"], r["input_len"]) for r in records] == [
        (d.id, d.output_len, d.input_len) for d in draws
    ]
    for r in records:
        times = r["token_times_s"]
        assert len(times) == r["output_len"] and times == sorted(times)
        assert times[0] == r["first_token_s"] and times[-1] == r["finish_s"]
        assert r["first_token_s"] >= r["scheduled_s"] >= r["arrival_s"] == 0.0


def test_a_w1_runs_metrics_are_recomputed_from_its_request_records(served):
    _, run = served
    records, metrics = run["details"]["requests"], run["metrics"]
    ttft = [r["first_token_s"] - r["arrival_s"] for r in records]
    tpot = [(r["finish_s"] - r["first_token_s"]) / (r["output_len"] - 1) for r in records if r["output_len"] > 1]
    assert metrics["ttft_s"]["median"] == pytest.approx(float(np.median(ttft)), rel=1e-12)
    assert metrics["tpot_s"]["median"] == pytest.approx(float(np.median(tpot)), rel=1e-12)
    assert metrics["ttft_s"]["n"] == 8 and metrics["tpot_s"]["n"] == len(tpot)
    e2el = [r["finish_s"] - r["arrival_s"] for r in records]
    assert metrics["e2el_s"]["median"] == pytest.approx(float(np.median(e2el)), rel=1e-12)
    itl = [b - a for r in records for a, b in itertools.pairwise(r["token_times_s"])]
    assert metrics["itl_s"]["samples"] == pytest.approx(itl, rel=1e-12)
    duration = run["details"]["duration_s"]
    assert duration >= max(r["finish_s"] for r in records)
    assert metrics["request_throughput"]["median"] == pytest.approx(8 / duration, rel=1e-12)
    out = sum(r["output_len"] for r in records)
    assert metrics["output_tokens_per_s"]["median"] == pytest.approx(out / duration, rel=1e-12)
    assert len(metrics["continuous_over_static"]["samples"]) == 1 and metrics["ttft_over_prefill"]["n"] == 2


# -------------------------------------------------------------------------------------------
# Arrivals on the wall clock (a fake one), and the ranks' agreement on real ranks


class FakeClock:
    """A wall clock that moves only when the driver sleeps, or by ``per_read`` at each reading."""

    def __init__(self, per_read: float = 0.0):
        self.now, self.per_read, self.slept = 0.0, per_read, []

    def __call__(self) -> float:
        self.now += self.per_read
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_a_request_is_released_at_its_arrival_and_the_driver_sleeps_until_the_next(tmp_path):
    from moebench.measure import serving
    from runtime.engine import Engine, Request

    doc = doc_with(SERVE, serve={"requests": 3, "request_rate": 1.0, "input_len": 3, "output_len": 2})
    (spec,) = load(write(tmp_path, doc)).runs
    model = serving.build_decoder(CTX, spec)
    clock = FakeClock(per_read=0.01)  # each reading 10 ms later: steps take time
    engine = Engine(model, 2, 8, 8, clock=clock)
    arrivals = [0.0, 5.0, 12.5]
    requests = [Request(i, torch.randn(3, 32), 2, a) for i, a in enumerate(arrivals)]
    steps = serving.drive(engine, requests, arrivals, None, clock, sleep=clock.sleep)
    done = {r.id: r for r in engine.finished}
    assert sorted(done) == [0, 1, 2] and len(steps) == 6  # a prefill and a decode step each, nothing batched
    for r in done.values():  # never scheduled before it arrived, and soon after (no missed wake-up)
        assert r.arrival_s <= r.scheduled_s < r.arrival_s + 0.1
    assert len(clock.slept) == 2 and clock.now > 12.5  # asleep twice: until 5 and until 12.5
    assert done[2].first_token_s - done[2].arrival_s < 0.1  # TTFT counts from arrival, not from t = 0


@pytest.mark.multiproc
def test_two_ep_ranks_agree_to_step_until_the_busier_one_is_done(tmp_path):
    """Through the real launcher: rank 0 has two requests served one at a time, rank 1 one; rank 1
    steps empty while rank 0 works (its idle share > 0) and neither deadlocks in the all-to-alls."""
    doc = doc_with(SERVE, serve={"requests": 3, "request_rate": math.inf, "input_len": 4, "output_len": 3,
                                 "max_running": 1, "max_batch_tokens": 4})  # fmt: skip
    doc["parallel"] = {"device": "cpu", "world_size": 2, "threads_per_rank": 1}
    (spec,) = load(write(tmp_path, doc)).runs
    run = runner.run_one(spec, None)
    assert run["status"] == "ok", run.get("error")
    assert all(c["pass"] for c in run["checks"])
    assert sorted(r["rank"] for r in run["details"]["requests"]) == [0, 0, 1]
    idle = run["details"]["rank_idle_fraction"]
    assert idle[0] == 0.0 and idle[1] > 0  # rank 1's steps while rank 0 serves its second request are empty
    assert run["details"]["engine"]["steps"] == 6  # rank 0: (prefill + 2 decodes) × 2 requests, one at a time


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_data_parallel_ranks_serve_on_their_own_without_empty_steps(tmp_path):
    """mode dp through the real launcher: no all-to-all, so no agreement and no empty step; the same
    requests as EP get every token, and the window ends with the busier rank."""
    doc = doc_with(SERVE, serve={"requests": 3, "request_rate": math.inf, "input_len": 4, "output_len": 3,
                                 "max_running": 1, "max_batch_tokens": 4})  # fmt: skip
    doc["parallel"] = {"device": "cpu", "world_size": 2, "threads_per_rank": 1, "mode": "dp"}
    (spec,) = load(write(tmp_path, doc)).runs
    run = runner.run_one(spec, None)
    assert run["status"] == "ok", run.get("error")
    assert all(c["pass"] for c in run["checks"])
    assert run["details"]["rank_idle_fraction"] == [0.0, 0.0]
    assert run["details"]["engine"]["steps"] == 6  # rank 0 alone: its two requests, one at a time
    assert run["details"]["duration_s"] >= max(r["finish_s"] for r in run["details"]["requests"])
