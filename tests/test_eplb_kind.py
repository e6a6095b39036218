"""EPLB in the harness (moebench/measure/eplb.py; docs/results.md, "EPLB re-placement"):

1. scenario files: every [eplb] / drift rule refused in one line naming file, key, value and what is accepted;
2. the parent-side formulas on hand-made rank records: balancedness medians, the speedup step by step (and
   one ratio of totals when the passes took different steps), bytes summed over ranks, recovery after drift,
   and ``rebalance_exact`` failing when one rank's probe differs;
3. drift: epoch 0 is the skew itself, and a drifted router routes token t to e exactly when the undrifted one
   routed it to π(e);
4. real launches at W = 2 through the runner: a throughput run re-places (balancedness above the static pass's
   on a Zipf load, every move bitwise exact, bytes moved, one move per interval), and a train run with spare
   slots converges like its single-device run and its memory model counts the slots (slow: serve too).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_serve_kind import SERVE, THROUGHPUT, doc_with, refusal
from test_train_kind import TRAIN

from moebench import runner
from moebench.measure import eplb as E
from moebench.scenario import load
from runtime.router import route
from runtime.weights import MoEWeights

EPLB_RUN = doc_with(
    THROUGHPUT,
    scenario={"warmup": 1, "repeats": 2},
    model={"hidden": 32, "ffn_hidden": 64, "num_experts": 8, "top_k": 2},
    parallel={"world_size": 2, "redundant_experts": 2, "device": "cpu", "threads_per_rank": 1},
    workload={"tokens_per_rank": 64, "steps": 12, "skew": "zipf", "skew_param": 1.2},
    eplb={"window": 2, "interval": 3},
)

# -------------------------------------------------------------------------------------------
# 1. Scenario files

REFUSALS = {
    "interval at world_size 1": (
        doc_with(EPLB_RUN, parallel={"world_size": 1, "redundant_experts": 0}),
        "[eplb] interval = 3 needs expert parallelism: accepted world_size >= 2 and mode ep",
    ),
    "slots not a multiple of ranks": (
        doc_with(EPLB_RUN, parallel={"redundant_experts": 1}),
        "[parallel] redundant_experts = 1 is invalid with num_experts = 8 and world_size = 2: accepted "
        "num_experts + redundant_experts a multiple of world_size",
    ),
    "more spares than ranks can hold copies": (
        doc_with(EPLB_RUN, parallel={"redundant_experts": 10}),
        "[parallel] redundant_experts = 10 is invalid: accepted at most 8",
    ),
    "steps no more than the interval": (
        doc_with(EPLB_RUN, workload={"steps": 3}),
        "[workload] steps = 3 is invalid with [eplb] interval = 3: accepted more steps than the interval",
    ),
    "drift without re-placement": (
        doc_with(EPLB_RUN, eplb={"interval": 0}, parallel={"redundant_experts": 0}, workload={"drift_every": 4}),
        "[workload] drift_every = 4 without [eplb] interval is refused: accepted with interval >= 1",
    ),
    "nodes not dividing ranks": (
        doc_with(EPLB_RUN, eplb={"nodes": 3}),
        "[eplb] nodes = 3 is invalid with world_size = 2: accepted a divisor of it",
    ),
    "interval negative": (doc_with(EPLB_RUN, eplb={"interval": -1}), "[eplb] interval = -1 is invalid"),
    "unknown key": (doc_with(EPLB_RUN, eplb={"windw": 4}), "[eplb] windw is not a known key"),
    "a kind without re-placement": (
        doc_with(EPLB_RUN, scenario={"kind": "load_balance"}, workload={"steps": 1}),
        '[eplb] interval = 3 is invalid for kind = "load_balance": accepted only with kind',
    ),
    "drift in train": (
        doc_with(TRAIN, parallel={"world_size": 2}, workload={"drift_every": 4}, eplb={"interval": 4}),
        '[workload] drift_every = 4 is invalid for kind = "train": accepted in kinds throughput, latency and serve',
    ),
    "mode dp in serve": (
        doc_with(SERVE, parallel={"world_size": 2, "mode": "dp"}, eplb={"interval": 4}),
        "[eplb] interval = 4 needs expert parallelism: accepted world_size >= 2 and mode ep",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_bad_eplb_file_is_refused_in_one_line_naming_key_value_and_accepted(tmp_path, case):
    doc, expected = REFUSALS[case]
    assert expected in refusal(tmp_path, doc)


def test_spare_slots_without_eplb_stay_a_fault_kind_feature(tmp_path):
    doc = doc_with(EPLB_RUN, eplb={"interval": 0})
    assert '[parallel] redundant_experts = 2 is invalid for kind = "throughput"' in refusal(tmp_path, doc)


def test_a_valid_eplb_file_records_its_section_and_a_plain_one_does_not(tmp_path):
    from test_scenario import write

    (spec,) = load(write(tmp_path, EPLB_RUN)).runs
    assert spec.resolved()["eplb"] == {"window": 2, "interval": 3, "nodes": 1}
    (plain,) = load(write(tmp_path, THROUGHPUT)).runs
    assert "eplb" not in plain.resolved() and plain.eplb["interval"] == 0


# -------------------------------------------------------------------------------------------
# 2. Parent-side formulas


def test_recovery_counts_the_slowest_judged_change_back_to_the_threshold():
    # drift every 4: changes at steps 4 and 8; back at 6 (2 steps) and at 8 itself (0)
    balance = [0.95, 0.96, 0.97, 0.95, 0.5, 0.6, 0.92, 0.95, 0.91, 0.95, 0.96, 0.97]
    assert E.recovery_steps(balance, 4, horizon=4) == 2
    never = [*balance[:4], 0.5, 0.5, 0.5, 0.5, *balance[8:]]
    assert E.recovery_steps(never, 4, horizon=4) == 4  # not back before the next change: all its 4 steps
    assert E.recovery_steps(balance, 0, horizon=4) is None and E.recovery_steps(balance, 12, horizon=4) is None
    assert E.recovery_steps([0.9] * 8, 4, horizon=4) == 0  # exactly the threshold counts as recovered
    # a change with fewer than horizon steps after it is not judged: here only the change at 4 is
    assert E.recovery_steps([*balance[:8], 0.1, 0.1, 0.1, 0.1], 4, horizon=5) == 2
    assert E.recovery_steps(balance, 4, horizon=9) is None  # no change has 9 steps after it


def _rank(static_s, eplb_s, static_b, eplb_b, moves) -> dict:
    return {
        "eplb": {
            "static": {"step": static_s, "balancedness": static_b, "moves": []},
            "eplb": {"step": eplb_s, "balancedness": eplb_b, "moves": moves},
        }
    }


def _spec(tmp_path, **workload):
    from test_scenario import write

    (spec,) = load(write(tmp_path, doc_with(EPLB_RUN, workload=workload))).runs
    return spec


def test_metrics_from_hand_records(tmp_path):
    spec = _spec(tmp_path, drift_every=3, steps=8)  # interval 3 + window 2: a change is judged with 5 steps after
    moves0 = [{"after_step": 2, "time_s": 0.01, "bytes_sent": 100, "exact": True},
              {"after_step": 5, "time_s": 0.03, "bytes_sent": 0, "exact": True}]  # fmt: skip
    moves1 = [{**moves0[0], "bytes_sent": 50}, {**moves0[1], "bytes_sent": 25}]
    static_b, eplb_b = [0.5, 0.6, 0.7, 0.5, 0.4, 0.5, 0.6, 0.5], [0.5, 0.6, 0.7, 0.4, 0.5, 0.93, 0.95, 0.99]
    per_rank = [
        _rank([2.0] * 8, [1.0] * 7 + [4.0], static_b, eplb_b, moves0),
        _rank([9.0] * 8, [9.0] * 8, static_b, eplb_b, moves1),  # only rank 0's times count (the max already)
    ]
    m = E.eplb_metrics(spec, per_rank)
    assert m["balancedness"]["median"] == pytest.approx(0.6 + (0.7 - 0.6) / 2)  # median of eplb_b (a planted
    # "median over steps after the first move only" reads 0.93)
    assert m["balancedness_static"]["median"] == pytest.approx(0.5)
    assert m["eplb_speedup"]["samples"] == [2.0] * 7 + [0.5]
    assert m["rebalance_bytes"]["samples"] == [150, 25]  # summed over ranks, one per move
    assert m["rebalance_time_s"]["samples"] == [0.01, 0.03]
    assert m["eplb_recovery_steps"]["median"] == 2  # the change at 3 is back at 5; the one at 6 is not judged
    assert [c["pass"] for c in E.eplb_checks(per_rank)] == [True]
    per_rank[1]["eplb"]["eplb"]["moves"][1]["exact"] = False
    (check,) = E.eplb_checks(per_rank)
    assert not check["pass"] and "3 of 4" in check["detail"]


def test_a_change_never_recovered_counts_its_steps_and_no_judged_change_reports_nothing(tmp_path):
    spec = _spec(tmp_path, drift_every=4, steps=10)
    per_rank = [_rank([1.0] * 10, [1.0] * 10, [0.5] * 10, [0.95] * 4 + [0.5] * 6, [])]
    m = E.eplb_metrics(spec, per_rank)
    assert m["eplb_recovery_steps"]["median"] == 4  # the change at 4 never came back before the one at 8
    assert "rebalance_bytes" not in m and E.eplb_checks(per_rank) == []  # no move: nothing to report or check
    short = _rank([1.0] * 6, [1.0] * 6, [0.5] * 6, [0.95] * 4 + [0.5] * 2, [])
    assert "eplb_recovery_steps" not in E.eplb_metrics(_spec(tmp_path, drift_every=4, steps=6), [short])


def test_speedup_is_step_by_step_on_the_same_steps_and_one_ratio_of_totals_in_serve():
    assert E._speedups([1.0, 2.0, 3.0], [2.0, 2.0], same_steps=False) == [1.5]
    assert E._speedups([1.0, 3.0], [2.0, 1.0], same_steps=True) == [0.5, 3.0]
    assert E._speedups([1.0, 3.0], [2.0, 1.0], same_steps=False) == [4.0 / 3.0]  # serve's windows: other steps


# -------------------------------------------------------------------------------------------
# 3. Drift


def test_drift_epoch_zero_is_the_skew_and_a_drifted_router_routes_through_the_permutation():
    gen = torch.Generator().manual_seed(0)
    router, bias = torch.randn(8, 16, generator=gen), torch.randn(8, generator=gen)
    w = MoEWeights(router, torch.zeros(8, 16, 4), torch.zeros(8, 4, 16), bias)
    assert torch.equal(E.drifted([w], 7, 0)[0].router_ED, router)
    (d,) = E.drifted([w], 7, 3)
    perm = E.drift_permutation(8, 7, 3, 0)
    assert not torch.equal(perm, torch.arange(8))
    x = torch.randn(64, 16, generator=gen)
    _, _, old = route(x @ router.T + bias, 2, False)
    _, _, new = route(x @ d.router_ED.T + d.router_bias_E, 2, False)
    assert torch.equal(perm[new], old)  # expert e now gets what expert π(e) got
    assert not torch.equal(E.drift_permutation(8, 7, 3, 0), E.drift_permutation(8, 7, 4, 0))  # epochs differ


def test_drift_moves_the_choice_bias_with_its_router_row():
    gen = torch.Generator().manual_seed(1)
    w = MoEWeights(torch.randn(8, 16, generator=gen), torch.zeros(8, 16, 4), torch.zeros(8, 4, 16),
                   torch.randn(8, generator=gen), torch.randn(8, generator=gen))  # fmt: skip
    (d,) = E.drifted([w], 7, 2)
    perm = E.drift_permutation(8, 7, 2, 0)
    assert torch.equal(d.score_bias_E, w.score_bias_E[perm]) and torch.equal(d.router_bias_E, w.router_bias_E[perm])
    assert d.w_in_EDH is w.w_in_EDH  # the experts stay where they are: only popularity moves


# -------------------------------------------------------------------------------------------
# 4. Real launches


def write_doc(tmp_path, doc):
    from test_scenario import write

    return write(tmp_path, doc)


def _run(tmp_path, doc) -> dict:
    from test_scenario import write

    (spec,) = load(write(tmp_path, doc)).runs
    run = runner.run_one(spec, None)
    assert run["status"] == "ok", run["error"]
    return run


def test_a_w2_throughput_run_re_places_exactly_and_balances_better_than_static(tmp_path):
    run = _run(tmp_path, EPLB_RUN)
    m, checks, d = run["metrics"], {c["name"]: c for c in run["checks"]}, run["details"]["eplb"]
    assert checks["rebalance_exact"]["pass"], checks["rebalance_exact"]["detail"]
    # deterministic loads and placements: 0.945 against 0.905 here; the passes are equal until the first move
    assert m["balancedness"]["median"] > m["balancedness_static"]["median"] + 0.03
    assert len(d["balancedness"]) == len(d["balancedness_static"]) == 12
    assert [mv["after_step"] for mv in d["moves"]] == [2, 5, 8]  # after every 3rd step, never after the last
    assert m["rebalance_bytes"]["n"] == 3 and max(m["rebalance_bytes"]["samples"]) > 0
    expert_bytes = 2 * 32 * 64 * 4  # w_in and w_down of one fp32 expert
    assert all(b % expert_bytes == 0 for b in m["rebalance_bytes"]["samples"])  # whole experts move
    assert d["balancedness_static"][:3] == d["balancedness"][:3]  # the same placement until the first move


def test_a_w2_run_with_sequence_routing_re_places_and_probes_whole_sequences(tmp_path):
    doc = doc_with(EPLB_RUN, routing={"granularity": "sequence"}, workload={"seq_len": 32, "steps": 7})
    run = _run(tmp_path, doc)
    (check,) = [c for c in run["checks"] if c["name"] == "rebalance_exact"]
    assert check["pass"] and "across 2 moves" in check["detail"]  # the probe took 32 rows: one whole sequence
    assert E.probe_rows(load(write_doc(tmp_path, doc)).runs[0], 32) == 32


@pytest.mark.slow  # the unit suite keeps the W2 throughput and sequence-routing runs
def test_a_w2_train_run_with_spare_slots_converges_like_one_device(tmp_path):
    doc = doc_with(
        TRAIN,
        model={"num_experts": 4},
        parallel={"world_size": 2, "redundant_experts": 2},
        train={"steps": 8},
        eplb={"window": 2, "interval": 3},
    )
    run = _run(tmp_path, doc)
    checks = {c["name"]: c for c in run["checks"]}
    for name in ("converges_like_baseline", "memory_model", "rebalance_exact"):
        assert checks[name]["pass"], checks[name]["detail"]
    moves = run["details"]["eplb"]["moves"]
    assert [m["after_step"] for m in moves] == [2, 5]  # before steps 3 and 6; never after the last (7)
    assert run["metrics"]["eplb_speedup"]["n"] == 8 and math.isfinite(run["metrics"]["eplb_speedup"]["median"])


@pytest.mark.slow
def test_a_w2_serve_run_with_drift_re_places_and_serves_every_request(tmp_path):
    doc = doc_with(
        SERVE,
        model={"num_experts": 8, "top_k": 2},
        parallel={"world_size": 2, "redundant_experts": 2},
        workload={"skew": "zipf", "skew_param": 1.2, "drift_every": 6},
        serve={"requests": 8, "input_len": 16, "output_len": 12, "max_running": 4},
        eplb={"window": 2, "interval": 3},
    )
    run = _run(tmp_path, doc)
    checks = {c["name"]: c for c in run["checks"]}
    for name in ("every_request_served", "rebalance_exact"):
        assert checks[name]["pass"], checks[name]["detail"]
    d = run["details"]["eplb"]
    assert d["moves"] and max(m["after_step"] for m in d["moves"]) < len(d["balancedness"]) - 1  # none after the last
    assert run["metrics"]["eplb_speedup"]["n"] == 1  # serve: one ratio of the windows' forward times
