"""Live expert re-placement (runtime/layer.py ``MoELayer(placement=)``, ``set_placement``): on gloo ranks, a
move puts every slot's logical expert's weights in place (bitwise), leaves the layer's outputs for the same
tokens bitwise unchanged (with the batch-invariant ``rowwise`` backend; at top_k = 3 only within rounding: the
bitwise test there is an expected failure naming the runtime's bug), sends the bytes its move plan says,
and changes the copies each rank receives as the placement says; training with copies matches the plain layer,
and a move carries AdamW's state with the weights. The ``rowwise`` backend itself (equal to ``loop``, and a
row's bits independent of the rows that share its run), the refusals, and the decoder with ``placements=``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moebench.launch.spawn import launch
from runtime import DecoderConfig, MoEConfig, ParallelConfig
from runtime.eplb import Placement, expert_moves, local_slots, rebalance, static_placement
from runtime.experts import expert_ffn
from runtime.layer import MoELayer
from runtime.model import MoEDecoder, decoder_weights
from runtime.reference import rel_error
from runtime.weights import MoEWeights, init_weights

SLOW = pytest.mark.slow

# ---------------------------------------------------------------------------------------------
# The rowwise backend (one process)


def _expert_weights(activation: str, experts: int = 3, d: int = 16, f: int = 24, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = 2 * f if activation == "swiglu" else f
    return torch.randn(experts, d, h, generator=gen) / d**0.5, torch.randn(experts, f, d, generator=gen) / f**0.5


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_rowwise_backend_equals_loop_within_fp32_tolerance_expert_major_and_in_runs(activation):
    w_in, w_down = _expert_weights(activation)
    x = torch.randn(19, 16, generator=torch.Generator().manual_seed(1))
    for counts, run_experts in (([5, 0, 14], None), ([3, 4, 2, 6, 4], [2, 0, 2, 1, 0])):
        want = expert_ffn(x, w_in, w_down, counts, activation, "loop", run_experts)
        got = expert_ffn(x, w_in, w_down, counts, activation, "rowwise", run_experts)
        assert got.shape == want.shape == (19, 16)
        assert rel_error(got, want) <= 1e-6  # measured ≤ 1.8e-7: both fp32, only the GEMMs' blocking differs
        # every row went through its own run's expert: another expert's output is far off
        swapped = [(l + 1) % 3 for l in run_experts] if run_experts else None
        other = expert_ffn(x, w_in, w_down, counts if swapped else [14, 5, 0], activation, "loop", swapped)
        assert rel_error(other, want) > 0.1


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_rowwise_backend_gives_a_row_the_same_bits_whatever_rows_share_its_run(activation):
    w_in, w_down = _expert_weights(activation, experts=2)
    row = torch.randn(1, 16, generator=torch.Generator().manual_seed(2))
    alone = expert_ffn(row, w_in, w_down, [0, 1], activation, "rowwise")
    for n in range(1, 21):  # the row's run (expert 1) is n rows long, the row at its start, middle and end
        others = torch.randn(n + 3, 16, generator=torch.Generator().manual_seed(100 + n))
        for pos in sorted({0, n // 2, n - 1}):
            x = torch.cat([others[:3], others[3 : 3 + pos], row, others[3 + pos : 2 + n]])  # 3 rows of expert 0
            out = expert_ffn(x, w_in, w_down, [3, n], activation, "rowwise")
            assert torch.equal(out[3 + pos], alone[0]), (n, pos)


# ---------------------------------------------------------------------------------------------
# Refusals that need no EP group

MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2)
SPARE = {2: 2, 4: 4}  # redundant slots per EP size: 5 slots per rank at W = 2, 3 at W = 4
TOKENS = 48


def test_a_placement_at_ep_size_1_and_set_placement_without_one_are_refused_naming_what_is_accepted():
    with pytest.raises(ValueError, match=r"placement at ep_size = 1 is refused: accepted with an EP group"):
        MoELayer(MOE, placement=static_placement(8, 1, 0))
    with pytest.raises(ValueError, match=r"placement = 'x' is invalid: accepted an eplb.Placement or None"):
        MoELayer(MOE, placement="x")
    layer = MoELayer(MOE)
    with pytest.raises(ValueError, match=r"set_placement needs a layer built with placement=: accepted then only"):
        layer.set_placement(static_placement(8, 1, 0))


# ---------------------------------------------------------------------------------------------
# On gloo ranks: one launch per world size moves a layer there and back, refusing bad placements first


def _weights(moe: MoEConfig) -> MoEWeights:
    """Seeded weights whose router favours experts 0, 1, 2: a skewed load for re-placement to balance."""
    w = init_weights(moe, seed=3)
    bias_E = torch.zeros(moe.num_experts)
    bias_E[:3] = torch.tensor([2.5, 1.5, 1.0])
    return MoEWeights(w.router_ED, w.w_in_EDH, w.w_down_EFD, bias_E)


def _inputs(rank: int, step: int = 0, moe: MoEConfig = MOE) -> torch.Tensor:
    return torch.randn(TOKENS, moe.hidden_size, generator=torch.Generator().manual_seed(1000 * step + rank))


def _refusal(layer: MoELayer, placement) -> str | None:
    """The message of ``set_placement``'s refusal (raised before any collective, on every rank alike)."""
    try:
        layer.set_placement(placement)
    except ValueError as err:
        return str(err)
    return None


def _slots(layer: MoELayer) -> dict:
    """This rank's slots: their physical and logical experts and their weights."""
    e = layer.experts
    return {"physical": e.physical_L, "logical": e.experts_L, "w_in": e.w_in_LDH.detach().clone(),
            "w_down": e.w_down_LFD.detach().clone()}  # fmt: skip


def _reversed(placement: Placement, ranks: int) -> Placement:
    """Every rank's slots in reverse order: each rank keeps its experts, every slot but a middle one takes
    another slot's expert (a local move reading a slot that another local move writes)."""
    logical = [
        e for r in range(ranks) for e in reversed([placement.logical_of_P[p] for p in local_slots(placement, r)])
    ]
    return Placement(tuple(logical), placement.owner_P)


# From the reversed static placement at W = 2 (rank 0: 6 4 2 1 0, rank 1: 7 5 3 1 0): rank 1 takes two copies of
# expert 6 (only rank 0 holds it) and rank 0 nothing, so rank 0 sends two experts and receives none.
LOPSIDED = Placement((0, 1, 2, 4, 4, 3, 5, 6, 6, 7), (0,) * 5 + (1,) * 5)


def _top_k_3(ctx, spare: int) -> list[torch.Tensor]:
    """A top-3 layer's outputs before and after a move to its load's EPLB placement (rowwise backend)."""
    W, moe = ctx.world_size, dataclasses.replace(MOE, top_k=3)
    layer = MoELayer(moe, ParallelConfig(ep_size=W), ctx.group, placement=static_placement(moe.num_experts, W, spare))
    layer.load_global_weights(_weights(moe))
    layer.set_schedule(expert_backend="rowwise")
    x = _inputs(ctx.rank)
    with torch.no_grad():
        before = layer(x)
        layer.set_placement(rebalance(before.counts_WE.sum(0).tolist(), W, spare))
        return [before.out_TD, layer(x).out_TD]


def _move_rank(ctx, spare: int) -> dict:
    """Refusals, then forward / move to the load's EPLB placement / forward / move back / forward / move to
    the reversed slots / forward."""
    W, moe = ctx.world_size, MOE
    static = static_placement(moe.num_experts, W, spare)
    layer = MoELayer(moe, ParallelConfig(ep_size=W), ctx.group, placement=static)
    layer.load_global_weights(_weights(moe))
    layer.set_schedule(expert_backend="rowwise")
    shifted = list(static.owner_P)
    shifted[shifted.index(1)] = 0  # rank 1's first slot to rank 0
    refused = {
        "missing": _refusal(layer, Placement(tuple(e % 7 for e in static.logical_of_P), static.owner_P)),
        "slots": _refusal(layer, Placement(static.logical_of_P, tuple(shifted))),
        "size": _refusal(layer, static_placement(moe.num_experts, W, spare + W)),
        "owners": _refusal(layer, Placement(static.logical_of_P, tuple(min(r, W - 2) for r in static.owner_P))),
        "type": _refusal(layer, static.logical_of_P),
    }
    kept_after_refusals = layer.replicas.logical_of_P, layer.replicas.owner_P
    x = _inputs(ctx.rank)
    with torch.no_grad():
        before = layer(x)
        new = rebalance(before.counts_WE.sum(0).tolist(), W, spare)
        sent = layer.set_placement(new)
        moved = _slots(layer)
        after = layer(x)
        sent_back = layer.set_placement(static)
        home = _slots(layer)
        back = layer(x)
        sent_reversed = layer.set_placement(_reversed(static, W))
        reversed_slots = _slots(layer)
        reversed_out = layer(x)
        sent_lopsided = layer.set_placement(LOPSIDED) if W == 2 else None
        lopsided_slots = _slots(layer)
        lopsided_out = layer(x)
    return {
        "top_k_3": _top_k_3(ctx, spare),
        "refused": refused,
        "kept": kept_after_refusals,
        "new": new,
        "sent": sent,
        "sent_back": sent_back,
        "moved": moved,
        "home": home,
        "sent_reversed": sent_reversed,
        "reversed": reversed_slots,
        "sent_lopsided": sent_lopsided,
        "lopsided": lopsided_slots,
        "out": [before.out_TD, after.out_TD, back.out_TD, reversed_out.out_TD, lopsided_out.out_TD],
        "kept_WE": [before.kept_WE, after.kept_WE],
        "received_W": [before.received_W, after.received_W],
    }


def _expected_received(kept_WE: torch.Tensor, placement: Placement, ranks: int) -> list[int]:
    """Copies each rank's slots receive: logical expert e's n kept copies cut into its m copies in physical
    order, copy i taking ⌊(i+1)·n/m⌋ − ⌊i·n/m⌋ (written here from the documented rule)."""
    out = [0] * ranks
    for e in range(kept_WE.shape[1]):
        n = int(kept_WE[:, e].sum())
        copies = [p for p, l in enumerate(placement.logical_of_P) if l == e]
        for i, p in enumerate(copies):
            out[placement.owner_P[p]] += (i + 1) * n // len(copies) - i * n // len(copies)
    return out


EXPERT_BYTES = (MOE.hidden_size * MOE.ffn_hidden_size * 2) * 4  # w_in [D, F] and w_down [F, D] in fp32 (gelu)


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=SLOW)])
def moved(request):
    W = request.param
    return W, launch(_move_rank, W, SPARE[W], device="cpu", backend="gloo")


@pytest.mark.multiproc
def test_bad_placements_are_refused_before_any_transfer_naming_what_is_accepted(moved):
    W, results = moved
    for r in results:
        msg = r["refused"]
        assert "covers logical experts [0, 1, 2, 3, 4, 5, 6]: accepted every one of 0..7" in msg["missing"]
        slots = (MOE.num_experts + SPARE[W]) // W
        assert f"rank 0 would hold {slots + 1} experts: accepted the {slots} it holds" in msg["slots"]
        accepted = f"accepted the old one's {MOE.num_experts + SPARE[W]} of 8"
        assert f"has {MOE.num_experts + SPARE[W] + W} physical experts of 8 logical ones: {accepted}" in msg["size"]
        assert f"owners {list(range(W - 1))}: accepted every rank of {W}" in msg["owners"]
        assert "accepted a runtime.eplb.Placement" in msg["type"]
        assert r["kept"] == (static_placement(8, W, SPARE[W]).logical_of_P, static_placement(8, W, SPARE[W]).owner_P)


@pytest.mark.multiproc
def test_after_a_move_every_slot_holds_its_logical_experts_global_weights_bitwise(moved):
    W, results = moved
    weights, new = _weights(MOE), results[0]["new"]
    assert all(r["new"] == new for r in results)  # the counts are group-wide: every rank computes the same
    static = static_placement(MOE.num_experts, W, SPARE[W])
    assert new != static  # the skewed load does move experts
    for rank, r in enumerate(results):
        placements = [("moved", new), ("home", static), ("reversed", _reversed(static, W))]
        for key, placement in placements + ([("lopsided", LOPSIDED)] if W == 2 else []):
            slots = r[key]
            assert slots["physical"] == tuple(local_slots(placement, rank))
            assert slots["logical"] == tuple(placement.logical_of_P[p] for p in local_slots(placement, rank))
            for l, e in enumerate(slots["logical"]):
                assert torch.equal(slots["w_in"][l], weights.w_in_EDH[e]), (key, rank, l, e)
                assert torch.equal(slots["w_down"][l], weights.w_down_EFD[e]), (key, rank, l, e)


@pytest.mark.multiproc
def test_with_the_rowwise_backend_the_outputs_are_bitwise_equal_before_and_after_each_move(moved):
    _, results = moved
    for r in results:
        before, *moved_outs = r["out"]
        assert before.abs().sum() > 0
        for out in moved_outs:
            assert torch.equal(out, before)


@pytest.mark.multiproc
def test_with_top_3_the_outputs_are_bitwise_equal_before_and_after_a_move(moved):
    """K >= 3: the combine sums a token's copies in k order (runtime/permute.py), not in the send order a
    move changes (with index_add_ in send order they differed by 3.5e-8 relative at W = 2)."""
    _, results = moved
    for before, after in (r["top_k_3"] for r in results):
        assert torch.equal(after, before)


@pytest.mark.multiproc
def test_a_move_sends_each_slot_from_another_rank_as_one_whole_expert_and_nothing_else(moved):
    W, results = moved
    static, new = static_placement(MOE.num_experts, W, SPARE[W]), results[0]["new"]
    for old, placement, key in ((static, new, "sent"), (new, static, "sent_back")):
        moves = expert_moves(old, placement, W)
        remote = [m for m in moves if m.src_rank != m.dst_rank]
        assert remote  # something crosses ranks
        for rank, r in enumerate(results):
            assert r[key] == sum(m.src_rank == rank for m in remote) * EXPERT_BYTES
        assert sum(r[key] for r in results) == len(remote) * EXPERT_BYTES
    assert [r["sent_reversed"] for r in results] == [0] * W  # every rank held its experts: local copies only
    if W == 2:  # a move whose bytes differ between the ranks
        assert [r["sent_lopsided"] for r in results] == [2 * EXPERT_BYTES, 0]


@pytest.mark.multiproc
def test_received_copies_follow_the_placement_and_rebalance_lowers_the_busiest_rank(moved):
    W, results = moved
    static, new = static_placement(MOE.num_experts, W, SPARE[W]), results[0]["new"]
    for r in results:
        for kept, received, placement in zip(r["kept_WE"], r["received_W"], (static, new), strict=True):
            assert received.tolist() == _expected_received(kept, placement, W)
            assert int(received.sum()) == W * TOKENS * MOE.top_k  # dropless: every copy is received
        assert torch.equal(r["kept_WE"][0], r["kept_WE"][1])  # the same tokens route the same way
    received_static, received_new = results[0]["received_W"]
    # the skew made the static placement's busiest rank busier: measured 100 -> 98 copies at W = 2, 166 -> 102 at W = 4
    assert max(received_new) < max(received_static)


# ---------------------------------------------------------------------------------------------
# Training on gloo ranks: copies against the plain layer, and a move carrying AdamW's state

STEPS_BEFORE, STEPS_AFTER, LR = 3, 2, 1e-3
STATE = ("exp_avg", "exp_avg_sq")


def _train_step(layers, optimizers, x, target_TD) -> list[torch.Tensor]:
    """One AdamW step of every layer on the same tokens (the group's loss: the sum of the ranks')."""
    outs = []
    for layer, opt in zip(layers, optimizers, strict=True):
        opt.zero_grad()
        out_TD = layer(x).out_TD
        (out_TD - target_TD).square().sum().backward()
        layer.reduce_replicated_grads()
        opt.step()
        outs.append(out_TD.detach())
    return outs


def _expert_state(layer: MoELayer, opt: torch.optim.Optimizer) -> dict:
    """This rank's slots: logical expert, weights, gradients and AdamW moments of both expert weights."""
    e, out = layer.experts, {"logical": layer.experts.experts_L}
    for name, p in (("w_in", e.w_in_LDH), ("w_down", e.w_down_LFD)):
        out[name], out[f"{name}.grad"] = p.detach().clone(), None if p.grad is None else p.grad.clone()
        for key in STATE:
            out[f"{name}.{key}"] = opt.state[p][key].clone()
    return out


def _train_rank(ctx, spare: int) -> dict:
    """A plain layer and two placed layers (spare slots: copies) trained alike; then the placed ones move to
    the load's EPLB placement, one with its optimizer, one without; then all train on."""
    W, moe = ctx.world_size, MOE
    weights, static = _weights(moe), static_placement(moe.num_experts, W, spare)
    par = ParallelConfig(ep_size=W)
    layers = [MoELayer(moe, par, ctx.group), *(MoELayer(moe, par, ctx.group, placement=static) for _ in range(2))]
    for layer in layers:
        layer.load_global_weights(weights)
    optimizers = [torch.optim.AdamW(layer.parameters(), lr=LR) for layer in layers]
    target = torch.randn(TOKENS, moe.hidden_size, generator=torch.Generator().manual_seed(7 + ctx.rank))
    outs = [_train_step(layers, optimizers, _inputs(ctx.rank, step), target) for step in range(STEPS_BEFORE)]
    with torch.no_grad():
        loads = layers[1](_inputs(ctx.rank)).counts_WE.sum(0).tolist()
    new = rebalance(loads, W, spare)
    before = _expert_state(layers[1], optimizers[1])
    sent = [layers[1].set_placement(new, optimizers[1]), layers[2].set_placement(new)]
    after = [_expert_state(layer, opt) for layer, opt in zip(layers[1:], optimizers[1:], strict=True)]
    steps = range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER)
    outs += [_train_step(layers, optimizers, _inputs(ctx.rank, step), target) for step in steps]
    plain = layers[0].experts
    return {
        "new": new,
        "sent": sent,
        "before": before,
        "after": after,
        "outs": outs,
        "plain": {"logical": plain.experts_L, "w_in": plain.w_in_LDH.detach(), "w_down": plain.w_down_LFD.detach()},
        "placed": _expert_state(layers[1], optimizers[1]),
        "routers": [layer.router.weight_ED.detach() for layer in layers],
    }


def _by_logical(states: list[dict], key: str) -> dict[int, torch.Tensor]:
    """Logical expert -> the tensor ``key`` of its copies, over every rank's slots, after asserting that every
    copy holds the same bits."""
    out: dict[int, torch.Tensor] = {}
    for s in states:
        for l, e in enumerate(s["logical"]):
            if e in out:
                assert torch.equal(s[key][l], out[e]), (key, e)
            out.setdefault(e, s[key][l])
    return out


def _mismatched_slots(before: list[dict], after: list[dict]) -> list[tuple[int, int, str]]:
    """(rank, slot, tensor) of every slot whose tensor is not its logical expert's from before the move."""
    wrong = []
    for key in ("w_in", "w_down", *(f"{w}.{k}" for w in ("w_in", "w_down") for k in STATE)):
        want = _by_logical(before, key)
        for rank, s in enumerate(after):
            wrong += [(rank, l, key) for l, e in enumerate(s["logical"]) if not torch.equal(s[key][l], want[e])]
    return wrong


@pytest.fixture(scope="module", params=[2, pytest.param(4, marks=SLOW)])
def trained(request):
    W = request.param
    return W, launch(_train_rank, W, SPARE[W], device="cpu", backend="gloo")


# The placed layer's experts differ from the plain layer's by fp32 rounding only (the copies' gradients are
# summed in another order, and their tokens are computed in other batches): measured over these steps at W = 2
# and 4, outputs ≤ 4.1e-8, expert weights ≤ 6.5e-9, router 0; moved without the optimizer, 1.7e-3 and 6.9e-3.
TRAIN_TOLERANCE = 1e-5


@pytest.mark.multiproc
def test_copies_trained_with_summed_gradients_match_the_plain_layer_and_stay_bitwise_identical(trained):
    _, results = trained
    assert len(results[0]["outs"]) == STEPS_BEFORE + STEPS_AFTER
    for r in results:
        for plain_out, placed_out, _ in r["outs"]:
            assert rel_error(placed_out, plain_out) <= TRAIN_TOLERANCE
        assert rel_error(r["routers"][1], r["routers"][0]) <= TRAIN_TOLERANCE
    for key in ("w_in", "w_down"):
        plain = _by_logical([r["plain"] for r in results], key)
        placed = _by_logical([r["placed"] for r in results], key)  # asserts the copies are bitwise identical
        assert sorted(placed) == sorted(plain) == list(range(MOE.num_experts))
        for e in plain:
            assert rel_error(placed[e], plain[e]) <= TRAIN_TOLERANCE, (key, e)
        initial = getattr(_weights(MOE), "w_in_EDH" if key == "w_in" else "w_down_EFD")
        assert all(rel_error(plain[e], initial[e]) > 1e-4 for e in plain)  # every expert did train


@pytest.mark.multiproc
def test_a_move_with_the_optimizer_carries_each_experts_adamw_state_to_its_new_slots_and_drops_gradients(trained):
    W, results = trained
    before = [r["before"] for r in results]
    with_opt, without = [r["after"][0] for r in results], [r["after"][1] for r in results]
    new = results[0]["new"]
    assert new != static_placement(MOE.num_experts, W, SPARE[W])
    for rank, s in enumerate(with_opt):
        assert s["logical"] == tuple(new.logical_of_P[p] for p in local_slots(new, rank))
    assert _mismatched_slots(before, with_opt) == []
    assert all(s[f"{w}.grad"] is None for s in (*with_opt, *without) for w in ("w_in", "w_down"))  # old slots'
    assert all(s[f"{w}.grad"] is not None for s in before for w in ("w_in", "w_down"))
    # without the optimizer the weights move but the moments stay in their old slots: the same
    # comparison catches it, in every slot whose expert changed
    wrong = _mismatched_slots(before, without)
    assert wrong and {key for _, _, key in wrong} == {f"{w}.{k}" for w in ("w_in", "w_down") for k in STATE}
    moved = {(rank, l) for rank, (b, a) in enumerate(zip(before, without, strict=True))
             for l in range(len(a["logical"])) if a["logical"][l] != b["logical"][l]}  # fmt: skip
    assert {(rank, l) for rank, l, _ in wrong} == moved
    # bytes: a slot from another rank carries its weights and (with the optimizer) two moments, no gradient
    remote = [
        m for m in expert_moves(static_placement(MOE.num_experts, W, SPARE[W]), new, W) if m.src_rank != m.dst_rank
    ]
    for rank, r in enumerate(results):
        count = sum(m.src_rank == rank for m in remote)
        assert r["sent"] == [count * EXPERT_BYTES * 3, count * EXPERT_BYTES]


@pytest.mark.multiproc
def test_training_on_after_a_move_still_matches_the_plain_layer_and_not_without_the_moved_state(trained):
    _, results = trained
    for r in results:
        for plain_out, placed_out, _ in r["outs"][STEPS_BEFORE:]:
            assert rel_error(placed_out, plain_out) <= TRAIN_TOLERANCE
    # the layer moved without its optimizer's state steps its experts with other experts' moments
    last = [r["outs"][-1] for r in results]
    assert max(rel_error(stale, plain) for plain, _, stale in last) > 10 * TRAIN_TOLERANCE


# ---------------------------------------------------------------------------------------------
# The decoder with placements (W = 2)

DECODER_MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, activation="swiglu")
DECODER = DecoderConfig(DECODER_MOE, layers=3, attention_heads=4, kv_heads=2, dense_layers=1, shared_experts=1)
DECODER_PLACEMENTS = [
    static_placement(4, 2, redundant=2),  # rank 0: 0 1 2 | rank 1: 0 1 3
    Placement((0, 0, 3, 1, 2, 2), (0, 0, 0, 1, 1, 1)),  # two copies of 0 on rank 0, of 2 on rank 1
]


def _decoder_rank(ctx) -> dict:
    """The unplaced decoder and one with a placement per MoE block on the same sequence, before and after
    moving every block's placement; and a placement list of the wrong length."""
    weights, par = decoder_weights(DECODER, seed=1), ParallelConfig(ep_size=ctx.world_size)
    x = torch.randn(12, DECODER.hidden, generator=torch.Generator().manual_seed(20 + ctx.rank))
    plain = MoEDecoder(DECODER, weights, par, ctx.group)
    placed = MoEDecoder(DECODER, weights, par, ctx.group, placements=DECODER_PLACEMENTS)
    try:
        MoEDecoder(DECODER, weights, par, ctx.group, placements=DECODER_PLACEMENTS[:1])
        refused = None
    except ValueError as err:
        refused = str(err)
    layouts = [(layer.replicas.logical_of_P, layer.replicas.owner_P) for layer in placed.moe_layers]
    with torch.no_grad():
        want, got = plain.full(x), placed.full(x)
        for layer, placement in zip(placed.moe_layers, reversed(DECODER_PLACEMENTS), strict=True):
            layer.set_placement(placement)
        moved = placed.full(x)
    return {"want": want, "got": got, "moved": moved, "layouts": layouts, "refused": refused,
            "moe_layers": [len(plain.moe_layers), len(placed.moe_layers)]}  # fmt: skip


@pytest.mark.multiproc
def test_a_decoder_with_placements_equals_the_unplaced_one_before_and_after_a_move():
    results = launch(_decoder_rank, 2, device="cpu", backend="gloo")
    moe_blocks = sum(DECODER.is_moe(l) for l in range(DECODER.layers))
    assert moe_blocks == 2
    for r in results:
        assert r["moe_layers"] == [moe_blocks, moe_blocks]
        assert r["layouts"] == [(p.logical_of_P, p.owner_P) for p in DECODER_PLACEMENTS]
        assert rel_error(r["got"], r["want"]) <= 1e-5
        assert rel_error(r["moved"], r["want"]) <= 1e-5
        assert "got 1 placements: accepted one per MoE block (2)" in r["refused"]
