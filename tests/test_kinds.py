"""The kinds' own logic, each test on a case a plausible planted bug would change: the worst layer
of a load_balance run, the dispatch round trip with dropped copies, the pinned equivalence
tolerances, a run whose every copy is dropped, an unmeasured gate, and the progress estimates."""

from __future__ import annotations

import math
import time

import pytest
import torch
from test_results import RAW, spec

from moebench import kinds, runner
from moebench.kinds import dispatch, equivalence
from moebench.launch.spawn import RankContext
from moebench.measure import common, timing
from moebench.report.results import read, verdict
from moebench.scenario import load
from moebench.workload.tokens import tokens
from runtime.router import expert_capacity

CTX = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")
W1_RAW = RAW | {
    "a2a": None,
    "counts_WE": [[[60, 20, 10, 10]]],
    "kept_WE": [[[50, 20, 10, 10]]],
    "expert_to_rank": [0] * 4,
}


def test_load_balance_reports_the_worst_layer_not_the_best():
    even = [[10, 10, 10, 10], [10, 10, 10, 10]]  # layer 0: 80 copies, 20 per expert
    skewed = [[30, 5, 5, 0], [30, 5, 5, 0]]  # layer 1: expert 0 takes 60 of 80
    raw = {"batches": [{"counts_WE": [even, skewed], "kept_WE": [even, skewed], "expert_to_rank": [0, 1, 0, 1]}]}
    s = spec("load_balance", tokens_per_rank=40)
    s.model["layers"] = 2
    metrics, _, details = kinds.evaluate(s, [raw])
    assert metrics["imbalance_max_mean"]["median"] == 60 / 20  # layer 1's, not layer 0's 1.0
    assert metrics["rank_imbalance_max_mean"]["median"] == 70 / 40  # experts 0, 2 on rank 0: 70 of 80
    assert metrics["load_cv"]["median"] == pytest.approx(math.sqrt((40**2 + 2 * 10**2 + 20**2) / 4) / 20)
    assert [layer["imbalance_max_mean"] for layer in details["layers"]] == [1.0, 3.0]
    assert details["across_layers"]["imbalance_max_mean"]["worst"] == 3.0
    # rank loads (experts 0, 2 on rank 0): layer 0 (40, 40), layer 1 (70, 10)
    # balancedness = Σ mean / Σ max over layers = (40 + 40) / (40 + 70), not a per-layer average (0.79)
    assert metrics["balancedness"]["median"] == pytest.approx(80 / 110)
    assert metrics["balancedness"]["better"] == "higher"


def test_combine_inverts_dispatch_when_capacity_drops_copies(monkeypatch):
    s = spec("dispatch", world=1)
    s.model.update(top_k=2, num_experts=4)
    s.routing["capacity_factor"] = 0.5  # half the copies fit
    stack = common.build_stack(CTX, s)
    x_TD = tokens(64, 8, 0, 0)
    plan = stack.layers[0].plan(x_TD)
    assert int((~plan.keep_TK).sum()) > 0  # copies were dropped
    error = dispatch.round_trip_error(stack, x_TD)
    assert error <= equivalence.TOLERANCE["float32"]  # a check expecting every copy back would fail here
    _, (check,), _ = dispatch.evaluate(s, [W1_RAW | {"round_trip_error": error}])
    assert check["name"] == "combine_inverts_dispatch" and check["pass"] is True
    # A dispatcher that hands combine its rows one place off breaks the round trip.
    dispatcher = stack.layers[0].dispatcher
    original = dispatcher.dispatch
    monkeypatch.setattr(
        dispatcher, "dispatch", lambda *a, **kw: (lambda x_RD, meta: (x_RD.roll(1, 0), meta))(*original(*a, **kw))
    )
    assert dispatch.round_trip_error(stack, x_TD) > 0.1


def test_each_dtype_has_its_documented_tolerance():
    assert equivalence.TOLERANCE == {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}


def _equivalence_run(dtype: str = "float32", tokens_per_rank: int = 24, experts: int = 4, **routing) -> tuple:
    s = spec("equivalence", world=1, tokens_per_rank=tokens_per_rank)
    s.model.update(dtype=dtype, num_experts=experts)
    s.routing.update(routing)
    return s, [equivalence.run_rank(CTX, equivalence.case(s))]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_output_off_by_twice_the_tolerance_fails_the_check(dtype):
    s, (rank,) = _equivalence_run(dtype)
    tol = equivalence.TOLERANCE[dtype]
    _, checks, _ = kinds.evaluate(s, [rank | {"out": rank["out"] * (1 + 2 * tol)}])
    assert checks[0]["name"] == "rel_error_within_tolerance" and checks[0]["pass"] is False


def test_an_output_off_by_half_the_fp32_tolerance_passes_the_check():
    s, (rank,) = _equivalence_run()
    _, checks, _ = kinds.evaluate(s, [rank | {"out": rank["out"] * (1 + 0.5e-5)}])
    assert checks[0]["pass"] is True


def test_equivalence_compares_fine_when_every_copy_is_dropped():
    assert expert_capacity(5e-324, 2, 1, 8) == 0  # 5e-324 · 2 tokens · top-1 / 8 experts underflows to 0
    s, per_rank = _equivalence_run(tokens_per_rank=2, experts=8, capacity_factor=5e-324)
    metrics, checks, _ = kinds.evaluate(s, per_rank)
    assert metrics["tokens_dropped"]["median"] == 2
    assert [c["pass"] for c in checks] == [True, True]
    assert not per_rank[0]["grads"]["w_in"].any()  # zero gradients, not None
    assert not equivalence.run_reference(equivalence.case(s)).grads["w_down"].any()


def test_a_run_whose_only_gate_was_not_measured_is_ok_and_exits_0(tmp_path, monkeypatch):
    path = tmp_path / "busbw.toml"
    path.write_text(
        '[scenario]\nname = "busbw"\nkind = "throughput"\n[model]\nhidden = 8\nffn_hidden = 8\nnum_experts = 4\n'
        "[workload]\ntokens_per_rank = 100\n[slo]\nmin_a2a_busbw_gbps = 1.0\n"
    )
    sc = load(path)
    monkeypatch.setattr(runner, "launch", lambda *args, **kw: [W1_RAW | {"telemetry": {"available": False}}])
    assert runner.run_scenarios([sc], tmp_path / "out", None) == 0  # a busbw gate at world size 1
    (run,) = read(tmp_path / "out" / "busbw.json")["runs"]
    assert run["slo"][0]["pass"] is None and run["slo"][0]["detail"] == "not measured in this run"
    assert verdict(run) == "ok"


def test_progress_estimates_the_timed_rounds_from_the_warm_ups_steady_round(monkeypatch):
    """The first warm-up round's one-off costs (5 s here) stay out of the estimate."""
    clock = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    costs = iter([5.0, 1.0, 1.0, 2.0, 1.0] + [1.0] * 10)

    def fn():
        clock[0] += next(costs)

    seen = []
    timing.time_fn(fn, warmup=5, repeats=10, device=torch.device("cpu"), on_warm=seen.append)
    assert seen == [1.0]  # median of rounds 2-5, not the mean of all five (2.0)


def test_progress_lines_say_how_long_the_timed_rounds_take(capsys):
    s = spec("throughput", world=1)
    s.scenario.update(warmup=3, repeats=40)
    common.progress_after_warmup(CTX, s, "the step")(0.5)
    assert capsys.readouterr().err == "    timing the step: 40 rounds, about 20 s\n"  # 40 × 0.5 s


def test_experts_over_loop_is_the_median_of_round_ratios_and_is_shown():
    s = spec("experts", world=1)
    raw = {"experts": [3.0, 1.0, 4.0], "loop_floor": [1.0, 2.0, 2.0], "finite": True}  # rounds 3, 0.5, 2
    metrics, _, _ = kinds.evaluate(s, [raw])
    assert metrics["experts_over_loop"]["median"] == 2.0  # the ratio of medians would be 1.5, loop/experts 0.5
    assert metrics["experts_over_loop"]["unit"] == "ratio" and metrics["experts_over_loop"]["better"] == "lower"
    assert metrics["loop_floor_time_s"]["median"] == 2.0 and metrics["loop_floor_time_s"]["unit"] == "s"
    assert metrics["expert_time_s"]["samples"] == raw["experts"]
    assert set(metrics) == set(kinds.get("experts").metrics)
    shown = {column.partition(":")[0] for column, *_ in kinds.get("experts").columns}
    assert {"loop_floor_time_s", "experts_over_loop"} <= shown
    # The telemetry window runs the rows through the FFN and through its floor in every round.
    assert kinds.window_tokens(s) == 2 * s.workload["tokens_per_rank"] * s.scenario["repeats"]
