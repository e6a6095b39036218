"""Overlap of the all-to-all with expert compute (``ParallelConfig.overlap_chunks``).

Chunked dispatch is a refinement of the serial one: the same copies, split per (rank, expert) by
``chunk_sizes``. The pipelined layer must match the serial layer (C = 1) within 1e-6 relative in
fp32, outputs and every gradient, and the fp64 reference at the documented tolerance, on 1, 2 and
4 gloo ranks, top-1 and top-2, dropless and with capacity, and with more chunks than some ranks
have rows (empty chunks). The pipeline's order of launches and waits is asserted directly.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.kinds.equivalence import TOLERANCE, Case, assemble, compare, run_cases, run_reference
from moebench.launch.spawn import launch
from runtime import MoEConfig, MoELayer, ParallelConfig, collective, init_weights
from runtime.permute import _permute_order_torch, chunk_sizes, permute_order, slot_of_expert

# ---------------------------------------------------------------------------------------------
# Chunking, pure


@given(st.lists(st.integers(0, 50), min_size=1, max_size=12), st.integers(1, 70))
def test_chunk_sizes_split_every_count_into_near_equal_parts(counts, chunks):
    parts = chunk_sizes(counts, chunks)
    assert parts.shape == (chunks, len(counts))
    assert parts.sum(0).tolist() == counts
    assert (parts >= 0).all()
    assert ((parts.max(0) - parts.min(0)) <= 1).all()


@settings(max_examples=60, deadline=None)
@given(st.data(), st.integers(1, 8), st.integers(1, 4), st.integers(1, 9))
def test_chunked_send_order_is_chunk_then_slot_then_token(data, num_experts, ep_size, chunks):
    top_k = data.draw(st.integers(1, num_experts))
    tokens = data.draw(st.integers(0, 20))
    rows = [torch.tensor(data.draw(st.permutations(range(num_experts)))[:top_k]) for _ in range(tokens)]
    ids_TK = torch.stack(rows) if rows else torch.empty(0, top_k, dtype=torch.long)
    keep_TK = torch.tensor(
        data.draw(st.lists(st.booleans(), min_size=tokens * top_k, max_size=tokens * top_k)), dtype=torch.bool
    )
    keep_TK = keep_TK.reshape(tokens, top_k)
    expert_to_rank = tuple(data.draw(st.integers(0, ep_size - 1)) for _ in range(num_experts))
    slot_E = slot_of_expert(expert_to_rank)
    kept_E = torch.bincount(ids_TK[keep_TK], minlength=num_experts)
    per_slot_S = torch.zeros_like(kept_E).index_copy_(0, slot_E, kept_E)
    order_P = permute_order(ids_TK, keep_TK, slot_E, per_slot_S, chunks).tolist()
    serial_P = permute_order(ids_TK, keep_TK, slot_E).tolist()
    # on CPU that is numpy's; the torch ops CUDA runs give the same orders
    assert _permute_order_torch(ids_TK, keep_TK, slot_E, per_slot_S, chunks).tolist() == order_P
    assert _permute_order_torch(ids_TK, keep_TK, slot_E, None, 1).tolist() == serial_P
    assert sorted(order_P) == sorted(serial_P)  # the same copies, each once
    # Rebuild the expected order: copy j of the n for a slot goes to chunk ceil((j+1)C/n) - 1
    flat_ids = ids_TK.reshape(-1)
    seen: dict[int, int] = {}
    keyed = []
    for p in serial_P:  # serial order: by slot, then token
        slot = int(slot_E[flat_ids[p]])
        j = seen.get(slot, 0)
        seen[slot] = j + 1
        n = int(per_slot_S[slot])
        keyed.append(((-(-(j + 1) * chunks // n)) - 1, slot, p))
    assert order_P == [p for _, _, p in sorted(keyed)]
    # chunk c holds exactly chunk_sizes' share of every slot
    sizes_CS = torch.from_numpy(chunk_sizes(per_slot_S.numpy(), chunks))
    got_CS = torch.zeros_like(sizes_CS)
    for chunk, slot, _ in keyed:
        got_CS[chunk, slot] += 1
    assert torch.equal(got_CS, sizes_CS)


def test_overlap_chunks_is_validated():
    with pytest.raises(ValueError, match=r"ParallelConfig\.overlap_chunks = 0 is invalid: accepted an integer >= 1"):
        ParallelConfig(overlap_chunks=0)


# ---------------------------------------------------------------------------------------------
# Equivalence: C > 1 against C = 1 and against the fp64 reference

CHUNKS = (1, 2, 4, 64)  # 64: more chunks than any (rank, expert) pair has copies, so most are empty
WORLD_SIZES = (1, 2, 4)


def _moe(**kw) -> MoEConfig:
    base = dict(hidden_size=16, ffn_hidden_size=32, num_experts=8, aux_loss_coef=0.1, z_loss_coef=0.01)
    return MoEConfig(**{**base, **kw})


def _cases() -> list[Case]:
    cases = []
    for k, cf, chunks in itertools.product((1, 2), (0.0, 1.25), CHUNKS):
        moe = _moe(top_k=k, capacity_factor=cf, activation="swiglu" if k == 2 else "gelu")
        base = f"top{k}-{'dropless' if cf == 0 else 'cap'}"
        cases.append(Case(f"{base}-C{chunks}", moe, par_extra={"overlap_chunks": chunks}))
    for chunks in (1, 3):  # two layers: every layer's async handles live through one backward
        extra = {"overlap_chunks": chunks}
        cases.append(Case(f"two-layers-C{chunks}", _moe(top_k=2, capacity_factor=1.25), par_extra=extra, layers=2))
        cases.append(Case(f"empty-rank-C{chunks}", _moe(top_k=2), par_extra=extra, empty_rank=True))
        a2a = {"dispatcher": "all_to_all"}  # the collective path at W = 1 too
        cases.append(Case(f"a2a-path-C{chunks}", _moe(top_k=2, capacity_factor=1.25), par_extra=extra, **a2a))
        # a grouped backend takes its rows expert-major: the chunks' reorders run (loop takes them as received)
        bmm = _moe(top_k=2, capacity_factor=1.25, activation="swiglu", expert_backend="bmm")
        cases.append(Case(f"bmm-backend-C{chunks}", bmm, par_extra=extra))
    return cases


CASES = _cases()
BY_NAME = {c.name: c for c in CASES}


def _serial_name(name: str) -> str:
    return name.rsplit("-C", 1)[0] + "-C1"


@pytest.fixture(scope="module")
def overlap_results():
    cache: dict[int, dict] = {}

    def get(world_size: int) -> dict:
        if world_size not in cache:
            per_rank = launch(run_cases, world_size, CASES, device="cpu", backend="gloo")
            cache[world_size] = {c.name: assemble([r[i] for r in per_rank]) for i, c in enumerate(CASES)}
        return cache[world_size]

    return get


def _marks(world_size: int) -> list:
    """Multi-rank cases are multiproc; the EP 4 launch (8 s of the unit suite's budget) runs in the slow session."""
    marks = [pytest.mark.multiproc] if world_size > 1 else []
    return [*marks, pytest.mark.slow] if world_size >= 4 else marks


PARAMS = [
    pytest.param(ws, c.name, id=f"ep{ws}-{c.name}", marks=_marks(ws))
    for ws in WORLD_SIZES
    for c in CASES
    if not c.name.endswith("-C1")
]


@pytest.mark.parametrize(("world_size", "name"), PARAMS)
def test_pipelined_layer_matches_the_serial_layer(world_size, name, overlap_results):
    results = overlap_results(world_size)
    errors = compare(results[name], results[_serial_name(name)])
    bad = {k: v for k, v in errors.items() if not v <= 1e-6}
    assert not bad, f"relative errors to C = 1 above 1e-6: {bad}"
    assert results[name].tokens_dropped == results[_serial_name(name)].tokens_dropped


@pytest.mark.parametrize(("world_size", "name"), PARAMS)
def test_pipelined_layer_matches_the_fp64_reference(world_size, name, overlap_results):
    errors = compare(overlap_results(world_size)[name], run_reference(BY_NAME[name]))
    tolerance = TOLERANCE[BY_NAME[name].moe.dtype]
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"relative errors to the fp64 reference above {tolerance}: {bad}"


# ---------------------------------------------------------------------------------------------
# The pipeline's schedule: what is in flight while a chunk computes


def _schedule_rank(ctx, chunks: int, transport: str) -> dict:
    """Forward and backward of one layer, logging every exchange's launch and wait (and every
    call into torch.distributed's all-to-all)."""
    import torch.distributed as dist

    log: list[tuple] = []
    launch_, wait_, a2a_ = collective._launch, collective.Pending.wait, dist.all_to_all_single

    def logged_launch(x, output_splits, input_splits, group, transport):
        pending = launch_(x, output_splits, input_splits, group, transport)
        pending.tag = len([e for e in log if e[0] == "launch"])
        log.append(("launch", pending.tag, tuple(output_splits), tuple(input_splits)))
        return pending

    def logged_wait(self):
        log.append(("wait", self.tag))
        return wait_(self)

    def logged_a2a(*args, **kwargs):
        log.append(("dist", kwargs.get("async_op")))
        return a2a_(*args, **kwargs)

    moe = _moe(top_k=2, capacity_factor=1.25)
    par = ParallelConfig(ep_size=ctx.world_size, overlap_chunks=chunks)
    layer = MoELayer(moe, par, ctx.group, ctx.device, transport=transport)
    layer.load_global_weights(init_weights(moe, seed=3))
    x_TD = torch.randn(24, moe.hidden_size, generator=torch.Generator().manual_seed(ctx.rank)).requires_grad_()
    collective._launch, collective.Pending.wait, dist.all_to_all_single = logged_launch, logged_wait, logged_a2a
    try:
        out = layer(x_TD)
        forward = list(log)
        out.out_TD.sum().backward()
    finally:
        collective._launch, collective.Pending.wait, dist.all_to_all_single = launch_, wait_, a2a_
    plan = layer.plan(x_TD.detach())
    meta = layer.dispatcher.plan(plan.routing.ids_TK, plan.keep_TK, plan.kept_WE, chunks)
    splits = [(tuple(c.output_splits), tuple(c.input_splits)) for c in meta.chunks]
    return {"forward": forward, "all": log, "splits": splits, "finite": bool(torch.isfinite(x_TD.grad).all())}


@pytest.mark.multiproc
def test_chunk_i_plus_1_is_in_flight_while_chunk_i_computes():
    chunks = 3
    for rank in launch(_schedule_rank, 2, chunks, "collective", device="cpu", backend="gloo"):
        got = rank["forward"]
        launches = [e for e in got if e[0] == "launch"]
        assert [e[2:] for e in launches] == [
            rank["splits"][0],
            rank["splits"][1],
            tuple(reversed(rank["splits"][0])),
            rank["splits"][2],
            tuple(reversed(rank["splits"][1])),
            tuple(reversed(rank["splits"][2])),
        ]
        order = [(e[0], e[1]) for e in got if e[0] in ("launch", "wait")]
        assert order == [
            ("launch", 0),  # dispatch 0
            ("launch", 1),  # dispatch 1, in flight while chunk 0 computes
            ("wait", 0),
            ("launch", 2),  # combine 0, in flight while chunk 1 computes
            ("launch", 3),  # dispatch 2
            ("wait", 1),
            ("launch", 4),  # combine 1
            ("wait", 3),
            ("launch", 5),  # combine 2
            ("wait", 2),
            ("wait", 4),
            ("wait", 5),
        ]
        assert all(e == ("dist", True) for e in got if e[0] == "dist")  # every collective is asynchronous
        assert sum(e[0] == "dist" for e in got) == 2 * chunks
        # backward: every exchange reversed, launched and waited once more
        backward = rank["all"][len(got) :]
        assert sum(e[0] == "launch" for e in backward) == 2 * chunks
        assert sum(e[0] == "wait" for e in backward) == 2 * chunks
        assert rank["finite"]


@pytest.mark.multiproc
def test_the_compute_only_transport_makes_no_collective():
    for rank in launch(_schedule_rank, 2, 2, "local_copy", device="cpu", backend="gloo"):
        assert not [e for e in rank["all"] if e[0] == "dist"]  # no all-to-all, forward or backward
        assert sum(e[0] == "launch" for e in rank["all"]) == 2 * 2 * 2  # the same exchanges, as copies
        assert rank["finite"]


def test_a_local_copy_has_the_received_size_and_the_sent_rows():
    x = torch.arange(12.0).reshape(6, 2)
    bigger = collective._launch(x, [4, 4], [3, 3], None, "local_copy").wait()
    assert bigger.shape == (8, 2)
    assert torch.equal(bigger[:6], x) and torch.equal(bigger[6:], torch.zeros(2, 2))
    smaller = collective._launch(x, [1, 2], [3, 3], None, "local_copy").wait()
    assert torch.equal(smaller, x[:3])
