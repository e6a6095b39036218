"""EPLB's rule (runtime/eplb.py): hand-worked replication and packing, the invariants of every placement,
never busier than the static placement, its distance from the exhaustive optimum on small cases, the
hierarchical variant keeping a group on one node, and the issue's target on Zipf loads."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.eplb import LoadWindow, Placement, balanced_packing, rebalance, replicate, static_placement


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
