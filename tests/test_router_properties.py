"""Property tests of the pure routing, capacity, permutation, loss and expert-GEMM functions.

Shape legend: T = tokens on a rank, N = tokens over the group, E = experts, K = top_k,
W = ranks, L = local experts, D = hidden, F = FFN hidden, P = copies kept.

Every expected value here is computed independently of ``runtime/``: plain Python loops,
integer arithmetic or fp64 tensor arithmetic written out in this file.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from runtime.dispatch import LocalDispatcher, permute_order, slot_of_expert, source_to_expert_major
from runtime.experts import expert_ffn
from runtime.router import (
    expert_capacity,
    keep_mask,
    kept_counts,
    load_balancing_loss,
    route,
    router_z_loss,
)

FAST = settings(max_examples=60, deadline=None)
BACKENDS = ("loop", "bmm", "grouped_mm")

# ---------------------------------------------------------------------------------------------
# Strategies and independent helpers


@st.composite
def logits_TE(draw, min_tokens: int = 1, max_tokens: int = 10, max_experts: int = 8) -> torch.Tensor:
    """fp32 logits [T, E], values drawn by hypothesis (ties and extremes included)."""
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    values = draw(
        st.lists(
            st.floats(-30, 30, allow_nan=False, width=32),
            min_size=num_tokens * num_experts,
            max_size=num_tokens * num_experts,
        )
    )
    return torch.tensor(values, dtype=torch.float32).reshape(num_tokens, num_experts)


@st.composite
def choices_TK(draw, num_experts: int, top_k: int, max_tokens: int = 10) -> torch.Tensor:
    """Expert ids [T, K], each row K distinct experts (what ``route`` guarantees)."""
    num_tokens = draw(st.integers(0, max_tokens))
    rows = [list(draw(st.permutations(range(num_experts))))[:top_k] for _ in range(num_tokens)]
    return torch.tensor(rows, dtype=torch.long).reshape(num_tokens, top_k)


def first_copies_kept(ids_TK: torch.Tensor, budget_E: list[int]) -> list[list[bool]]:
    """Plain-loop keep rule: walk copies in token order, keep while the expert has budget."""
    used = [0] * len(budget_E)
    mask = []
    for row in ids_TK.tolist():
        kept_row = []
        for e in row:
            kept_row.append(used[e] < budget_E[e])
            used[e] += kept_row[-1]
        mask.append(kept_row)
    return mask


def bincount_E(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts: list[int], activation: str) -> torch.Tensor:
    """One row at a time in fp64: row i goes through the expert whose run contains it."""
    expert_of_row = [l for l, c in enumerate(counts) for _ in range(c)]
    ffn = w_down_LFD.shape[1]
    rows = []
    for i, l in enumerate(expert_of_row):
        h = x_RD[i].double() @ w_in_LDH[l].double()
        if activation == "swiglu":
            gate, up = h[:ffn], h[ffn:]
            a = gate * torch.sigmoid(gate) * up
        else:
            a = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        rows.append(a @ w_down_LFD[l].double())
    return torch.stack(rows) if rows else torch.zeros(0, x_RD.shape[1], dtype=torch.float64)


def expert_weights(num_local: int, activation: str, seed: int, hidden: int = 8, ffn: int = 4):
    """Random expert weights; D and F are multiples of 4 so grouped_mm's 16-byte strides hold."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * ffn if activation == "swiglu" else ffn
    w_in_LDH = torch.randn(num_local, hidden, width, generator=gen) / hidden**0.5
    w_down_LFD = torch.randn(num_local, ffn, hidden, generator=gen) / ffn**0.5
    return w_in_LDH, w_down_LFD


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


# ---------------------------------------------------------------------------------------------
# Permutation: slot_of_expert, permute_order, source_to_expert_major


@FAST
@given(data=st.data(), num_experts=st.integers(1, 10), ep_size=st.integers(1, 4))
def test_slot_of_expert_lists_experts_rank_major_then_by_id(data, num_experts, ep_size):
    owner = tuple(data.draw(st.lists(st.integers(0, ep_size - 1), min_size=num_experts, max_size=num_experts)))
    slot_E = slot_of_expert(owner).tolist()
    assert sorted(slot_E) == list(range(num_experts))
    start = 0
    for rank in range(ep_size):
        mine = [e for e in range(num_experts) if owner[e] == rank]
        assert [slot_E[e] for e in mine] == list(range(start, start + len(mine)))
        start += len(mine)


def test_slot_of_expert_hand_example():
    # rank 0 owns experts 1 and 3, rank 1 owns 0 and 2: slots 1->0, 3->1, 0->2, 2->3
    assert slot_of_expert((1, 0, 1, 0)).tolist() == [2, 0, 3, 1]


@FAST
@given(data=st.data(), num_experts=st.integers(1, 6), ep_size=st.integers(1, 3))
def test_permute_order_lists_each_kept_copy_once_sorted_by_slot_then_token(data, num_experts, ep_size):
    top_k = data.draw(st.integers(1, num_experts))
    ids_TK = data.draw(choices_TK(num_experts, top_k))
    keep = data.draw(st.lists(st.booleans(), min_size=ids_TK.numel(), max_size=ids_TK.numel()))
    keep_TK = torch.tensor(keep, dtype=torch.bool).reshape(ids_TK.shape)
    owner = tuple(data.draw(st.lists(st.integers(0, ep_size - 1), min_size=num_experts, max_size=num_experts)))
    slot_E = slot_of_expert(owner)
    order_P = permute_order(ids_TK, keep_TK, slot_E).tolist()
    assert sorted(order_P) == [i for i, k in enumerate(keep) if k]
    keys = [(slot_E[ids_TK.reshape(-1)[i]].item(), i) for i in order_P]
    assert keys == sorted(keys)


@FAST
@given(data=st.data(), ep_size=st.integers(1, 4), num_local=st.integers(1, 4))
def test_source_to_expert_major_regroups_rows_by_local_expert_then_source(data, ep_size, num_local):
    counts = data.draw(st.lists(st.integers(0, 3), min_size=ep_size * num_local, max_size=ep_size * num_local))
    counts_WL = torch.tensor(counts, dtype=torch.long).reshape(ep_size, num_local)
    c = counts_WL.tolist()
    source_major = [(s, l, j) for s in range(ep_size) for l in range(num_local) for j in range(c[s][l])]
    idx = source_to_expert_major(counts_WL).tolist()
    assert sorted(idx) == list(range(len(source_major)))
    assert [source_major[i] for i in idx] == [
        (s, l, j) for l in range(num_local) for s in range(ep_size) for j in range(c[s][l])
    ]


# ---------------------------------------------------------------------------------------------
# LocalDispatcher: combine(identity(dispatch(x)))


def dispatch_identity_combine(x_TD, weights_TK, ids_TK, num_experts, capacity):
    """EP = 1 round trip with identity experts; returns (out_TD, keep_TK, dispatched rows, meta)."""
    dispatcher = LocalDispatcher(num_experts)
    kept_WE = kept_counts(bincount_E(ids_TK, num_experts)[None], capacity)
    keep_TK = keep_mask(ids_TK, kept_WE[0])
    x_PD, meta = dispatcher.dispatch(x_TD, ids_TK, keep_TK, kept_WE)
    return dispatcher.combine(x_PD, weights_TK, meta), keep_TK, x_PD, meta


@FAST
@given(logits=logits_TE(), data=st.data())
def test_combine_inverts_dispatch_for_identity_experts_when_dropless_and_normalized(logits, data):
    top_k = data.draw(st.integers(1, logits.shape[1]))
    _, weights_TK, ids_TK = route(logits, top_k, normalize=True)
    x_TD = torch.randn(logits.shape[0], 5, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    out_TD, keep_TK, _, _ = dispatch_identity_combine(x_TD, weights_TK, ids_TK, logits.shape[1], capacity=None)
    assert bool(keep_TK.all())
    torch.testing.assert_close(out_TD, x_TD, rtol=1e-6, atol=1e-6)


@FAST
@given(logits=logits_TE(max_tokens=12, max_experts=5), data=st.data())
def test_combine_scales_identity_experts_by_the_kept_weight_sum_under_capacity(logits, data):
    num_tokens, num_experts = logits.shape
    top_k = data.draw(st.integers(1, num_experts))
    normalize = data.draw(st.booleans())
    capacity = expert_capacity(data.draw(st.sampled_from([0.25, 0.5, 1.0, 1.5])), num_tokens, top_k, num_experts)
    _, weights_TK, ids_TK = route(logits, top_k, normalize)
    x_TD = torch.randn(num_tokens, 5, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 999))))
    out_TD, keep_TK, _, _ = dispatch_identity_combine(x_TD, weights_TK, ids_TK, logits.shape[1], capacity)
    kept_weight_T = (weights_TK * keep_TK).sum(-1, keepdim=True)
    torch.testing.assert_close(out_TD, x_TD * kept_weight_T, rtol=1e-5, atol=1e-6)
    all_dropped = ~keep_TK.any(-1)
    assert torch.equal(out_TD[all_dropped], torch.zeros_like(x_TD[all_dropped]))
    if normalize:
        all_kept = keep_TK.all(-1)
        torch.testing.assert_close(out_TD[all_kept], x_TD[all_kept], rtol=1e-6, atol=1e-6)


def test_combine_hand_example_keeps_drops_and_partly_drops_tokens():
    # capacity 1 per expert; copies in token order: e0 keeps t0, e1 keeps t0, e2 keeps t1, e3 keeps t3
    ids_TK = torch.tensor([[0, 1], [0, 2], [1, 0], [3, 2]])
    weights_TK = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.6, 0.4], [0.3, 0.7]])
    x_TD = torch.arange(1.0, 9.0).reshape(4, 2)
    out_TD, keep_TK, _, _ = dispatch_identity_combine(x_TD, weights_TK, ids_TK, 4, capacity=1)
    assert keep_TK.tolist() == [[True, True], [False, True], [False, False], [True, False]]
    assert torch.equal(out_TD[0], x_TD[0])  # all kept: 0.75 + 0.25
    assert torch.equal(out_TD[1], 0.5 * x_TD[1])  # only the e2 copy
    assert torch.equal(out_TD[2], torch.zeros(2))  # every copy dropped
    torch.testing.assert_close(out_TD[3], 0.3 * x_TD[3])  # only the e3 copy


@FAST
@given(logits=logits_TE(), data=st.data())
def test_local_dispatch_sends_token_rows_expert_major_with_kept_counts_as_run_lengths(logits, data):
    num_experts = logits.shape[1]
    top_k = data.draw(st.integers(1, num_experts))
    _, weights_TK, ids_TK = route(logits, top_k, normalize=False)
    x_TD = torch.arange(float(logits.shape[0]))[:, None].expand(-1, 3)  # row t holds t
    capacity = data.draw(st.none() | st.integers(1, 4))
    _, keep_TK, x_PD, meta = dispatch_identity_combine(x_TD, weights_TK, ids_TK, logits.shape[1], capacity)
    expected = sorted((e, t) for t in range(ids_TK.shape[0]) for k, e in enumerate(ids_TK[t].tolist()) if keep_TK[t, k])
    assert x_PD[:, 0].long().tolist() == [t for _, t in expected]
    runs = [sum(1 for e, _ in expected if e == l) for l in range(len(meta.tokens_per_expert))]
    assert meta.tokens_per_expert == runs


# ---------------------------------------------------------------------------------------------
# Expert GEMM backends


@FAST
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    activation=st.sampled_from(["gelu", "swiglu"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_expert_backends_agree_with_a_per_row_fp64_reference(counts, activation, seed):
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed)
    x_RD = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(seed + 1))
    expected = ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts, activation)
    outs = {b: expert_ffn(x_RD, w_in_LDH, w_down_LFD, counts, activation, b) for b in BACKENDS}
    for backend, y_RD in outs.items():
        assert y_RD.shape == x_RD.shape, backend
        torch.testing.assert_close(y_RD.double(), expected, rtol=1e-4, atol=1e-5, msg=backend)
    for backend in ("bmm", "grouped_mm"):
        torch.testing.assert_close(outs[backend], outs["loop"], rtol=1e-5, atol=1e-6, msg=backend)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[0, 5, 0], [7, 0, 0, 0], [0, 0, 0, 6], [0, 0], [3, 0, 2, 0]], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_backend_handles_empty_experts_and_all_rows_on_one_expert(backend, counts, activation):
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed=7)
    x_RD = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(3))
    y_RD = expert_ffn(x_RD, w_in_LDH, w_down_LFD, counts, activation, backend)
    expected = ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts, activation)
    assert y_RD.shape == (sum(counts), 8)
    torch.testing.assert_close(y_RD.double(), expected, rtol=1e-4, atol=1e-5)


def _grads(backend, x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD):
    leaves = [t.clone().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    (expert_ffn(*leaves, counts, activation, backend) * g_RD).sum().backward()
    return [t.grad for t in leaves]


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    activation=st.sampled_from(["gelu", "swiglu"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_expert_loop_and_bmm_backends_have_the_same_gradients_as_the_fp64_reference(counts, activation, seed):
    assume(sum(counts) > 0)
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_RD = torch.randn(sum(counts), 8, generator=gen)
    g_RD = torch.randn(sum(counts), 8, generator=gen)  # random upstream gradient
    loop = _grads("loop", x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD)
    bmm = _grads("bmm", x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD)
    leaves = [t.double().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    (ffn_rows_fp64(*leaves, counts, activation) * g_RD.double()).sum().backward()
    for name, a, b, ref in zip(("x", "w_in", "w_down"), loop, bmm, leaves, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(a.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=name)
