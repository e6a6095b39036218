"""Redundant experts and failover (``runtime/redundancy.py``): the EPLB replication rule, the
deterministic split of a replicated expert's copies, rerouting, and, on 2 and 4 gloo ranks, that a
layer with replicas, or with lost copies a replica covers, equals the plain healthy layer; and that
without a covering replica, "reroute" and "drop" give what an independent fp64 computation gives."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from moebench.launch.spawn import launch
from runtime import MoEConfig, ParallelConfig
from runtime.layer import MoELayer
from runtime.redundancy import RedundancyConfig, Replicas, physical_ids, plain, replicate, reroute, split_counts
from runtime.reference import rel_error
from runtime.router import route
from runtime.weights import init_weights


def test_replicas_go_to_the_highest_load_per_copy_and_the_least_loaded_rank_without_one():
    # round robin over 2 ranks: experts 0, 2 on rank 0; 1, 3 on rank 1
    loads = (10.0, 1.0, 6.0, 3.0)
    reps = replicate(loads, (0, 1, 0, 1), 2, 2)
    # 1st: expert 0 (load 10) -> rank 1, the only rank without it; 2nd: expert 2 (6 > 10/2 = 5) -> rank 1
    assert reps.logical_of_P == (0, 1, 2, 3, 0, 2)
    assert reps.owner_P == (0, 1, 0, 1, 1, 1)
    # 4 ranks, one expert each. 1st: expert 0 (10) -> rank 1 (load 1). Rank loads are then 5, 6, 6, 3.
    # 2nd: expert 2 (6 > 10/2) -> rank 3 (3; rank 2 holds it). Rank loads 5, 6, 3, 6.
    # 3rd: expert 0 (5 > 3, 3, 1) -> rank 2 (3), the least loaded of the ranks without it (2, 3)
    reps4 = replicate(loads, (0, 1, 2, 3), 4, 3)
    assert reps4.logical_of_P == (0, 1, 2, 3, 0, 2, 0)
    assert reps4.owner_P == (0, 1, 2, 3, 1, 3, 2)


def test_more_replicas_than_ranks_can_hold_are_refused():
    with pytest.raises(ValueError, match=r"redundant_experts = 3 is invalid.*at most 2"):
        replicate((1.0, 1.0), (0, 1), 2, 3)


def _brute_split(kept_WE: np.ndarray, reps: Replicas) -> np.ndarray:
    """Copy by copy: number the group's copies of e in rank order and hand block i to live copy i."""
    out = np.zeros((kept_WE.shape[0], len(reps.logical_of_P)), dtype=np.int64)
    for e in range(kept_WE.shape[1]):
        live, n = reps.live_copies(e), int(kept_WE[:, e].sum())
        j = 0
        for w in range(kept_WE.shape[0]):
            for _ in range(kept_WE[w, e]):
                block = next(i for i in range(len(live)) if i * n // len(live) <= j < (i + 1) * n // len(live))
                out[w, live[block]] += 1
                j += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_the_split_gives_each_live_copy_a_contiguous_block_and_every_rank_agrees(seed):
    rng = np.random.default_rng(seed)
    world, experts, top_k, tokens = 3, 5, 2, 40
    reps = replicate(rng.random(experts), (0, 1, 2, 0, 1), world, 4)
    if seed % 2:  # lose one copy of a replicated expert
        lose = next(p for p in range(experts, len(reps.logical_of_P)))
        reps = reps.with_alive([p != lose for p in range(len(reps.logical_of_P))])
    ids = [torch.stack([torch.randperm(experts)[:top_k] for _ in range(tokens)]) for _ in range(world)]
    keep = [torch.rand(tokens, top_k) < 0.8 for _ in range(world)]
    kept_WE = torch.stack([torch.bincount(i[k], minlength=experts) for i, k in zip(ids, keep, strict=True)])
    split = split_counts(kept_WE, reps).numpy()
    assert (split == _brute_split(kept_WE.numpy(), reps)).all()
    for e in range(experts):  # balanced: live copies differ by at most one copy
        per_copy = split[:, reps.live_copies(e)].sum(0)
        assert per_copy.max() - per_copy.min() <= 1
    for w in range(world):  # each rank's own mapping sends exactly the counts the split promises
        phys = physical_ids(ids[w], keep[w], kept_WE, w, reps)
        assert (torch.tensor([reps.logical_of_P[p] for p in phys.reshape(-1).tolist()]) == ids[w].reshape(-1))[
            keep[w].reshape(-1)
        ].all()
        sent = torch.bincount(phys[keep[w]], minlength=len(reps.logical_of_P)).numpy()
        assert (sent == split[w]).all()


def test_reroute_keeps_available_choices_and_fills_lost_ones_with_the_next_best():
    probs = torch.softmax(torch.randn(50, 6, generator=torch.Generator().manual_seed(0)), -1)
    for normalize in (False, True):
        _, w, i = route(probs.log(), 2, normalize)
        w2, i2 = reroute(probs, i, normalize, torch.ones(6, dtype=torch.bool))
        assert torch.equal(i, i2) and torch.allclose(w, w2)  # nothing lost: route's choice exactly
    available = torch.tensor([True, False, True, True, False, True])
    _, _, ids = route(probs.log(), 2, False)
    w, i = reroute(probs, ids, False, available)
    for t in range(50):
        kept = [e for e in ids[t].tolist() if available[e]]
        rest = sorted((e for e in range(6) if available[e] and e not in kept), key=lambda e: -probs[t, e].item())
        want = sorted(kept + rest[: 2 - len(kept)], key=lambda e: -probs[t, e].item())
        assert i[t].tolist() == want
        assert torch.equal(w[t], probs[t, want])
    # a replayed choice (not the router's top) that is still available is kept
    replayed = torch.tensor([[5, 0]])
    one = torch.tensor([[0.05, 0.4, 0.3, 0.1, 0.1, 0.05]])
    _, i = reroute(one, replayed, False, torch.tensor([True, True, True, True, True, False]))
    assert i.tolist() == [[1, 0]]  # 5 lost -> the best available not chosen (1); 0 kept
    with pytest.raises(ValueError, match="1 experts are available: accepted at least top_k = 2"):
        reroute(probs, ids, False, torch.tensor([True] + [False] * 5))


# ---------------------------------------------------------------------------------------------
# On gloo ranks

MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2, capacity_factor=0.0)
TOKENS = 48


def _inputs(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, MOE.hidden_size, generator=torch.Generator().manual_seed(100 + rank))


def _fp64_expected(x_ND, weights, available, on_loss, moe=MOE) -> torch.Tensor:
    """The layer at EP 1 in fp64, written out token by token: top-k over the available experts
    (reroute) or over all with lost copies weighted 0 (drop); weights are the softmax probabilities."""
    x = x_ND.double()
    probs = torch.softmax(x @ weights.router_ED.double().T, -1)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        ranked = sorted(range(moe.num_experts), key=lambda e: (-probs[t, e].item(), e))
        if on_loss == "reroute":
            ranked = [e for e in ranked if available[e]]
        chosen = ranked[: moe.top_k]
        total = sum(probs[t, e] for e in chosen) if moe.normalize_topk else 1.0
        for e in chosen:
            if not available[e]:
                continue
            h = torch.nn.functional.gelu(x[t] @ weights.w_in_EDH[e].double())
            out[t] += probs[t, e] / total * (h @ weights.w_down_EFD[e].double())
    return out


def _rank(ctx, redundant: int, lose: str, on_loss: str, moe: MoEConfig = MOE, chunks: int = 1) -> dict:
    """Outputs of the plain layer and the layer with replicas (then with a lost copy)."""
    weights = init_weights(moe, seed=3)
    par = ParallelConfig(ep_size=ctx.world_size, overlap_chunks=chunks)
    x = _inputs(ctx.rank)
    plain_layer = MoELayer(moe, par, ctx.group)
    plain_layer.load_global_weights(weights)
    with torch.no_grad():
        healthy = plain_layer(x)
        loads = healthy.counts_WE.sum(0).tolist()
        redundancy = RedundancyConfig(tuple(loads), redundant) if redundant else None
        layer = MoELayer(moe, par, ctx.group, redundancy=redundancy)
        layer.load_global_weights(weights)
        replicated = layer(x).out_TD
        reps = layer.replicas
        if lose == "covered":  # the primary of the hottest replicated expert: a replica survives
            lost = [max(set(reps.logical_of_P[moe.num_experts :]), key=lambda e: loads[e])]
        elif lose == "uncovered":  # every copy of expert 1 and of expert 6
            lost = [p for p, e in enumerate(reps.logical_of_P) if e in (1, 6)]
        else:
            lost = []
        for p in lost:  # the copy's memory is gone: its owner's weights turn to NaN
            if p in layer.local_experts:
                layer.experts.w_in_LDH[layer.local_experts.index(p)] = float("nan")
        layer.set_alive([p not in lost for p in range(len(reps.logical_of_P))], on_loss)
        failed = layer(x)
    available = layer.replicas.available_E().tolist()
    expected = _fp64_expected(x, weights, available, on_loss, moe) if moe.dropless else None
    return {
        "healthy": healthy.out_TD,
        "replicated": replicated,
        "after": failed.out_TD,
        "expected": expected,
        "lost_tokens": int(failed.lost_tokens) if failed.lost_tokens is not None else 0,
        "owner_P": layer.replicas.owner_P,
        "local": layer.local_experts,
    }


# Each world-size-4 launch costs ~4 s of the unit suite's budget: one case of each test stays in it at
# W = 4, the others run in the slow session (every case runs at W = 2 in both).
SLOW = pytest.mark.slow
CAPPED = dataclasses.replace(MOE, capacity_factor=1.0)  # some copies dropped by capacity: the same ones


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("world", "moe", "chunks"),
    [(2, MOE, 1), pytest.param(4, MOE, 1, marks=SLOW), (2, CAPPED, 1), (4, CAPPED, 3)],
)
def test_replicas_and_a_covered_loss_leave_the_output_equal_to_the_plain_layer(world, moe, chunks):
    results = launch(_rank, world, 4, "covered", "reroute", moe, chunks, device="cpu", backend="gloo")
    for rank, r in enumerate(results):
        assert len(r["owner_P"]) == MOE.num_experts + 4
        assert r["local"] == tuple(p for p, w in enumerate(r["owner_P"]) if w == rank)
        assert rel_error(r["replicated"], r["healthy"]) <= 1e-6
        assert torch.isfinite(r["after"]).all()  # no token reached the NaN copy
        assert rel_error(r["after"], r["healthy"]) <= 1e-6
        assert r["lost_tokens"] == 0


NORMALIZED = dataclasses.replace(MOE, normalize_topk=True)


@pytest.mark.multiproc
@pytest.mark.parametrize(
    ("world", "on_loss", "redundant", "moe"),
    [
        *((2, o, n, MOE) for o, n in itertools.product(["reroute", "drop"], [0, 2])),
        *(pytest.param(4, o, n, MOE, marks=SLOW) for o, n in itertools.product(["reroute", "drop"], [0, 2])),
        (4, "reroute", 2, NORMALIZED),
    ],
)
def test_an_expert_with_no_live_copy_is_rerouted_or_dropped_as_documented(world, on_loss, redundant, moe):
    results = launch(_rank, world, redundant, "uncovered", on_loss, moe, device="cpu", backend="gloo")
    lost = 0
    for r in results:
        assert torch.isfinite(r["after"]).all()
        assert rel_error(r["after"], r["expected"]) <= 1e-5
        assert rel_error(r["after"], r["healthy"]) > 1e-3  # the loss does change the output
        lost += r["lost_tokens"]
    # tokens that chose expert 1 or 6 among their top 2, counted independently
    weights = init_weights(MOE, seed=3)
    want = 0
    for rank in range(world):
        probs = torch.softmax(_inputs(rank) @ weights.router_ED.T, -1)
        top = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, : MOE.top_k]
        want += int(((top == 1) | (top == 6)).any(1).sum())
    assert lost == want > 0


def test_plain_layout_is_the_identity():
    reps = plain((0, 1, 0, 1))
    assert reps.num_redundant == 0 and reps.logical_of_P == (0, 1, 2, 3)
    kept = torch.tensor([[3, 0, 2, 1], [1, 4, 0, 0]])
    assert torch.equal(split_counts(kept, reps), kept)
