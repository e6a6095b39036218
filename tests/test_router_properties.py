"""Property tests of routing, capacity, dropping and the router losses (runtime/router.py).

Every expected value is computed independently of ``runtime/``: plain Python loops, integer
arithmetic or fp64 tensor arithmetic written out in the tests.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategies import FAST, bincount_E, choices_TK, first_copies_kept, logits_TE

from runtime import MoEConfig
from runtime.layer import MoELayer
from runtime.reference import reference_moe
from runtime.router import (
    expert_capacity,
    keep_mask,
    kept_counts,
    load_balancing_loss,
    route,
    router_z_loss,
)
from runtime.weights import init_weights

# ---------------------------------------------------------------------------------------------
# route


@FAST
@given(logits=logits_TE(), data=st.data())
def test_route_picks_top_k_distinct_experts_in_descending_probability(logits, data):
    top_k = data.draw(st.integers(1, logits.shape[1]))
    probs_TE, _, ids_TK = route(logits, top_k, normalize=False)
    assert ids_TK.shape == (logits.shape[0], top_k)
    for t, row in enumerate(ids_TK.tolist()):
        assert len(set(row)) == top_k
        chosen = [probs_TE[t, e].item() for e in row]
        assert chosen == sorted(chosen, reverse=True)
        unchosen = [probs_TE[t, e].item() for e in range(logits.shape[1]) if e not in row]
        assert not unchosen or min(chosen) >= max(unchosen)


@FAST
@given(logits=logits_TE())
def test_route_probs_are_the_softmax_and_rows_sum_to_one(logits):
    probs_TE, _, _ = route(logits, 1, normalize=False)
    assert probs_TE.dtype == torch.float32
    expected = torch.softmax(logits.double(), dim=-1)
    torch.testing.assert_close(probs_TE.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(probs_TE.sum(-1), torch.ones(logits.shape[0]), rtol=0, atol=1e-5)


@FAST
@given(logits=logits_TE(), data=st.data())
def test_route_raw_weights_are_exactly_the_chosen_probabilities(logits, data):
    top_k = data.draw(st.integers(1, logits.shape[1]))
    probs_TE, weights_TK, ids_TK = route(logits, top_k, normalize=False)
    assert torch.equal(weights_TK, probs_TE.gather(1, ids_TK))


@FAST
@given(logits=logits_TE(), data=st.data())
def test_route_normalized_weights_are_chosen_probabilities_over_their_sum(logits, data):
    top_k = data.draw(st.integers(1, logits.shape[1]))
    probs_TE, weights_TK, ids_TK = route(logits, top_k, normalize=True)
    chosen_TK = probs_TE.gather(1, ids_TK).double()
    torch.testing.assert_close(weights_TK.double(), chosen_TK / chosen_TK.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(weights_TK.sum(-1), torch.ones(logits.shape[0]), rtol=0, atol=1e-6)


def test_route_hand_example_picks_the_two_largest_logits():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    _, weights_TK, ids_TK = route(logits, 2, normalize=True)
    assert ids_TK.tolist() == [[1, 3]]
    e = [math.exp(v) for v in (0.0, 3.0, 1.0, 2.0)]
    assert weights_TK[0].tolist() == pytest.approx([e[1] / (e[1] + e[3]), e[3] / (e[1] + e[3])], rel=1e-6)


def test_route_breaks_probability_ties_toward_the_lower_expert_id_like_the_reference():
    picked = {
        num_experts: route(torch.zeros(1, num_experts), 2, normalize=False)[2].tolist() for num_experts in (4, 8, 16)
    }
    assert picked == {4: [[0, 1]], 8: [[0, 1]], 16: [[0, 1]]}


# ---------------------------------------------------------------------------------------------
# expert_capacity


@pytest.mark.parametrize(
    ("capacity_factor", "num_tokens", "top_k", "num_experts", "expected"),
    [
        (1.25, 10, 2, 4, 7),  # 6.25 -> 7
        (1.0, 8, 1, 4, 2),  # exact: no rounding up
        (2.0, 3, 2, 4, 3),  # 3.0
        (0.5, 1, 1, 8, 1),  # 0.0625 -> 1: a non-zero factor never gives capacity 0
        (1.5, 7, 3, 5, 7),  # 6.3 -> 7
    ],
)
def test_expert_capacity_hand_examples(capacity_factor, num_tokens, top_k, num_experts, expected):
    assert expert_capacity(capacity_factor, num_tokens, top_k, num_experts) == expected


@FAST
@given(
    eighths=st.integers(1, 40),
    num_tokens=st.integers(1, 4096),
    top_k=st.integers(1, 8),
    num_experts=st.integers(1, 256),
)
def test_expert_capacity_is_the_integer_ceiling_of_cf_n_k_over_e(eighths, num_tokens, top_k, num_experts):
    # cf = eighths / 8 is exact in binary, so the exact rational ceiling is the expected value.
    numerator, denominator = eighths * num_tokens * top_k, 8 * num_experts
    assert expert_capacity(eighths / 8, num_tokens, top_k, num_experts) == -(-numerator // denominator)


def test_expert_capacity_is_none_when_dropless():
    assert expert_capacity(0.0, 100, 2, 8) is None
    assert expert_capacity(0, 100, 2, 8) is None


# ---------------------------------------------------------------------------------------------
# kept_counts and keep_mask


@st.composite
def group_batches(draw):
    """Per-rank expert choices over a W-rank group and a capacity (None = dropless)."""
    num_experts = draw(st.integers(1, 6))
    top_k = draw(st.integers(1, num_experts))
    ep_size = draw(st.integers(1, 4))
    ids_per_rank = [draw(choices_TK(num_experts, top_k, max_tokens=6)) for _ in range(ep_size)]
    total = sum(ids.numel() for ids in ids_per_rank)
    capacity = draw(st.none() | st.integers(0, max(total, 1)))
    return num_experts, ids_per_rank, capacity


@FAST
@given(batch=group_batches())
def test_kept_counts_row_r_is_capacity_left_after_earlier_ranks_clamped_to_its_counts(batch):
    num_experts, ids_per_rank, capacity = batch
    counts_WE = torch.stack([bincount_E(ids, num_experts) for ids in ids_per_rank])
    kept_WE = kept_counts(counts_WE, capacity)
    counts = counts_WE.tolist()
    for r in range(len(counts)):
        for e in range(num_experts):
            if capacity is None:
                expected = counts[r][e]
            else:
                before = sum(counts[q][e] for q in range(r))
                expected = min(max(capacity - before, 0), counts[r][e])
            assert kept_WE[r, e].item() == expected


@FAST
@given(batch=group_batches())
def test_kept_counts_never_exceed_capacity_and_account_for_every_dropped_copy(batch):
    num_experts, ids_per_rank, capacity = batch
    counts_WE = torch.stack([bincount_E(ids, num_experts) for ids in ids_per_rank])
    kept_E = kept_counts(counts_WE, capacity).sum(0).tolist()
    total_E = counts_WE.sum(0).tolist()
    cap = math.inf if capacity is None else capacity
    dropped = sum(max(0, n - cap) for n in total_E)
    for e in range(num_experts):
        assert kept_E[e] == min(total_E[e], cap) <= cap
    assert sum(kept_E) == sum(ids.numel() for ids in ids_per_rank) - dropped


@FAST
@given(batch=group_batches())
def test_per_rank_keep_masks_keep_the_groups_first_capacity_copies_in_rank_then_token_order(batch):
    num_experts, ids_per_rank, capacity = batch
    counts_WE = torch.stack([bincount_E(ids, num_experts) for ids in ids_per_rank])
    kept_WE = kept_counts(counts_WE, capacity)
    masks = [keep_mask(ids, kept_WE[r]) for r, ids in enumerate(ids_per_rank)]
    for r, ids in enumerate(ids_per_rank):
        assert bincount_E(ids[masks[r]], num_experts).tolist() == kept_WE[r].tolist()
    group_ids = torch.cat(ids_per_rank)
    budget = [len(group_ids.reshape(-1))] * num_experts if capacity is None else [capacity] * num_experts
    assert torch.cat(masks).tolist() == first_copies_kept(group_ids, budget)


@FAST
@given(data=st.data(), num_experts=st.integers(1, 6))
def test_keep_mask_keeps_exactly_the_first_budget_copies_of_each_expert(data, num_experts):
    top_k = data.draw(st.integers(1, num_experts))
    ids_TK = data.draw(choices_TK(num_experts, top_k))
    budget = data.draw(st.lists(st.integers(0, 12), min_size=num_experts, max_size=num_experts))
    mask_TK = keep_mask(ids_TK, torch.tensor(budget))
    assert mask_TK.shape == ids_TK.shape
    assert mask_TK.tolist() == first_copies_kept(ids_TK, budget)


def test_keep_mask_hand_example_drops_later_copies_of_a_full_expert():
    ids_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2]])
    mask_TK = keep_mask(ids_TK, torch.tensor([1, 1, 1, 1]))
    assert mask_TK.tolist() == [[True, True], [False, True], [False, False], [True, False]]


@FAST
@given(data=st.data(), num_experts=st.integers(1, 6))
def test_dropless_keeps_every_copy(data, num_experts):
    top_k = data.draw(st.integers(1, num_experts))
    ids_TK = data.draw(choices_TK(num_experts, top_k))
    counts_WE = bincount_E(ids_TK, num_experts)[None]
    kept_WE = kept_counts(counts_WE, None)
    assert torch.equal(kept_WE, counts_WE)
    assert bool(keep_mask(ids_TK, kept_WE[0]).all())


# ---------------------------------------------------------------------------------------------
# the combine weight of a token with a dropped copy (normalize_topk and capacity together)

# 16 tokens x 2 copies over 4 experts, C = ceil(0.5 · 16 · 2 / 4) = 4 of about 8 copies each
DROPPING = MoEConfig(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, capacity_factor=0.5)


def _dropping_by_hand(x_ND: torch.Tensor, weights, moe: MoEConfig) -> tuple[torch.Tensor, list[int]]:
    """The documented rule in fp64, token by token: weights are the chosen probabilities (over their
    sum under normalize_topk), each expert serves its first C copies in token order, a dropped copy
    adds nothing and the token's other copies keep their weights. Also: copies dropped per token."""
    x = x_ND.double()
    probs = torch.softmax(x @ weights.router_ED.double().T, -1)
    capacity = math.ceil(moe.capacity_factor * x.shape[0] * moe.top_k / moe.num_experts)
    used, out, dropped = [0] * moe.num_experts, torch.zeros_like(x), []
    for t in range(x.shape[0]):
        chosen = sorted(range(moe.num_experts), key=lambda e: (-probs[t, e].item(), e))[: moe.top_k]
        total = sum(probs[t, e] for e in chosen) if moe.normalize_topk else 1.0
        dropped.append(0)
        for e in chosen:
            if used[e] == capacity:
                dropped[-1] += 1
                continue
            used[e] += 1
            h = torch.nn.functional.gelu(x[t] @ weights.w_in_EDH[e].double())
            out[t] += probs[t, e] / total * (h @ weights.w_down_EFD[e].double())
    return out, dropped


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("normalize", [True, False])
def test_a_dropped_copys_weight_goes_to_no_other_copy_of_its_token_at_ep1(normalize):
    moe = dataclasses.replace(DROPPING, normalize_topk=normalize)
    weights = init_weights(moe, seed=5)
    x_ND = torch.randn(16, moe.hidden_size, generator=torch.Generator().manual_seed(6))
    expected, dropped = _dropping_by_hand(x_ND, weights, moe)
    assert dropped.count(1) >= 3 and dropped.count(0) >= 3  # tokens with one copy dropped, and with none
    layer = MoELayer(moe)  # EP 1, in this process
    layer.load_global_weights(weights)
    with torch.no_grad():
        out = layer(x_ND)
    assert out.tokens_dropped == sum(dropped)
    assert _rel(out.out_TD, expected) <= 1e-5
    # the fp64 reference follows the same rule (the EP 2 and 4 layers are held to it in test_ep_equivalence)
    assert _rel(reference_moe(x_ND, weights, moe).out_ND, expected) <= 1e-12


# ---------------------------------------------------------------------------------------------
# load_balancing_loss and router_z_loss


def aux_by_hand(probs: list[list[float]], counts: list[int], num_tokens: int, top_k: int) -> float:
    num_experts = len(counts)
    f = [c / (num_tokens * top_k) for c in counts]
    p = [sum(row[e] for row in probs) / num_tokens for e in range(num_experts)]
    return num_experts * sum(fe * pe for fe, pe in zip(f, p, strict=True))


@st.composite
def router_batches(draw, max_tokens: int = 12, max_experts: int = 6):
    """fp64 probabilities [N, E], the copies per expert [E] and top_k."""
    num_tokens = draw(st.integers(1, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    top_k = draw(st.integers(1, num_experts))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    probs_NE = torch.softmax(3 * torch.randn(num_tokens, num_experts, generator=gen, dtype=torch.float64), -1)
    counts_E = torch.randint(0, num_tokens * top_k + 1, (num_experts,), generator=gen)
    return probs_NE, counts_E, top_k


@FAST
@given(batch=router_batches())
def test_load_balancing_loss_is_e_times_sum_of_f_times_p(batch):
    probs_NE, counts_E, top_k = batch
    num_tokens = probs_NE.shape[0]
    got = load_balancing_loss(probs_NE, counts_E, num_tokens, top_k).item()
    assert got == pytest.approx(aux_by_hand(probs_NE.tolist(), counts_E.tolist(), num_tokens, top_k), rel=1e-12)


def test_load_balancing_loss_hand_example():
    # f = [1, 0], P = [0.9, 0.1]: aux = 2 · (1 · 0.9 + 0 · 0.1) = 1.8
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1]], dtype=torch.float64)
    assert load_balancing_loss(probs, torch.tensor([2, 0]), 2, 1).item() == pytest.approx(1.8, rel=1e-12)


@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), [(8, 4, 2), (6, 3, 1), (16, 8, 4)])
def test_load_balancing_loss_is_one_for_perfectly_uniform_routing(num_tokens, num_experts, top_k):
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts, dtype=torch.float64)
    counts = torch.full((num_experts,), num_tokens * top_k // num_experts)
    assert load_balancing_loss(probs, counts, num_tokens, top_k).item() == pytest.approx(1.0, rel=1e-12)


@FAST
@given(batch=router_batches(), data=st.data())
def test_load_balancing_loss_shares_over_ranks_sum_to_the_whole_batch_loss(batch, data):
    probs_NE, counts_E, top_k = batch
    num_tokens = probs_NE.shape[0]
    cuts = sorted(data.draw(st.lists(st.integers(0, num_tokens), max_size=3)))
    bounds = [0, *cuts, num_tokens]
    shares = [
        load_balancing_loss(probs_NE[lo:hi], counts_E, num_tokens, top_k).item()
        for lo, hi in itertools.pairwise(bounds)
    ]
    whole = load_balancing_loss(probs_NE, counts_E, num_tokens, top_k).item()
    assert sum(shares) == pytest.approx(whole, rel=1e-12, abs=1e-15)


def z_loss_by_hand(logits: list[list[float]]) -> float:
    total = 0.0
    for row in logits:
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        total += lse * lse
    return total / len(logits)


@FAST
@given(logits=logits_TE())
def test_router_z_loss_is_the_mean_squared_logsumexp(logits):
    got = router_z_loss(logits, logits.shape[0]).item()
    assert got == pytest.approx(z_loss_by_hand(logits.tolist()), rel=1e-5, abs=1e-6)


def test_router_z_loss_of_zero_logits_is_log_e_squared():
    assert router_z_loss(torch.zeros(5, 4), 5).item() == pytest.approx(math.log(4) ** 2, rel=1e-6)


@FAST
@given(logits=logits_TE(), data=st.data())
def test_router_z_loss_shares_over_ranks_sum_to_the_whole_batch_loss(logits, data):
    num_tokens = logits.shape[0]
    cut = data.draw(st.integers(0, num_tokens))
    shares = router_z_loss(logits[:cut], num_tokens) + router_z_loss(logits[cut:], num_tokens)
    whole = router_z_loss(logits, num_tokens)
    assert shares.item() == pytest.approx(whole.item(), rel=1e-5, abs=1e-6)
