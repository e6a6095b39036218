"""Expert placement: which rank of the EP group owns each expert.

A placement is a tuple ``expert_to_rank`` of length E. Four strategies, those of the seed plan
``000_cf094d85390e5056.txt``:

- ``round_robin``: expert e on rank e mod W.
- ``contiguous``: experts split into W consecutive blocks, the first E mod W blocks one larger.
- ``load_balanced``: greedy bin-packing (longest processing time first): experts sorted by
  descending load (ties: lower id first), each put on the least-loaded rank that still has a
  free slot; ties go to the rank with fewer experts, then the lower rank, so zero-load experts
  still spread out and every rank gets one.
- ``custom``: an explicit map, validated.

Every strategy honours ``max_experts_per_rank`` (default ceil(E/W)); a layout that cannot fit
raises ``ValueError``. A rank's local experts are its global expert ids in ascending order.
"""

from __future__ import annotations

import math

from runtime.config import MoEConfig, ParallelConfig


def _slots_per_rank(num_experts: int, ep_size: int, max_experts_per_rank: int | None) -> int:
    slots = max_experts_per_rank if max_experts_per_rank is not None else math.ceil(num_experts / ep_size)
    if slots * ep_size < num_experts:
        raise ValueError(
            f"ParallelConfig.max_experts_per_rank = {max_experts_per_rank!r} is invalid: "
            f"{num_experts} experts do not fit on {ep_size} ranks x {slots} slots; "
            f"accepted max_experts_per_rank >= {math.ceil(num_experts / ep_size)}"
        )
    return slots


def round_robin(num_experts: int, ep_size: int) -> tuple[int, ...]:
    return tuple(e % ep_size for e in range(num_experts))


def contiguous(num_experts: int, ep_size: int) -> tuple[int, ...]:
    base, extra = divmod(num_experts, ep_size)
    owner = []
    for rank in range(ep_size):
        owner += [rank] * (base + (1 if rank < extra else 0))
    return tuple(owner)


def load_balanced(loads: tuple[float, ...], ep_size: int, slots: int) -> tuple[int, ...]:
    owner = [0] * len(loads)
    rank_load = [0.0] * ep_size
    rank_used = [0] * ep_size
    for e in sorted(range(len(loads)), key=lambda e: (-loads[e], e)):
        free = [r for r in range(ep_size) if rank_used[r] < slots]
        rank = min(free, key=lambda r: (rank_load[r], rank_used[r], r))
        owner[e] = rank
        rank_load[rank] += loads[e]
        rank_used[rank] += 1
    return tuple(owner)


def place_experts(moe: MoEConfig, par: ParallelConfig) -> tuple[int, ...]:
    """Return ``expert_to_rank`` for the layer, or raise ``ValueError`` if it cannot be placed."""
    num_experts, ep_size = moe.num_experts, par.ep_size
    if num_experts < ep_size:
        raise ValueError(
            f"ParallelConfig.ep_size = {ep_size} is invalid: every rank must own an expert; "
            f"accepted ep_size <= num_experts ({num_experts})"
        )
    slots = _slots_per_rank(num_experts, ep_size, par.max_experts_per_rank)
    if par.placement == "round_robin":
        owner = round_robin(num_experts, ep_size)
    elif par.placement == "contiguous":
        owner = contiguous(num_experts, ep_size)
    elif par.placement == "load_balanced":
        if len(par.expert_loads) != num_experts:
            raise ValueError(
                f"ParallelConfig.expert_loads has {len(par.expert_loads)} entries: "
                f"accepted one load per expert ({num_experts})"
            )
        owner = load_balanced(par.expert_loads, ep_size, slots)
    else:
        owner = par.expert_to_rank
        if len(owner) != num_experts:
            raise ValueError(
                f"ParallelConfig.expert_to_rank has {len(owner)} entries: accepted one rank per expert ({num_experts})"
            )
    counts = [owner.count(r) for r in range(ep_size)]
    if max(counts) > slots or min(counts) == 0:
        raise ValueError(
            f"ParallelConfig.expert_to_rank = {owner!r} is invalid: experts per rank {counts}; "
            f"accepted between 1 and {slots} experts on every rank"
        )
    return owner


def local_experts(expert_to_rank: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """Global ids of the experts ``rank`` owns, ascending: local expert i is the i-th of them."""
    return tuple(e for e, r in enumerate(expert_to_rank) if r == rank)
