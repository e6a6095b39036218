"""Expert placement strategies: hand-computed layouts, slot limits and the placement invariants."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import MoEConfig, ParallelConfig
from runtime.placement import contiguous, load_balanced, local_experts, place_experts, round_robin


def place(num_experts: int, ep_size: int, placement: str, **par) -> tuple[int, ...]:
    return place_experts(MoEConfig(8, 16, num_experts), ParallelConfig(ep_size=ep_size, placement=placement, **par))


def experts_per_rank(owner: tuple[int, ...], ep_size: int) -> list[int]:
    return [owner.count(r) for r in range(ep_size)]


def max_rank_load(owner: tuple[int, ...], loads: tuple[float, ...], ep_size: int) -> float:
    return max(sum(load for load, r in zip(loads, owner, strict=True) if r == rank) for rank in range(ep_size))


# ---------------------------------------------------------------------------------------------
# round_robin and contiguous


def test_round_robin_puts_expert_e_on_rank_e_mod_w():
    assert round_robin(8, 3) == (0, 1, 2, 0, 1, 2, 0, 1)
    assert place(8, 3, "round_robin") == (0, 1, 2, 0, 1, 2, 0, 1)


def test_contiguous_splits_experts_into_equal_consecutive_blocks():
    assert contiguous(8, 2) == (0, 0, 0, 0, 1, 1, 1, 1)
    assert place(8, 4, "contiguous") == (0, 0, 1, 1, 2, 2, 3, 3)


def test_contiguous_gives_the_first_e_mod_w_blocks_one_extra_expert():
    owner = place(10, 4, "contiguous")
    assert owner == (0, 0, 0, 1, 1, 1, 2, 2, 3, 3)
    assert experts_per_rank(owner, 4) == [3, 3, 2, 2]


# ---------------------------------------------------------------------------------------------
# load_balanced


def test_load_balanced_matches_the_hand_computed_greedy_lpt_layout():
    # Sorted by load: e0 10, e4 9, e5 2, e6 2, e7 2, e1 1, e2 1, e3 1. Rank loads after each step:
    # e0->r0 (10,0)  e4->r1 (10,9)  e5->r1 (10,11)  e6->r0 (12,11)  e7->r1 (12,13)
    # e1->r0 (13,13)  e2->r0 on the tie (14,13), r0 now full  e3->r1 (14,14)
    loads = (10, 1, 1, 1, 9, 2, 2, 2)
    owner = place(8, 2, "load_balanced", expert_loads=loads, max_experts_per_rank=4)
    assert owner == (0, 0, 0, 1, 1, 1, 0, 1)
    assert max_rank_load(owner, loads, 2) == 14


def test_load_balanced_honours_the_slot_limit_over_the_least_loaded_rank():
    # e0 -> r0 (8); e1, e2 -> r1 (1, 2); e3 would go to r1 (load 2 < 8) but r1 is full at 2 slots.
    assert load_balanced((8.0, 1.0, 1.0, 1.0), ep_size=2, slots=2) == (0, 1, 1, 0)
    assert load_balanced((8.0, 1.0, 1.0, 1.0), ep_size=2, slots=3) == (0, 1, 1, 1)
    assert place(4, 2, "load_balanced", expert_loads=(8, 1, 1, 1)) == (0, 1, 1, 0)
    assert place(4, 2, "load_balanced", expert_loads=(8, 1, 1, 1), max_experts_per_rank=3) == (0, 1, 1, 1)


def test_load_balanced_breaks_equal_loads_toward_lower_rank_and_lower_expert_id():
    assert load_balanced((5.0, 5.0, 5.0, 5.0), ep_size=2, slots=2) == (0, 1, 0, 1)


def test_load_balanced_max_rank_load_beats_round_robin_on_skewed_loads():
    loads = (100.0, 1.0, 90.0, 1.0, 80.0, 1.0, 70.0, 1.0)
    balanced = place(8, 2, "load_balanced", expert_loads=loads)
    assert max_rank_load(round_robin(8, 2), loads, 2) == 340.0
    assert max_rank_load(balanced, loads, 2) == 172.0  # {100, 70, 1, 1} vs {90, 80, 1, 1}


@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_experts=st.integers(1, 20))
def test_load_balanced_never_exceeds_slots_and_stays_within_the_greedy_bound(data, num_experts):
    ep_size = data.draw(st.integers(1, num_experts))
    slots = math.ceil(num_experts / ep_size) + data.draw(st.integers(0, num_experts))
    loads = tuple(data.draw(st.lists(st.floats(0.5, 1000), min_size=num_experts, max_size=num_experts)))
    owner = load_balanced(loads, ep_size, slots)
    assert len(owner) == num_experts
    assert max(experts_per_rank(owner, ep_size)) <= slots
    if slots >= num_experts:  # slots never bind: greedy list scheduling's bound, max <= mean + largest
        assert max_rank_load(owner, loads, ep_size) <= sum(loads) / ep_size + max(loads) + 1e-9


def test_load_balanced_gives_every_rank_an_expert_when_some_loads_are_zero():
    owner = place(5, 4, "load_balanced", expert_loads=(1, 0, 0, 0, 0))
    assert min(experts_per_rank(owner, 4)) >= 1


# ---------------------------------------------------------------------------------------------
# custom, local_experts, EP = E


def test_custom_placement_is_returned_as_given():
    assert place(6, 3, "custom", expert_to_rank=(2, 0, 1, 1, 0, 2)) == (2, 0, 1, 1, 0, 2)


def test_custom_placement_may_use_extra_slots_when_the_limit_allows_it():
    assert place(4, 2, "custom", expert_to_rank=(0, 0, 0, 1), max_experts_per_rank=3) == (0, 0, 0, 1)


def test_local_experts_are_the_ranks_global_ids_in_ascending_order():
    owner = (2, 0, 1, 1, 0, 2, 0)
    assert local_experts(owner, 0) == (1, 4, 6)
    assert local_experts(owner, 1) == (2, 3)
    assert local_experts(owner, 2) == (0, 5)


@pytest.mark.parametrize("placement", ["round_robin", "contiguous", "load_balanced", "custom"])
def test_ep_size_equal_to_num_experts_gives_each_rank_exactly_one_expert(placement):
    extra = {
        "load_balanced": {"expert_loads": (3, 9, 1, 4, 7)},
        "custom": {"expert_to_rank": (4, 2, 0, 3, 1)},
    }.get(placement, {})
    owner = place(5, 5, placement, **extra)
    assert sorted(owner) == [0, 1, 2, 3, 4]
    if placement in ("round_robin", "contiguous"):
        assert owner == (0, 1, 2, 3, 4)
    if placement == "load_balanced":
        assert owner == (3, 0, 4, 2, 1)  # heaviest expert (e1) on rank 0, lightest (e2) on rank 4


# ---------------------------------------------------------------------------------------------
# The placement invariant, for every strategy


@st.composite
def layouts(draw):
    """A placement request that has a valid answer: E, W <= E, a slot limit and a strategy."""
    num_experts = draw(st.integers(1, 24))
    ep_size = draw(st.integers(1, num_experts))
    fit = math.ceil(num_experts / ep_size)
    max_per_rank = draw(st.none() | st.integers(fit, fit + 3))
    placement = draw(st.sampled_from(["round_robin", "contiguous", "load_balanced", "custom"]))
    extra = {}
    if placement == "load_balanced":
        loads = st.floats(0.0, 1e6, allow_nan=False)  # zero loads included: they must still spread out
        extra["expert_loads"] = tuple(draw(st.lists(loads, min_size=num_experts, max_size=num_experts)))
    if placement == "custom":
        extra["expert_to_rank"] = tuple(draw(st.permutations(contiguous(num_experts, ep_size))))
    return num_experts, ep_size, max_per_rank, placement, extra


@settings(max_examples=150, deadline=None)
@given(layout=layouts())
def test_every_strategy_covers_each_expert_once_with_one_to_slots_experts_per_rank(layout):
    num_experts, ep_size, max_per_rank, placement, extra = layout
    slots = max_per_rank if max_per_rank is not None else math.ceil(num_experts / ep_size)
    owner = place(num_experts, ep_size, placement, max_experts_per_rank=max_per_rank, **extra)
    assert len(owner) == num_experts
    assert all(0 <= r < ep_size for r in owner)
    assert all(1 <= n <= slots for n in experts_per_rank(owner, ep_size))
    every_rank = [e for rank in range(ep_size) for e in local_experts(owner, rank)]
    assert sorted(every_rank) == list(range(num_experts))
