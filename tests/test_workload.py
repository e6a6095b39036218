"""Workloads mean what they say: measured expert shares follow the named skew on every layer of a
stack, and recorded routing traces replay exactly."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import numpy as np
import pytest
import torch

from moebench.scenario import ScenarioError, load
from moebench.tools.skew_check import shares
from moebench.workload import skew as S
from moebench.workload import trace as T
from moebench.workload.tokens import layer_targets, layer_weights, router_offsets, tokens
from runtime import MoEConfig, ParallelConfig
from runtime.stack import MoEStack

MEASURED_COPIES = 65_536  # ≥ 64k copies per layer, as the bounds assume


def measured_shares(moe: MoEConfig, layers: int, skew: str, param: float | None, seed: int = 0) -> np.ndarray:
    """Per layer, the share of copies each expert gets on fresh tokens (not the calibration's)."""
    return shares(moe, layers, skew, param, MEASURED_COPIES, seed)


def zipf_slope(shares: np.ndarray) -> float:
    """The least-squares slope of log share against log popularity rank."""
    ranked = np.sort(shares)[::-1]
    return float(np.polyfit(np.log(np.arange(1, len(ranked) + 1)), np.log(ranked), 1)[0])


# The cases: 8 experts at hidden 32 gave max/mean 1.40 under "uniform" before calibration.
SHAPES = [
    pytest.param(MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=1), id="E8-D32-top1"),
    pytest.param(
        MoEConfig(hidden_size=64, ffn_hidden_size=64, num_experts=16, top_k=2, activation="swiglu"), id="E16-D64-top2"
    ),
]


@pytest.mark.parametrize("moe", SHAPES)
def test_uniform_loads_every_expert_within_multinomial_noise_on_every_layer(moe):
    shares = measured_shares(moe, 3, "uniform", None)
    bound = 1 + 4 * np.sqrt(moe.num_experts / MEASURED_COPIES)
    imbalance = shares.max(axis=1) * moe.num_experts  # max / mean per layer
    assert (imbalance <= bound).all(), (imbalance, bound)


def test_uniform_before_calibration_was_not_uniform():
    """The router's random weights alone load 8 experts unevenly at hidden 32: what calibration fixes."""
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=1)
    weights = layer_weights(moe, 1, 0, "uniform", None)
    router_ED = weights[0].router_ED
    x_TD = tokens(MEASURED_COPIES, 32, 0, stream=777)
    raw = np.bincount((x_TD @ router_ED.T).argmax(1).numpy(), minlength=8) / MEASURED_COPIES
    assert raw.max() * 8 > 1.1  # so the test above is not passing by luck of the seed


@pytest.mark.parametrize("s", [0.5, 1.0, 1.5])
def test_zipf_shares_fall_with_popularity_rank_at_the_named_exponent_on_every_layer(s):
    moe = MoEConfig(hidden_size=64, ffn_hidden_size=64, num_experts=16, top_k=1)
    slopes = [zipf_slope(layer) for layer in measured_shares(moe, 2, "zipf", s)]
    assert all(abs(slope + s) <= 0.1 for slope in slopes), slopes


@pytest.mark.parametrize(
    ("experts", "top_k", "s"),
    [(64, 1, 1.5), (16, 2, 1.5), (32, 4, 0.8)],  # many experts, and top-k near the 1/K bound
)
def test_zipf_holds_for_many_experts_and_top_k_near_its_bound(experts, top_k, s):
    moe = MoEConfig(hidden_size=64, ffn_hidden_size=32, num_experts=experts, top_k=top_k)
    slopes = [zipf_slope(layer) for layer in measured_shares(moe, 2, "zipf", s)]
    assert all(abs(slope + s) <= 0.1 for slope in slopes), slopes


def test_hot_expert_takes_h_times_each_other_experts_share_on_every_layer():
    moe, h = SHAPES[1].values[0], 4.0
    shares = measured_shares(moe, 2, "hot", h)
    targets = np.array(layer_targets(moe, 2, 0, "hot", h))
    hot = targets.argmax(axis=1)
    want = h / (h + moe.num_experts - 1)
    assert np.allclose(targets[np.arange(2), hot], want)
    got = shares[np.arange(2), hot]
    assert (np.abs(got / want - 1) <= 0.05).all(), (got, want)


def test_single_sends_every_first_choice_to_one_expert_and_spreads_the_rest():
    moe = MoEConfig(hidden_size=32, ffn_hidden_size=64, num_experts=8, top_k=2)
    shares = measured_shares(moe, 2, "single", None)
    hot = np.array(layer_targets(moe, 2, 0, "single", None)).argmax(axis=1)
    assert np.allclose(shares[np.arange(2), hot], 0.5)  # one copy of every token
    rest = [np.delete(layer, e) for layer, e in zip(shares, hot, strict=True)]
    assert all(r.max() / r.mean() < 1 + 4 * np.sqrt(7 / (MEASURED_COPIES / 2)) for r in rest), rest


def test_calibration_is_deterministic_for_a_seed_and_differs_between_seeds(tmp_path, monkeypatch):
    moe = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=1)
    first = [w.router_bias_E.clone() for w in layer_weights(moe, 2, 5, "zipf", 1.0)]
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path))  # nothing cached there: computed again
    router_offsets.cache_clear()
    again = [w.router_bias_E for w in layer_weights(moe, 2, 5, "zipf", 1.0)]
    other = [w.router_bias_E for w in layer_weights(moe, 2, 6, "zipf", 1.0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    assert len(list(tmp_path.glob("skew-*.pt"))) == 2  # one file per calibration


def test_a_cached_calibration_is_read_back_and_a_corrupt_one_recomputed(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path))
    moe = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=1)
    router_offsets.cache_clear()
    computed = layer_weights(moe, 1, 9, "hot", 2.0)[0].router_bias_E
    (cached,) = tmp_path.glob("skew-*.pt")
    torch.save([torch.full((4,), 7.0)], cached)  # what the cache holds is what is used
    router_offsets.cache_clear()
    assert layer_weights(moe, 1, 9, "hot", 2.0)[0].router_bias_E.tolist() == [7.0] * 4
    cached.write_bytes(b"garbage")
    router_offsets.cache_clear()
    assert torch.equal(layer_weights(moe, 1, 9, "hot", 2.0)[0].router_bias_E, computed)


def test_every_field_the_fit_depends_on_keys_its_own_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEBENCH_CACHE", str(tmp_path))
    router_offsets.cache_clear()
    base = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=1)
    variants = [
        (base, 1, 0, "zipf", 1.0),
        (dataclasses.replace(base, top_k=2), 1, 0, "zipf", 1.0),
        (dataclasses.replace(base, hidden_size=8), 1, 0, "zipf", 1.0),
        (dataclasses.replace(base, capacity_factor=1.0), 2, 0, "zipf", 1.0),
        (dataclasses.replace(base, normalize_topk=True), 2, 0, "zipf", 1.0),
        (base, 2, 0, "zipf", 1.0),
        (base, 1, 1, "zipf", 1.0),
        (base, 1, 0, "zipf", 0.5),
        (base, 1, 0, "hot", 1.0),
    ]
    for args in variants:
        router_offsets(*args)
    assert len(list(tmp_path.glob("skew-*.pt"))) == len(variants)
    layer_weights(dataclasses.replace(base, dtype="bfloat16", aux_loss_coef=0.5), 1, 0, "zipf", 1.0)
    assert len(list(tmp_path.glob("skew-*.pt"))) == len(variants)  # neither changes the routing


def test_target_shares_follow_their_formulas():
    order = torch.tensor([2, 0, 1, 3])  # expert 2 is the most popular
    zipf = S.target_shares("zipf", 2.0, 4, 1, order)
    by_rank = 1 / np.arange(1, 5) ** 2
    assert np.allclose(zipf[[2, 0, 1, 3]], by_rank / by_rank.sum())
    assert np.allclose(S.target_shares("uniform", None, 4, 1, order), 0.25)
    assert np.allclose(S.target_shares("hot", 3.0, 4, 1, order), [1 / 6, 1 / 6, 3 / 6, 1 / 6])
    assert np.allclose(S.target_shares("single", None, 4, 2, order), [1 / 6, 1 / 6, 1 / 2, 1 / 6])


@pytest.mark.parametrize(
    ("skew", "param", "top_k", "message"),
    [
        ("pareto", None, 1, 'skew = "pareto" is invalid: accepted one of uniform, zipf, hot, single'),
        ("zipf", 1e300, 1, r'skew_param = 1e\+300 is invalid for skew = "zipf": accepted a number from 0 to 4'),
        ("hot", -1.0, 1, 'skew_param = -1.0 is invalid for skew = "hot": accepted a number from 0 to 10000'),
        (
            "hot",
            20.0,
            2,
            r"asks one expert for 0.571 of the copies.*accepted skew_param <= 15 for 16 experts and top_k = 2",
        ),
        ("zipf", 2.0, 2, r"asks one expert for 0.6.*accepted skew_param <= 1.5\d for 16 experts"),
        (
            "zipf",
            3.5,
            1,
            r"rarest expert for 5.4e-05 of the copies, below the 0.00019 .*accepted skew_param <= 3.02 for 16",
        ),
    ],
)
def test_a_skew_that_no_routing_can_produce_is_refused(skew, param, top_k, message):
    with pytest.raises(ValueError, match=message):
        S.target_shares(skew, param, 16, top_k, torch.arange(16))


def test_the_largest_accepted_zipf_exponent_puts_exactly_one_kth_on_the_top_expert():
    bound = S._largest_param("zipf", 16, 2)
    top = S.target_shares("zipf", bound, 16, 2, torch.arange(16))[0]
    assert top == pytest.approx(0.5, abs=1e-6)


def test_fit_offsets_matches_the_target_on_its_sample():
    gen = torch.Generator().manual_seed(0)
    logits_ME = S.gaussian_logits(
        torch.zeros(6, dtype=torch.float64), torch.eye(6, dtype=torch.float64) * 2, 50_000, gen
    )
    target = np.array([0.3, 0.2, 0.2, 0.1, 0.1, 0.1])
    bias_E, err = S.fit_offsets(logits_ME, target, 1)
    assert err < 0.01
    assert np.allclose(S.routed_shares(logits_ME + bias_E, 1).numpy(), target, rtol=0.01)


def test_gaussian_logits_have_the_requested_moments():
    gen = torch.Generator().manual_seed(0)
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    draws = S.gaussian_logits(torch.tensor([1.0, -1.0], dtype=torch.float64), cov, 200_000, gen).double()
    assert torch.allclose(draws.mean(0), torch.tensor([1.0, -1.0], dtype=torch.float64), atol=0.01)
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.02)


# -------------------------------------------------------------------------------------------
# Routing traces


def _trace_file(tmp_path, ids, num_experts=4, name="t.npz"):
    path = tmp_path / name
    T.save(path, np.asarray(ids), num_experts, {"made": "by hand"})
    return path


def test_a_saved_trace_reads_back_with_its_ids_and_experts(tmp_path):
    ids = np.random.default_rng(0).integers(0, 4, size=(2, 10, 1))
    found = T.load(_trace_file(tmp_path, ids))
    assert np.array_equal(found.ids_LNK, ids) and found.num_experts == 4
    assert (found.layers, found.tokens, found.top_k) == (2, 10, 1)


def test_a_json_trace_reads_like_an_npz_one(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": T.FORMAT, "num_experts": 3, "ids": [[[0, 1], [2, 0]]]}))
    assert T.load(path).ids_LNK.tolist() == [[[0, 1], [2, 0]]]


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        ([[[0], [1]]], {"num_experts": 8}, "num_experts = 4 is invalid: accepted 8"),
        ([[[0], [1]]], {"top_k": 2}, "1 choices per token is invalid: accepted 2"),
        ([[[0], [1]]], {"layers": 3}, "1 layers is invalid: accepted 3"),
        ([[[0], [7]]], {}, "expert id 7 is out of range: accepted ids from 0 to 3"),
        ([[[0], [-1]]], {}, "expert id -1 is out of range"),
        ([[[0], [1]]], {"tokens_needed": 3}, "2 tokens is too few: accepted at least 3"),
    ],
)
def test_a_trace_the_run_cannot_replay_is_refused_naming_the_file(tmp_path, ids, kwargs, message):
    path = _trace_file(tmp_path, ids)
    want = {"num_experts": 4, "top_k": 1, "layers": 1, "tokens_needed": 2} | kwargs
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        T.check(T.load(path), **want)


def test_a_token_choosing_one_expert_twice_is_refused(tmp_path):
    path = _trace_file(tmp_path, [[[0, 1], [2, 2]]])
    with pytest.raises(ValueError, match="layer 0, token 1 chooses one expert twice"):
        T.check(T.load(path), num_experts=4, top_k=2, layers=1, tokens_needed=1)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe not a zip", "not a readable routing trace"),
        (None, "format = 'other/1' is invalid"),
    ],
)
def test_an_unreadable_or_foreign_file_is_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, format="other/1", num_experts=4, ids=np.zeros((1, 1, 1), dtype=np.int64))
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{path}: {message}"):
        T.load(path)


def _hostile_trace(path, case):
    """Write one malformed trace of the class ``case`` at ``path`` (suffix chosen by the caller)."""
    ids = np.zeros((1, 2, 1), dtype=np.int64)
    if case == "npy":
        with path.open("wb") as f:
            np.save(f, ids)
    elif case == "member_not_array":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("format.npy", "moebench.routing/1")
            z.writestr("ids.npy", "not an array")
    elif case == "object_member":
        np.savez(path, format=T.FORMAT, num_experts=4, ids=np.array([[[1, "a"]]], dtype=object))
    elif case == "deep_json":
        path.write_text(
            '{"format": "moebench.routing/1", "num_experts": 2, "ids": ' + "[" * 100_000 + "]" * 100_000 + "}"
        )
    elif case == "plain_text":
        path.write_text("expert ids: 0 1 2\n")
    elif case == "ids_missing":
        np.savez(path, format=T.FORMAT, num_experts=4)
    elif case == "ids_a_string":
        path.write_text(json.dumps({"format": T.FORMAT, "num_experts": 4, "ids": "0 1 2"}))
    elif case == "uint64_max":
        np.savez(path, format=T.FORMAT, num_experts=4, ids=np.full((1, 2, 1), 2**64 - 1, dtype=np.uint64))
    elif case == "huge_id":
        path.write_text(json.dumps({"format": T.FORMAT, "num_experts": 4, "ids": [[[int("9" * 400)]]]}))


@pytest.mark.parametrize(
    ("case", "suffix", "message"),
    [
        ("npy", ".npz", "not a readable routing trace .*a single .npy array, not an .npz archive"),
        ("member_not_array", ".npz", "not a readable routing trace .*member 'format' is not a numpy array"),
        ("object_member", ".npz", "not a readable routing trace .*member 'ids' is not a numpy array"),
        ("deep_json", ".json", "not a readable routing trace .*nested too deeply"),
        ("plain_text", ".npz", "not a readable routing trace .*neither an .npz archive .* nor a .json file"),
        ("plain_text", ".txt", "not a readable routing trace .*neither an .npz archive .* nor a .json file"),
        ("ids_missing", ".npz", "ids is missing: accepted integer expert ids"),
        ("ids_a_string", ".json", "ids = 0 1 2 is a single value: accepted integer expert ids"),
        ("uint64_max", ".npz", "expert id 18446744073709551615 is out of range: accepted ids from 0 to 3"),
        ("huge_id", ".json", "ids of values that are not 64-bit integers is invalid"),
    ],
)
def test_a_malformed_trace_of_any_class_is_one_value_error_naming_the_file_and_what_it_is(
    tmp_path, case, suffix, message
):
    path = tmp_path / f"bad{suffix}"
    _hostile_trace(path, case)
    with pytest.raises(ValueError, match=f"{path}: {message}") as caught:
        T.load(path)
    text = str(caught.value)
    assert "\n" not in text and "pickle" not in text and len(text) < 300


def test_a_400_digit_num_experts_is_cut_short_in_the_message(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"format": "moebench.routing/1", "num_experts": ' + "9" * 400 + ', "ids": [[[0]]]}')
    with pytest.raises(ValueError, match=r"num_experts = 9{60}… \(400 characters\) is invalid: accepted 4") as caught:
        T.check(T.load(path), num_experts=4, top_k=1, layers=1, tokens_needed=1)
    assert "9" * 61 not in str(caught.value)


def test_batches_take_consecutive_rank_slices_and_cycle_through_the_trace():
    trace = T.RoutingTrace(np.arange(10).reshape(1, 10, 1), 10, "mem")
    assert T.batch_rows(trace, 0, 1, 2, 3)[0, :, 0].tolist() == [3, 4, 5]  # batch 0, rank 1
    assert T.batch_rows(trace, 1, 0, 2, 3)[0, :, 0].tolist() == [6, 7, 8]  # batch 1, rank 0
    assert T.batch_rows(trace, 1, 1, 2, 3)[0, :, 0].tolist() == [9, 0, 1]  # wraps around


def test_replay_routes_every_token_to_its_recorded_experts_with_softmax_weights():
    moe = MoEConfig(hidden_size=16, ffn_hidden_size=16, num_experts=4, top_k=2, normalize_topk=True)
    weights = layer_weights(moe, 2, 0, "trace", None)
    x_TD = tokens(8, 16, 0, stream=1)
    ids_LTK = np.stack([np.tile([[3, 1]], (8, 1)), np.tile([[0, 2]], (8, 1))])
    with pytest.raises(TypeError, match="wrap_router=ReplayRouter"):  # a plain stack has nothing to replay with
        T.replay(MoEStack(moe, ParallelConfig(), weights, None, "cpu"), ids_LTK)
    stack = MoEStack(moe, ParallelConfig(), weights, None, "cpu", wrap_router=T.ReplayRouter)
    T.replay(stack, ids_LTK)
    assert np.array_equal(T.stack_routes(stack, x_TD), ids_LTK)
    routed = stack.layers[0].router(x_TD)
    want = routed.probs_TE[:, [3, 1]] / routed.probs_TE[:, [3, 1]].sum(1, keepdim=True)
    assert torch.allclose(routed.weights_TK, want)
    _, results = stack(x_TD)
    assert results[0].counts_WE.tolist() == [[0, 8, 0, 8]] and results[1].counts_WE.tolist() == [[8, 0, 8, 0]]


def test_assemble_orders_tokens_batch_by_batch_then_rank_by_rank():
    rank0 = [np.full((1, 2, 1), 0), np.full((1, 2, 1), 2)]  # batches 0 and 1
    rank1 = [np.full((1, 2, 1), 1), np.full((1, 2, 1), 3)]
    assert T.assemble([rank0, rank1])[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


# -------------------------------------------------------------------------------------------
# Scenario files

SCENARIO = """
[scenario]
name = "lb"
kind = "{kind}"
[model]
hidden = 16
ffn_hidden = 16
num_experts = 4
top_k = 1
[parallel]
world_size = 2
[workload]
tokens_per_rank = 4
{workload}
"""


def _scenario(tmp_path, workload, kind="load_balance"):
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO.format(kind=kind, workload=workload))
    return path


def test_a_trace_path_is_relative_to_the_scenario_file(tmp_path):
    _trace_file(tmp_path, np.zeros((1, 8, 1), dtype=np.int64))
    (run,) = load(_scenario(tmp_path, 'skew = "trace"\ntrace = "t.npz"')).runs
    assert run.workload["trace"] == "t.npz"


def test_a_swept_skew_may_name_the_trace_its_trace_runs_replay(tmp_path):
    _trace_file(tmp_path, np.zeros((1, 8, 1), dtype=np.int64))
    runs = load(_scenario(tmp_path, 'skew = ["zipf", "trace"]\ntrace = "t.npz"')).runs
    assert [r.workload["skew"] for r in runs] == ["zipf", "trace"]


@pytest.mark.parametrize(
    ("workload", "kind", "message"),
    [
        ('skew = "trace"', "load_balance", r'\[workload\] trace is missing: accepted trace = "path/to/routes.npz"'),
        ('trace = "t.npz"', "load_balance", r'trace = "t.npz" is invalid with skew = "uniform": accepted a trace'),
        ('skew = "trace"\ntrace = "t.npz"', "equivalence", r'skew = "trace" is invalid for kind = "equivalence"'),
        ('skew = "trace"\ntrace = "none.npz"', "load_balance", r"none.npz: not a readable routing trace"),
        ('skew = "trace"\ntrace = "t.npz"', "throughput", r"t.npz: 4 tokens is too few: accepted at least 8"),
        ('skew = "hot"\nskew_param = 1e300', "load_balance", r"\[workload\] skew_param = 1e\+300 is invalid"),
    ],
)
def test_a_workload_that_cannot_run_is_refused_at_load(tmp_path, workload, kind, message):
    _trace_file(tmp_path, np.zeros((1, 4, 1), dtype=np.int64))
    with pytest.raises(ScenarioError, match=message):
        load(_scenario(tmp_path, workload, kind))


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_recorded_load_balance_run_replays_to_the_same_expert_loads(tmp_path):
    from moebench.cli import main

    workload = 'skew = "zipf"'
    text = SCENARIO.format(kind="load_balance", workload=workload).replace('name = "lb"', 'name = "rec"\nrepeats = 3')
    path = tmp_path / "rec.toml"
    path.write_text(text.replace("tokens_per_rank = 4", "tokens_per_rank = 64").replace("top_k = 1", "top_k = 2"))
    out, routes = tmp_path / "out", tmp_path / "routes"
    assert main(["run", str(path), "--out", str(out), "--record-routing", str(routes), "--no-telemetry"]) in (0, 1)
    recorded = T.load(routes / "rec.npz")
    assert recorded.ids_LNK.shape == (1, 3 * 2 * 64, 2)  # 3 batches x 2 ranks x 64 tokens
    replay = tmp_path / "replay.toml"
    replay.write_text(
        path.read_text()
        .replace('name = "rec"', 'name = "replay"')
        .replace('skew = "zipf"', f'skew = "trace"\ntrace = "{routes / "rec.npz"}"')
    )
    rerecorded = tmp_path / "rerecorded"
    assert main(["run", str(replay), "--out", str(out), "--record-routing", str(rerecorded), "--no-telemetry"]) in (
        0,
        1,
    )
    first, second = (json.loads((out / f"{n}.json").read_text())["runs"][0] for n in ("rec", "replay"))
    assert first["status"] == second["status"] == "ok"
    assert first["details"]["layers"] == second["details"]["layers"]  # every expert and rank load, per layer
    assert first["routing_trace"] == {"path": str(routes / "rec.npz")}
    # every token of every batch on every rank chose what was recorded
    assert np.array_equal(T.load(rerecorded / "replay.npz").ids_LNK, recorded.ids_LNK)


def test_a_stream_with_a_trace_replays_batch_s_at_step_s_and_wraps(tmp_path):
    from moebench.launch.spawn import RankContext
    from moebench.measure import common

    # 1 layer, top-1, 4 tokens per step: batch b routes every token to expert b (mod 4), 3 batches
    ids = np.repeat(np.arange(3), 4).reshape(1, 12, 1)
    _trace_file(tmp_path, ids)
    text = SCENARIO.format(kind="throughput", workload='skew = "trace"\ntrace = "t.npz"\nsteps = 3\ncorrelation = 0.5')
    path = tmp_path / "s.toml"
    path.write_text(text.replace("world_size = 2", "world_size = 1"))
    (spec,) = load(path).runs
    ctx = RankContext(0, 1, None, torch.device("cpu"), "gloo")
    stack, _, x_TD = common.setup(ctx, spec)
    stream = common.stream_inputs(ctx, spec, x_TD)
    routes = common.stream_routes(ctx, spec)
    assert len(stream) == len(routes) == 3 and torch.equal(stream[0], x_TD)
    for k in range(5):  # steps 0, 1, 2, then 0, 1 again
        _, (result,) = common.stream_step(stack, stream, routes, k)
        assert result.counts_WE.tolist() == [[4 if e == k % 3 else 0 for e in range(4)]], k
