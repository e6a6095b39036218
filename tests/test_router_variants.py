"""The routers real models use (``runtime.router.gate`` and the fp64 reference's ``_choose``): hand-worked
ids and weights for each variant in both, Mixtral's order equal to renormalised softmax-then-top-k, the
plain router untouched, config errors, and planted variant bugs that the equivalence check catches."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import runtime.router
from moebench.kinds.equivalence import TOLERANCE, Case, assemble, compare, run_rank, run_reference
from moebench.launch.spawn import RankContext
from moebench.scenario import ScenarioError, load
from runtime import DecoderConfig, MoEConfig, MoEDecoder, decoder_weights, init_weights, rel_error
from runtime.reference import _choose, reference_decoder
from runtime.router import Router, gate, route
from tests.test_scenario import MINIMAL, write

MINIMAL_WORKLOAD = MINIMAL["workload"]
CTX = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _both(logits: list[float], cfg: MoEConfig, bias: list[float] | None = None):
    """(ids, weights, probs) from the runtime's ``gate`` (fp32) and from the reference (fp64)."""
    bias_E = None if bias is None else torch.tensor(bias)
    probs, weights, ids = gate(torch.tensor([logits]), cfg, bias_E)
    ref_probs, chosen, ref_gate = _choose(torch.tensor(logits, dtype=torch.float64), cfg, bias or [0.0] * len(logits))
    runtime_out = (ids[0].tolist(), weights[0].tolist(), probs[0].tolist())
    return runtime_out, (chosen, [float(g) for g in ref_gate], ref_probs.tolist())


def _cfg(e: int = 4, k: int = 2, **kw) -> MoEConfig:
    return MoEConfig(8, 8, e, top_k=k, **kw)


# sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(−ln 3) = 1/4
SIGMOID_LOGITS = [0.0, math.log(3), -math.log(3), -math.log(3)]


@pytest.mark.parametrize("side", [0, 1], ids=["runtime", "reference"])
def test_sigmoid_scores_pick_and_normalise_by_hand(side):
    raw = _both(SIGMOID_LOGITS, _cfg(scoring="sigmoid"))[side]
    normed = _both(SIGMOID_LOGITS, _cfg(scoring="sigmoid", normalize_topk=True))[side]
    assert raw[0] == [1, 0] and raw[1] == pytest.approx([0.75, 0.5], abs=1e-6)
    assert normed[0] == [1, 0] and normed[1] == pytest.approx([0.6, 0.4], abs=1e-6)
    assert raw[2] == pytest.approx([2 / 7, 3 / 7, 1 / 7, 1 / 7], abs=1e-6)  # the losses' row: scores over 1.75


@pytest.mark.parametrize("side", [0, 1], ids=["runtime", "reference"])
def test_topk_before_softmax_takes_softmax_of_the_chosen_logits_by_hand(side):
    ids, weights, _ = _both([1.0, 3.0, 2.0, 0.0], _cfg(topk_before_softmax=True))[side]
    e = math.e
    assert ids == [1, 2] and weights == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-6)


# two groups of 4 (sigmoid scores): group 0 = [.9, .1, .45, .45] (best two 1.35, max .9, sum 1.9),
# group 1 = [.7, .7, .05, .05] (best two 1.4, max .7, sum 1.5): only the top-2 sum keeps group 1
GROUP_SCORES = [0.9, 0.1, 0.45, 0.45, 0.7, 0.7, 0.05, 0.05]


@pytest.mark.parametrize("side", [0, 1], ids=["runtime", "reference"])
def test_group_limited_keeps_the_group_with_the_best_top2_sum_by_hand(side):
    logits = [_logit(p) for p in GROUP_SCORES]
    ids, weights, _ = _both(logits, _cfg(8, 2, scoring="sigmoid", group_limited=(2, 1)))[side]
    assert ids == [4, 5] and weights == pytest.approx([0.7, 0.7], abs=1e-6)  # tie: the lower id first
    free = _both(logits, _cfg(8, 2, scoring="sigmoid"))[side]
    assert free[0] == [0, 4]  # without groups the best expert overall (0) is taken


@pytest.mark.parametrize("side", [0, 1], ids=["runtime", "reference"])
def test_score_bias_moves_the_choice_not_the_weights_by_hand(side):
    # choice = [.5, .75, .55, .25]: expert 2 overtakes 0, its weight stays its unbiased .25
    ids, weights, probs = _both(SIGMOID_LOGITS, _cfg(scoring="sigmoid", score_bias=0.3), [0.0, 0.0, 0.3, 0.0])[side]
    assert ids == [1, 2] and weights == pytest.approx([0.75, 0.25], abs=1e-6)
    assert probs == pytest.approx([2 / 7, 3 / 7, 1 / 7, 1 / 7], abs=1e-6)  # the losses see no bias


@pytest.mark.parametrize("side", [0, 1], ids=["runtime", "reference"])
def test_routed_scaling_multiplies_the_normalised_weights_by_hand(side):
    ids, weights, _ = _both(SIGMOID_LOGITS, _cfg(scoring="sigmoid", normalize_topk=True, routed_scaling=2.5))[side]
    assert ids == [1, 0] and weights == pytest.approx([1.5, 1.0], abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_topk_before_softmax_equals_renormalised_softmax_then_topk(top_k):
    logits_TE = torch.randn(256, 8, generator=torch.Generator().manual_seed(top_k)) * 3
    probs, weights, ids = gate(logits_TE, _cfg(8, top_k, topk_before_softmax=True))
    want_probs, want_weights, want_ids = route(logits_TE, top_k, normalize=True)
    assert torch.equal(ids, want_ids) and torch.equal(probs, want_probs)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)


def test_ties_go_to_the_lower_group_and_expert_in_both():
    logits = [0.0] * 8  # every score ties
    for cfg in (_cfg(8, 3, scoring="sigmoid", group_limited=(4, 2)), _cfg(8, 3, topk_before_softmax=True)):
        (ids, _, _), (chosen, _, _) = _both(logits, cfg)
        assert ids == chosen == [0, 1, 2]


def test_plain_config_is_the_plain_router_bitwise():
    logits_TE = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    for normalize in (False, True):
        got_want = zip(
            gate(logits_TE, _cfg(8, 2, normalize_topk=normalize)), route(logits_TE, 2, normalize), strict=True
        )
        for got, want in got_want:
            assert torch.equal(got, want)
    router = Router(8, 8, 2, False, _cfg(8, 2))
    assert router.moe is None and set(router.state_dict()) == {"weight_ED", "bias_E"}
    assert "score_bias_E" in Router(8, 8, 2, False, _cfg(8, 2, score_bias=0.1)).state_dict()


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"scoring": "tanh"}, "scoring"),
        ({"topk_before_softmax": True, "scoring": "sigmoid"}, "topk_before_softmax"),
        ({"topk_before_softmax": True, "score_bias": 0.1}, "topk_before_softmax"),
        ({"group_limited": (3, 1)}, "group_limited"),  # 3 does not divide 8
        ({"group_limited": (8, 1)}, "group_limited"),  # groups of one expert
        ({"group_limited": (4, 5)}, "group_limited"),  # more groups kept than there are
        ({"group_limited": (4, 1), "top_k": 3}, "group_limited"),  # one group of 2 cannot hold 3 choices
        ({"score_bias": -0.1}, "score_bias"),
        ({"routed_scaling": 0.0}, "routed_scaling"),
    ],
)
def test_invalid_router_variants_are_refused_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^MoEConfig\.{field} = .* is invalid: accepted "):
        MoEConfig(8, 8, 8, **{"top_k": 2, **kw})


# -------------------------------------------------------------------------------------------
# Planted bugs: each variant's fast path wrong in one way, the equivalence check must see it

DEEPSEEK = MoEConfig(
    16, 32, 8, top_k=2, capacity_factor=1.25, aux_loss_coef=0.1, z_loss_coef=0.01, scoring="sigmoid",
    normalize_topk=True, group_limited=(4, 2), score_bias=0.1, routed_scaling=2.5,
)  # fmt: skip


def _errors(moe: MoEConfig) -> dict[str, float]:
    case = Case("planted", moe)
    return compare(assemble([run_rank(CTX, case)]), run_reference(case))


def test_unplanted_variant_run_is_within_tolerance():
    assert max(_errors(DEEPSEEK).values()) <= TOLERANCE["float32"]


def test_group_score_as_max_instead_of_top2_sum_is_caught(monkeypatch):
    def max_groups(choice_TE, n_groups, top_groups):
        t, e = choice_TE.shape
        best_TG = choice_TE.view(t, n_groups, e // n_groups).max(dim=-1).values
        kept_TM = torch.sort(best_TG, dim=-1, descending=True, stable=True).indices[:, :top_groups]
        kept_TG = torch.zeros_like(best_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
        return choice_TE.masked_fill(~kept_TG.repeat_interleave(e // n_groups, dim=1), float("-inf"))

    monkeypatch.setattr(runtime.router, "_best_groups", max_groups)
    assert _errors(dataclasses.replace(DEEPSEEK, group_limited=(2, 1)))["out"] > 1e-2


def test_score_bias_applied_to_the_weights_is_caught(monkeypatch):
    original = runtime.router.gate

    def biased_weights(logits_TE, moe, score_bias_E=None):
        probs_TE, weights_TK, ids_TK = original(logits_TE, moe, score_bias_E)
        return probs_TE, weights_TK + moe.routed_scaling * score_bias_E[ids_TK], ids_TK

    monkeypatch.setattr(runtime.router, "gate", biased_weights)
    assert _errors(dataclasses.replace(DEEPSEEK, normalize_topk=False))["out"] > 1e-2


def test_routed_scaling_forgotten_is_caught(monkeypatch):
    original = runtime.router.gate
    unscaled = lambda logits_TE, moe, bias=None: original(logits_TE, dataclasses.replace(moe, routed_scaling=1.0), bias)  # noqa: E731
    monkeypatch.setattr(runtime.router, "gate", unscaled)
    assert _errors(DEEPSEEK)["out"] > 1e-2


def test_sigmoid_losses_on_unnormalised_scores_are_caught(monkeypatch):
    original = runtime.router.gate

    def raw_scores(logits_TE, moe, bias=None):
        _, weights_TK, ids_TK = original(logits_TE, moe, bias)
        return torch.sigmoid(logits_TE.float()), weights_TK, ids_TK

    monkeypatch.setattr(runtime.router, "gate", raw_scores)
    errors = _errors(DEEPSEEK)
    assert errors["aux_loss"] > 1e-2 and errors["grad_router"] > 10 * TOLERANCE["float32"]


def test_shared_expert_gate_left_out_is_caught_by_the_reference_decoder():
    moe = MoEConfig(16, 12, 4, top_k=2, activation="swiglu")
    gated = DecoderConfig(moe, layers=2, attention_heads=4, kv_heads=2, shared_experts=1, shared_expert_gate=True)
    weights = decoder_weights(gated, seed=0)
    x = torch.randn(9, 16, generator=torch.Generator().manual_seed(1))
    ref = reference_decoder(gated, weights, x)
    with torch.no_grad():
        assert rel_error(MoEDecoder(gated, weights).full(x), ref) <= 1e-6
        ungated = dataclasses.replace(gated, shared_expert_gate=False)  # the same weights, the gate not applied
        assert rel_error(MoEDecoder(ungated, weights).full(x), ref) > 1e-2


# -------------------------------------------------------------------------------------------
# [routing] keys: mapped onto MoEConfig, bad values refused in one line naming file, key, value, accepted


def _scenario(tmp_path, routing: dict, **extra):
    doc = {**MINIMAL, "model": {**MINIMAL["model"], "num_experts": 8, "top_k": 2}, "routing": routing, **extra}
    return load(write(tmp_path, doc))


def test_routing_keys_map_onto_the_moe_config_and_group_limited_is_one_value(tmp_path):
    keys = {"scoring": "sigmoid", "group_limited": [4, 2], "score_bias": 0.1, "routed_scaling": 2.5}
    (run,) = _scenario(tmp_path, {**keys, "normalize_topk": True}).runs
    moe = run.moe_config()
    assert (moe.scoring, moe.group_limited, moe.score_bias, moe.routed_scaling) == ("sigmoid", (4, 2), 0.1, 2.5)
    assert {k: run.resolved()["routing"][k] for k in keys} == keys
    swept = _scenario(tmp_path, {"group_limited": [[4, 2], [2, 1]]}).runs
    assert [r.moe_config().group_limited for r in swept] == [(4, 2), (2, 1)]


def test_plain_routing_records_no_variant_keys(tmp_path):
    (run,) = _scenario(tmp_path, {}).runs
    assert run.moe_config().plain_routing
    assert not set(run.resolved()["routing"]) & {"scoring", "topk_before_softmax", "group_limited", "score_bias"}


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"scoring": "tanh"}, r'\[routing\] scoring = "tanh" is invalid: accepted one of "softmax", "sigmoid"'),
        ({"group_limited": [3, 1]}, r"\[routing\] group_limited = \(3, 1\) is invalid: accepted n_groups dividing"),
        ({"group_limited": [4, "2"]}, r"\[routing\] group_limited = \[4, \"2\"\] is invalid: accepted \[n_groups"),
        ({"routed_scaling": 0}, r"\[routing\] routed_scaling = 0 is invalid: accepted a finite number > 0"),
        ({"topk_before_softmax": True, "scoring": "sigmoid"}, r"\[routing\] topk_before_softmax = True is invalid"),
    ],
)
def test_bad_routing_variant_is_one_line_naming_key_value_and_accepted(tmp_path, routing, message):
    with pytest.raises(ScenarioError, match=message) as err:
        _scenario(tmp_path, routing)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path))


def test_router_variant_with_a_trace_replay_is_refused(tmp_path):
    wl = {**MINIMAL_WORKLOAD, "skew": "trace", "trace": "routes.npz"}
    with pytest.raises(ScenarioError, match=r'skew = "trace" is invalid with a \[routing\] router variant'):
        _scenario(tmp_path, {"scoring": "sigmoid"}, workload=wl)


def test_score_bias_scale_draws_the_seeded_bias_last():
    plain, biased = init_weights(_cfg(8, 2), seed=3), init_weights(_cfg(8, 2, score_bias=0.5), seed=3)
    assert plain.score_bias_E is None and torch.equal(plain.router_ED, biased.router_ED)
    assert torch.equal(plain.w_down_EFD, biased.w_down_EFD)  # the other tensors do not move
    assert biased.score_bias_E.shape == (8,) and 0.1 < biased.score_bias_E.std().item() < 1.5
