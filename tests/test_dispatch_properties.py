"""Property tests of permutation, dispatch and combine (runtime/permute.py, runtime/dispatch.py).

Every expected value is computed independently of ``runtime/``: plain Python loops, integer
arithmetic or fp64 tensor arithmetic written out in the tests.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st
from strategies import FAST, bincount_E, choices_TK, logits_TE

from runtime.dispatch import AllToAllDispatcher, LocalDispatcher
from runtime.permute import expert_to_source_major, permute_order, slot_of_expert, source_to_expert_major
from runtime.router import (
    expert_capacity,
    keep_mask,
    kept_counts,
    route,
)

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
    back = expert_to_source_major(counts_WL).tolist()  # its inverse
    assert [idx[i] for i in back] == list(range(len(source_major)))


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


def test_plan_gives_the_loop_backend_rows_as_received_and_grouped_backends_expert_major(monkeypatch):
    # rank 0 of 2 (planning runs no collective): experts 0 and 1 on rank 0, 2 and 3 on rank 1
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    dispatcher = AllToAllDispatcher((0, 0, 1, 1), group=object())
    ids_TK = torch.tensor([[0, 3], [0, 3], [1, 3]])  # rank 0's copies: e0 twice, e1 once, e3 three times
    keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    kept_WE = torch.tensor([[2, 1, 0, 3], [1, 4, 2, 0]])
    # rank 0 receives, source-major: from itself e0 ×2, e1 ×1; from rank 1 e0 ×1, e1 ×4
    (received,) = dispatcher.plan(ids_TK, keep_TK, kept_WE, expert_major=False).chunks
    assert (received.runs, received.run_experts) == ([2, 1, 1, 4], [0, 1, 0, 1])
    assert received.to_expert_major_R is None and received.to_source_major_R is None
    (grouped,) = dispatcher.plan(ids_TK, keep_TK, kept_WE, expert_major=True).chunks
    assert (grouped.runs, grouped.run_experts) == ([3, 5], None)
    assert grouped.to_expert_major_R.tolist() == [0, 1, 3, 2, 4, 5, 6, 7]  # e0: rows 0, 1, 3; e1: 2, 4-7
    assert grouped.to_source_major_R.tolist() == [0, 1, 3, 2, 4, 5, 6, 7]  # its inverse (here its own)
    for chunk in (received, grouped):
        assert (chunk.input_splits, chunk.output_splits, chunk.tokens_per_expert) == ([3, 3], [3, 5], [3, 5])
