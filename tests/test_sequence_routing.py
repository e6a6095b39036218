"""Sequence-level routing (``MoEConfig.granularity = "sequence"``): every token of a sequence goes where
the router sends the sequence's mean hidden state; the fp64 reference does the same by its own code, and
the equivalence check catches a router that looks at anything but the mean."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import runtime.router
from moebench.kinds.equivalence import TOLERANCE, Case, assemble, compare, run_rank, run_reference
from moebench.launch.spawn import RankContext
from runtime import MoEConfig, MoELayer, init_weights, reference_moe
from runtime.router import Sequences, cut_sequences, load_balancing_loss, route

CTX = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")
SEQ = MoEConfig(16, 32, 8, top_k=2, capacity_factor=1.25, aux_loss_coef=0.1, z_loss_coef=0.01,
                granularity="sequence", seq_len=16)  # fmt: skip
CASE = Case("sequence", SEQ, num_tokens=128, layers=2)


def _layer(cfg: MoEConfig) -> MoELayer:
    layer = MoELayer(cfg)
    layer.load_global_weights(init_weights(cfg, seed=3))
    return layer


def test_every_token_of_a_sequence_takes_the_routing_of_the_sequence_mean():
    layer, x_TD = _layer(SEQ), torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    plan = layer.plan(x_TD)
    means_BD = x_TD.reshape(4, 16, 16).mean(1)
    _, weights_BK, ids_BK = route(means_BD @ layer.router.weight_ED.T, 2, False)
    assert torch.equal(plan.routing.ids_TK, ids_BK.repeat_interleave(16, dim=0))
    torch.testing.assert_close(plan.routing.weights_TK, weights_BK.repeat_interleave(16, dim=0))
    assert torch.equal(plan.sequence_routing.ids_TK, ids_BK)


def test_sequence_routing_sends_a_sequence_elsewhere_than_its_tokens_would_go():
    """Not vacuous: on these tokens the two granularities route differently (so the checks below can fail)."""
    w, x = init_weights(SEQ, seed=3), torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    per_seq = reference_moe(x, w, SEQ)
    per_token = reference_moe(x, w, dataclasses.replace(SEQ, granularity="token", seq_len=None))
    assert per_seq.counts_E != per_token.counts_E
    assert sum(per_seq.counts_E) == sum(per_token.counts_E) == 64 * 2


def test_aux_and_z_losses_are_those_of_one_router_row_per_sequence():
    layer, x_TD = _layer(dataclasses.replace(SEQ, capacity_factor=0.0)), torch.randn(64, 16)
    out = layer(x_TD)
    logits_BE = x_TD.reshape(4, 16, 16).mean(1) @ layer.router.weight_ED.T
    probs_BE, _, ids_BK = route(logits_BE, 2, False)
    counts_E = torch.bincount(ids_BK.reshape(-1), minlength=8)  # the router's choices, one per sequence
    torch.testing.assert_close(out.aux_loss, load_balancing_loss(probs_BE, counts_E, 4, 2))
    torch.testing.assert_close(out.z_loss, torch.logsumexp(logits_BE, -1).square().mean())


def test_sequence_equivalence_is_within_tolerance_at_ep1():
    errors = compare(assemble([run_rank(CTX, CASE)]), run_reference(CASE))
    assert max(errors.values()) <= TOLERANCE["float32"], errors


def test_whole_rank_as_one_sequence_matches_the_reference_given_the_rank_split():
    whole = dataclasses.replace(CASE, moe=dataclasses.replace(SEQ, seq_len=None))
    errors = compare(assemble([run_rank(CTX, whole)]), run_reference(whole, world_size=1))
    assert max(errors.values()) <= TOLERANCE["float32"], errors


def test_routing_on_the_first_token_instead_of_the_mean_is_caught(monkeypatch):
    def first_token(x_TD, lengths):
        starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
        return x_TD[starts].float()

    monkeypatch.setattr(runtime.router, "sequence_means", first_token)
    errors = compare(assemble([run_rank(CTX, CASE)]), run_reference(CASE))
    assert errors["out"] > 1e-2 and errors["grad_router"] > 1e-2


def test_routing_each_token_on_its_own_is_caught():
    token = dataclasses.replace(CASE, moe=dataclasses.replace(SEQ, granularity="token", seq_len=None))
    errors = compare(assemble([run_rank(CTX, token)]), run_reference(CASE))
    assert errors["out"] > 1e-2


def test_a_decode_row_reuses_the_kept_choice_not_its_own_mean():
    layer, x_TD = _layer(SEQ), torch.randn(17, 16)
    first = layer.plan(x_TD[:16], Sequences((16,)))
    later = layer.plan(x_TD[16:], Sequences((1,), first.sequence_routing, (True,)))
    fresh = layer.plan(x_TD[16:], Sequences((1,)))
    assert torch.equal(later.routing.ids_TK, first.routing.ids_TK[:1])
    assert not torch.equal(fresh.routing.logits_TE, later.routing.logits_TE)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(granularity="sample"),
            "MoEConfig.granularity = 'sample' is invalid: accepted one of 'token', 'sequence'",
        ),
        (dict(seq_len=16), "MoEConfig.seq_len = 16 is invalid: accepted None with granularity 'token'"),
        (dict(granularity="sequence", seq_len=0), "MoEConfig.seq_len = 0 is invalid: accepted an integer >= 1"),
    ],
)
def test_bad_granularity_or_seq_len_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        MoEConfig(16, 32, 8, **kwargs)


def test_a_seq_len_that_does_not_divide_the_tokens_is_refused():
    assert cut_sequences(48, 16) == (16, 16, 16) and cut_sequences(0, 16) == () and cut_sequences(5, None) == (5,)
    with pytest.raises(ValueError, match="seq_len = 16 does not divide the forward's 40 tokens"):
        _layer(SEQ).plan(torch.randn(40, 16))
