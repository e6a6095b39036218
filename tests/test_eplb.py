"""EPLB's rule (runtime/eplb.py): hand-worked replication and packing, the invariants of every placement,
never busier than the static placement, its distance from the exhaustive optimum on small cases, the
hierarchical variant keeping a group on one node, the issue's target on Zipf loads, and the move plan between
two placements (``expert_moves``: hand-worked, and on random placements it rebuilds the new one exactly)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.eplb import (
    LoadWindow,
    Move,
    Placement,
    balanced_packing,
    expert_moves,
    local_slots,
    rebalance,
    replicate,
    static_placement,
)


def test_spare_slots_go_one_at_a_time_to_the_highest_load_per_copy():
    assert replicate([10, 1, 1, 1], 6) == [3, 1, 1, 1]  # 10 > 1, then 10/2 = 5 > 1
    assert replicate([4, 3, 1, 1], 6) == [2, 2, 1, 1]  # 4, then 3 > 4/2
    assert replicate([2, 2, 1], 4) == [2, 1, 1]  # a tie goes to the lower id
    assert replicate([5, 1], 2) == [1, 1]  # no spare slot


def test_packing_puts_the_heaviest_first_on_the_lightest_pack_with_room():
    # 5 -> A, 4 -> B, 3 -> B (4 < 5), 3 -> A (5 < 7), 3 -> B (7 < 8; B full), 2 -> A
    assert balanced_packing([5, 4, 3, 3, 3, 2], 2) == [0, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="do not divide"):
        balanced_packing([1, 2, 3], 2)


def test_static_placement_is_round_robin_with_spares_copying_experts_in_turn():
    p = static_placement(4, 2, redundant=2)
    assert p.owner_P == (0, 0, 0, 1, 1, 1)
    # round-robin: rank 0 {0, 2}, rank 1 {1, 3}; spare copies of 0 then 1, each where it has no copy yet
    assert p.logical_of_P == (0, 1, 2, 0, 1, 3)
    assert p.copies_E == (2, 2, 1, 1)


def _optimum(loads: list[float], ranks: int, redundant: int) -> float:
    """The smallest busiest-rank load over every split of the slots into copies and every assignment of
    the physical experts to ranks with S slots each (loads split evenly over copies)."""
    E, P = len(loads), len(loads) + redundant
    S, best = P // ranks, math.inf
    for extra in itertools.combinations_with_replacement(range(E), redundant):
        copies = [1 + extra.count(e) for e in range(E)]
        items = sorted((loads[e] / copies[e] for e in range(E) for _ in range(copies[e])), reverse=True)
        best = min(best, _best_split(items, ranks, S))
    return best


def _best_split(items: list[float], ranks: int, slots: int) -> float:
    """Min over assignments of ``items`` to ``ranks`` bins of exactly ``slots`` items of the largest bin."""
    best = [math.inf]

    def go(i: int, loads: list[float], room: list[int]):
        if max(loads) >= best[0]:
            return
        if i == len(items):
            best[0] = max(loads)
            return
        seen = set()
        for r in range(ranks):
            if room[r] and (loads[r], room[r]) not in seen:  # equal bins are interchangeable
                seen.add((loads[r], room[r]))
                loads[r] += items[i]
                room[r] -= 1
                go(i + 1, loads, room)
                loads[r] -= items[i]
                room[r] += 1

    go(0, [0.0] * ranks, [slots] * ranks)
    return best[0]


def _cases():
    rng = np.random.default_rng(0)
    for E, W, R in [(4, 2, 0), (4, 2, 2), (6, 2, 2), (6, 3, 0), (6, 3, 3), (4, 4, 4), (8, 4, 0), (6, 4, 2)]:
        for _ in range(6):
            yield E, W, R, [float(x) for x in rng.zipf(1.5, E).clip(max=50)]


def test_the_rule_is_within_40_percent_of_the_exhaustive_optimum_and_never_worse_than_static_on_small_cases():
    gaps = []
    for E, W, R, loads in _cases():
        placed = max(rebalance(loads, W, R).rank_loads(loads, W))
        best = _optimum(loads, W, R)
        static = max(static_placement(E, W, R).rank_loads(loads, W))
        assert best <= placed + 1e-9 <= static + 2e-9, (E, W, R, loads)
        gaps.append(placed / best)
    # measured on these 48 cases: optimal in 31 (65 %), median 1.0, worst 1.36 (greedy packing with equal
    # slot counts per rank; the exhaustive search also chooses the copies)
    assert max(gaps) <= 1.4
    assert sum(g <= 1 + 1e-9 for g in gaps) >= 30


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda W: st.tuples(
            st.just(W),
            st.integers(1, 4).map(lambda k: k * W),  # P = k·W slots
        )
    ),
    st.data(),
)
def test_every_placement_fills_every_slot_gives_every_expert_a_copy_and_keeps_the_loads(shape, data):
    W, P = shape
    E = data.draw(st.integers(1, P))
    loads = data.draw(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=E, max_size=E))
    p = rebalance(loads, W, P - E)
    assert len(p.logical_of_P) == P and sorted(set(p.logical_of_P)) == list(range(E))
    assert [p.owner_P.count(r) for r in range(W)] == [P // W] * W
    assert list(p.owner_P) == sorted(p.owner_P)  # rank-major
    assert sum(p.rank_loads(loads, W)) == pytest.approx(sum(loads), rel=1e-9, abs=1e-9)  # nothing lost
    static = static_placement(E, W, P - E)
    assert max(p.rank_loads(loads, W)) <= max(static.rank_loads(loads, W)) + 1e-9


def test_hierarchical_keeps_each_expert_group_on_one_node_and_balances_the_nodes():
    loads = [9.0, 8, 1, 1, 7, 6, 1, 1, 2, 2, 2, 2, 1, 1, 1, 1]  # 4 groups of 4
    p = rebalance(loads, 4, redundant=4, nodes=2, groups=4)
    node_of = [r // 2 for r in p.owner_P]
    for g in range(4):
        nodes = {n for e, n in zip(p.logical_of_P, node_of, strict=True) if e // 4 == g}
        assert len(nodes) == 1, (g, nodes)
    node_load = [sum(loads[e] / p.copies_E[e] for e, n in zip(p.logical_of_P, node_of, strict=True) if n == k)
                 for k in range(2)]  # fmt: skip
    assert node_load == pytest.approx([23.0, 23.0])  # groups 19, 15, 8, 4: 19 | 15, then 8 -> 15, 4 -> 19
    assert max(p.rank_loads(loads, 4)) <= max(static_placement(16, 4, 4).rank_loads(loads, 4))


def test_zipf_1_2_over_16_experts_at_ep_4_with_4_spares_reaches_balancedness_0_9():
    """The issue's target, on the loads themselves (expected shares of Zipf(1.2) over 16 ranks of popularity)."""
    shares = [1 / (i + 1) ** 1.2 for i in range(16)]
    loads = [1000 * s / sum(shares) for s in shares]
    eplb, static = rebalance(loads, 4, redundant=4), static_placement(16, 4, redundant=4)
    assert eplb.balancedness(loads, 4) >= 0.9
    assert static.balancedness(loads, 4) < 0.75  # measured: static 0.70, the rule 0.99 (no spares: 0.54, 0.61)


def test_bad_sizes_are_refused_naming_the_value_and_what_is_accepted():
    with pytest.raises(ValueError, match=r"experts \+ redundant = 5 \+ 0 is invalid with 2 ranks"):
        rebalance([1.0] * 5, 2)
    with pytest.raises(ValueError, match="nodes = 3 is invalid with 4 ranks: accepted a divisor"):
        rebalance([1.0] * 8, 4, nodes=3)
    with pytest.raises(ValueError, match=r"loads .* are invalid: accepted numbers >= 0"):
        rebalance([1.0, -1.0], 2)
    with pytest.raises(ValueError, match="redundant = -1 is invalid"):
        rebalance([1.0] * 4, 2, redundant=-1)


def test_placement_balancedness_is_mean_over_max():
    p = Placement((0, 1, 2, 3), (0, 0, 1, 1))
    assert p.balancedness([3.0, 1.0, 1.0, 1.0], 2) == pytest.approx(3 / 4)  # ranks 4 and 2: mean 3, max 4


def test_the_load_window_sums_exactly_the_last_window_steps_of_every_layer():
    rng = np.random.default_rng(1)
    steps = [rng.integers(0, 50, size=(2, 4)).tolist() for _ in range(9)]
    window = LoadWindow(layers=2, experts=4, window=3)
    for i, step in enumerate(steps):
        window.record(step)
        last = np.asarray(steps[max(0, i - 2) : i + 1]).sum(axis=0).tolist()
        assert window.loads() == last and window.steps == min(i + 1, 3)


def test_the_load_window_refuses_a_step_of_another_shape_and_a_bad_size():
    window = LoadWindow(layers=2, experts=4, window=3)
    with pytest.raises(ValueError, match=r"got 1 layers of \[4\] experts: accepted 2 layers of 4"):
        window.record([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="window = 0 is invalid"):
        LoadWindow(layers=1, experts=4, window=0)
    assert window.loads() == [[0] * 4, [0] * 4] and window.steps == 0  # the refused step left no trace


# ---------------------------------------------------------------------------------------------
# The move plan between two placements


def test_moves_of_a_hand_worked_case_copy_locally_where_the_rank_held_the_expert():
    old = static_placement(4, 2, redundant=2)  # rank 0: 0 1 2, rank 1: 0 1 3 (local slots 0 1 2)
    new = Placement((0, 3, 3, 1, 2, 2), (0, 0, 0, 1, 1, 1))
    assert expert_moves(old, new, 2) == [
        Move(0, 0, 0, 0),  # expert 0 stays in rank 0's slot 0
        Move(0, 1, 1, 2),  # expert 3: only rank 1 held it, in its slot 2
        Move(0, 2, 1, 2),  # its second copy comes from the same slot
        Move(1, 0, 1, 1),  # expert 1: rank 1 held it in slot 1, a local copy to slot 0
        Move(1, 1, 0, 2),  # expert 2: from rank 0's slot 2
        Move(1, 2, 0, 2),
    ]


def test_moves_take_an_expert_from_the_lowest_holder_and_its_first_slot_of_it():
    # rank 0: 0 1 | rank 1: 2 2 | rank 2: 1 2
    old = Placement((0, 1, 2, 2, 1, 2), (0, 0, 1, 1, 2, 2))
    # rank 0: 0 2 | rank 1: 1 2 | rank 2: 0 2
    new = Placement((0, 2, 1, 2, 0, 2), (0, 0, 1, 1, 2, 2))
    assert expert_moves(old, new, 3) == [
        Move(0, 0, 0, 0),  # local
        Move(0, 1, 1, 0),  # expert 2 held by ranks 1 (slots 0, 1) and 2: rank 1, its first slot
        Move(1, 0, 0, 1),  # expert 1 held by ranks 0 and 2: rank 0
        Move(1, 1, 1, 0),  # local: rank 1's first slot of expert 2
        Move(2, 0, 0, 0),  # expert 0: only rank 0
        Move(2, 1, 2, 1),  # local
    ]


def test_moves_refuse_a_placement_that_changes_slot_counts_or_the_experts():
    old = static_placement(4, 2, redundant=2)
    with pytest.raises(ValueError, match="rank 0 would hold 4 experts: accepted the 3 it holds"):
        expert_moves(old, Placement((0, 1, 2, 3, 0, 1), (0, 0, 0, 0, 1, 1)), 2)
    with pytest.raises(ValueError, match="has 8 physical experts of 4 logical ones: accepted the old one's 6 of 4"):
        expert_moves(old, static_placement(4, 2, redundant=4), 2)
    with pytest.raises(ValueError, match="has 6 physical experts of 3 logical ones: accepted the old one's 6 of 4"):
        expert_moves(old, Placement((0, 1, 2, 0, 1, 2), (0, 0, 0, 1, 1, 1)), 2)


@st.composite
def _placement(draw, experts: int, ranks: int, slots: int) -> Placement:
    """Every logical expert at least once, the other slots any expert, S slots per rank (rank-major)."""
    extra = draw(
        st.lists(st.integers(0, experts - 1), min_size=ranks * slots - experts, max_size=ranks * slots - experts)
    )
    logical = draw(st.permutations(list(range(experts)) + extra))
    owner = [p // slots for p in range(ranks * slots)]
    return Placement(tuple(logical), tuple(owner))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.data())
def test_applying_the_moves_to_the_old_slots_yields_exactly_the_new_placement(ranks, slots, data):
    experts = data.draw(st.integers(1, ranks * slots))
    old = data.draw(_placement(experts, ranks, slots))
    new = data.draw(_placement(experts, ranks, slots))
    before = [[old.logical_of_P[p] for p in local_slots(old, r)] for r in range(ranks)]
    after = [[None] * slots for _ in range(ranks)]
    moves = expert_moves(old, new, ranks)
    assert [(m.dst_rank, m.dst_slot) for m in moves] == [(r, s) for r in range(ranks) for s in range(slots)]
    for m in moves:
        e = before[m.src_rank][m.src_slot]
        after[m.dst_rank][m.dst_slot] = e
        holders = [r for r in range(ranks) if e in before[r]]
        # local when the rank held it, else the lowest holder; always the source's first slot of it
        assert m.src_rank == (m.dst_rank if m.dst_rank in holders else holders[0])
        assert m.src_slot == before[m.src_rank].index(e)
    assert after == [[new.logical_of_P[p] for p in local_slots(new, r)] for r in range(ranks)]
