"""Serving across ranks: the same seeded requests, request i on rank i mod W, give every request the
same outputs on one rank, at EP 2 and EP 4 (the experts split, tokens exchanged by all-to-all), and
in mode dp at W = 2 (every rank holds every expert, nothing exchanged), within ``SERVE_TOLERANCE``
(greedy tokens: equal); and a rank with no requests steps with empty batches until the others finish.

Each world size is launched once for all its layouts (spawning ranks costs seconds)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moebench.launch.spawn import launch
from runtime import ParallelConfig
from runtime.engine import Engine
from tests.serve_cases import SERVE_TOLERANCE, decoder, decoder_config, engine, outputs, rel_error, requests

# (input_len, output_len) of each request; request i arrives before step i // 2 of its rank's engine
SPECS = [(5, 4), (3, 6), (8, 2), (2, 5), (6, 3), (1, 4), (9, 2)]
SEED = 11
MAX_RUNNING, MAX_BATCH_TOKENS = 2, 5  # so that prompts are chunked and decodes mixed with prefills


def _serve(eng: Engine, mine: list[int], vocab: int, anyone_busy) -> tuple[dict, list[int]]:
    """Feed this rank's requests as they arrive and step while any rank has work (``anyone_busy``
    agrees on it over the group); each request's outputs, and the tokens of every step."""
    reqs = {r.id: r for r in requests(decoder_config(vocab), SPECS, SEED) if r.id in mine}
    arrivals = sorted(reqs, key=lambda i: i // 2)
    tokens, step = [], 0
    while anyone_busy(eng.has_work() or bool(arrivals)):
        while arrivals and arrivals[0] // 2 <= step:
            eng.add(reqs[arrivals.pop(0)])
        tokens.append(eng.step().tokens)
        step += 1
    assert all(r.done for r in reqs.values())
    return {i: outputs(r) for i, r in reqs.items()}, tokens


def _layout(ctx, ep: int, vocab: int, owner: str) -> tuple[dict, list[int]]:
    """This rank's part of one layout: EP ``ep`` over the world (1: mode dp, every expert here);
    ``owner``: "round_robin" (request i on rank i mod W) or "rank0" (every request on rank 0)."""
    group = ctx.group if ep > 1 else None
    model = decoder(decoder_config(vocab), ParallelConfig(ep_size=ep), group)
    ranks = [i % ctx.world_size if owner == "round_robin" else 0 for i in range(len(SPECS))]
    mine = [i for i, rank in enumerate(ranks) if rank == ctx.rank]

    def anyone_busy(busy: bool) -> bool:
        flag = torch.tensor([int(busy)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=ctx.group)
        return bool(flag.item())

    return _serve(engine(model, MAX_RUNNING, MAX_BATCH_TOKENS), mine, vocab, anyone_busy)


def _rank(ctx, layouts: list[tuple[str, int, int, str]]) -> dict:
    torch.set_num_threads(1)  # threads_per_rank 1: the ranks share this host's cores
    return {name: _layout(ctx, ep, vocab, owner) for name, ep, vocab, owner in layouts}


def _single_rank(vocab: int) -> dict:
    """Every request on one rank, in this process (W = 1, EP 1)."""
    eng = engine(decoder(decoder_config(vocab)), MAX_RUNNING, MAX_BATCH_TOKENS)
    return _serve(eng, list(range(len(SPECS))), vocab, lambda busy: busy)[0]


def _merge(per_rank: list[dict], name: str) -> dict:
    merged = {}
    for result in per_rank:
        merged.update(result[name][0])
    assert sorted(merged) == list(range(len(SPECS))), name
    return merged


def _assert_same_outputs(got: dict, ref: dict, vocab: int, name: str) -> None:
    for i, out in ref.items():
        if vocab:
            assert got[i].tolist() == out.tolist(), f"{name}: request {i}"
        else:
            assert rel_error(got[i], out) <= SERVE_TOLERANCE, f"{name}: request {i}"


@pytest.fixture(scope="module")
def single():
    return {vocab: _single_rank(vocab) for vocab in (0, 29)}


LAYOUTS_2 = [
    ("ep2", 2, 0, "round_robin"),
    ("dp2", 1, 0, "round_robin"),
    ("ep2-vocab", 2, 29, "round_robin"),
    ("ep2-rank1-idle", 2, 0, "rank0"),
]


@pytest.fixture(scope="module")
def world2():
    return launch(_rank, 2, LAYOUTS_2, device="cpu", backend="gloo")


@pytest.mark.multiproc
@pytest.mark.parametrize(("name", "vocab"), [(n, v) for n, _, v, _ in LAYOUTS_2])
def test_requests_served_at_w2_match_one_rank(world2, single, name, vocab):
    _assert_same_outputs(_merge(world2, name), single[vocab], vocab, name)


@pytest.mark.multiproc
def test_rank_without_requests_steps_empty_until_the_others_finish(world2):
    """EP 2 with every request on rank 0: rank 1 runs as many steps as rank 0, every one empty (it
    joins each MoE block's all-to-all with zero rows), and both stop together."""
    tokens0, tokens1 = (world2[rank]["ep2-rank1-idle"][1] for rank in (0, 1))
    assert len(tokens1) == len(tokens0) > 0
    assert set(tokens1) == {0}
    assert tokens0[-1] > 0  # the last step was rank 0's last decode: no step ran after the work ended
    assert world2[1]["ep2-rank1-idle"][0] == {}


@pytest.mark.multiproc
def test_round_robin_ranks_step_together_after_their_own_work_ends(world2):
    """Rank 1 holds 3 requests, rank 0 holds 4: both run the same number of steps; each rank's
    last steps may be empty, but not both ranks' at once."""
    steps = [world2[rank]["ep2"][1] for rank in (0, 1)]
    assert len(steps[0]) == len(steps[1])
    assert all(a or b for a, b in zip(*steps, strict=True))


@pytest.mark.multiproc
@pytest.mark.slow
def test_requests_served_at_ep4_match_one_rank(single):
    """EP 4 (one expert per rank), 7 requests round-robin: rank 3 holds one, and idles after it."""
    layouts = [("ep4", 4, 0, "round_robin"), ("ep4-vocab", 4, 29, "round_robin")]
    per_rank = launch(_rank, 4, layouts, device="cpu", backend="gloo")
    for name, _, vocab, _ in layouts:
        _assert_same_outputs(_merge(per_rank, name), single[vocab], vocab, name)
    steps = [len(result["ep4"][1]) for result in per_rank]
    assert len(set(steps)) == 1
    assert 0 in per_rank[3]["ep4"][1]  # rank 3 stepped empty while the others still worked
