"""Expert re-placement from measured load (EPLB): which logical experts get the spare slots, and which rank
holds each physical expert, so that the busiest rank's load is as small as the rule can make it.

Shape legend: E = logical experts, W = ranks, N = nodes, R = redundant (spare) slots, P = E + R physical
experts, S = P / W slots per rank.

The rule is DeepSeek's EPLB as its authors describe it (github.com/deepseek-ai/EPLB, written here from
that description):
 1. replicate: the R spare slots go, one at a time, to the logical expert with the highest load per copy
    (ties: the lower id), so a very hot expert can get several copies. A logical expert's load is split
    evenly over its copies (the runtime's split of copies differs from even by at most one token).
 2. pack: the P physical experts, heaviest first, each to the rank with the lowest load among those with a
    free slot (ties: the lower rank): every rank ends with exactly S experts.
Hierarchical (N > 1 nodes and ``groups`` expert groups with groups % N == 0, the experts of a group
contiguous): first the groups are packed onto nodes by total load (groups / N each, the same greedy), so a
group's tokens never leave its node; then each node replicates its own experts into its P / N slots and
packs them onto its W / N ranks. Otherwise the whole group is one node.

Greedy packing is not optimal in general (the cardinality-constrained problem is NP-hard); the rule's
answer is compared with an exhaustive search on small cases in the tests. ``rebalance`` never returns a
placement with a busier busiest rank than ``static_placement`` (the placement made without any load) on
the same loads: where the rule would, it keeps the static one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """Where each physical expert lives: ``logical_of_P[p]`` is its logical expert, ``owner_P[p]`` its rank.
    Physical experts are ordered rank-major (rank 0's S slots first), logical id ascending within a rank."""

    logical_of_P: tuple[int, ...]
    owner_P: tuple[int, ...]

    @property
    def copies_E(self) -> tuple[int, ...]:
        """Copies of each logical expert."""
        counts = [0] * (max(self.logical_of_P) + 1)
        for e in self.logical_of_P:
            counts[e] += 1
        return tuple(counts)

    def rank_loads(self, loads_E: Sequence[float], ranks: int) -> list[float]:
        """Each rank's load: Σ over its physical experts of load_e / copies_e."""
        copies, out = self.copies_E, [0.0] * ranks
        for e, r in zip(self.logical_of_P, self.owner_P, strict=True):
            out[r] += loads_E[e] / copies[e]
        return out

    def balancedness(self, loads_E: Sequence[float], ranks: int) -> float:
        """Mean over max tokens per rank (vLLM's balancedness; 1 is perfect)."""
        loads = self.rank_loads(loads_E, ranks)
        return sum(loads) / len(loads) / max(loads) if max(loads) > 0 else 1.0


def _check(num_experts: int, ranks: int, redundant: int, nodes: int = 1) -> int:
    """Slots per rank, after refusing what cannot be placed."""
    for name, value, least in (("experts", num_experts, 1), ("ranks", ranks, 1), ("nodes", nodes, 1),
                               ("redundant", redundant, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"eplb {name} = {value!r} is invalid: accepted an integer >= {least}")
    if (num_experts + redundant) % ranks:
        raise ValueError(
            f"eplb experts + redundant = {num_experts} + {redundant} is invalid with {ranks} ranks: accepted a "
            "multiple of ranks (every rank holds the same number of slots)"
        )
    if ranks % nodes:
        raise ValueError(f"eplb nodes = {nodes} is invalid with {ranks} ranks: accepted a divisor of ranks")
    return (num_experts + redundant) // ranks


def replicate(loads_E: Sequence[float], slots: int) -> list[int]:
    """Copies of each logical expert filling ``slots`` (>= E): one each, then each spare slot to the expert
    with the highest load per copy (ties: the lower id)."""
    copies = [1] * len(loads_E)
    for _ in range(slots - len(loads_E)):
        e = max(range(len(loads_E)), key=lambda i: (loads_E[i] / copies[i], -i))
        copies[e] += 1
    return copies


def balanced_packing(weights: Sequence[float], packs: int) -> list[int]:
    """The pack of each item: heaviest first (ties: the lower index), each to the lightest pack with room
    (ties: the lower pack), every pack taking exactly len(weights) / packs items."""
    if len(weights) % packs:
        raise ValueError(f"balanced_packing: {len(weights)} items do not divide into {packs} equal packs")
    room, load, pack_of = [len(weights) // packs] * packs, [0.0] * packs, [0] * len(weights)
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        p = min((p for p in range(packs) if room[p]), key=lambda p: (load[p], p))
        pack_of[i], room[p], load[p] = p, room[p] - 1, load[p] + weights[i]
    return pack_of


def _placement(items: list[tuple[int, int]]) -> Placement:
    """(logical, rank) pairs -> a ``Placement``, rank-major then logical id."""
    items = sorted(items, key=lambda item: (item[1], item[0]))
    return Placement(tuple(e for e, _ in items), tuple(r for _, r in items))


def _place_node(loads_E: Sequence[float], experts: list[int], slots: int, ranks: list[int]) -> list[tuple[int, int]]:
    """Replicate ``experts`` into ``slots`` and pack them onto ``ranks``: (logical, rank) pairs."""
    copies = replicate([loads_E[e] for e in experts], slots)
    physical = [(e, loads_E[e] / n) for e, n in zip(experts, copies, strict=True) for _ in range(n)]
    pack_of = balanced_packing([w for _, w in physical], len(ranks))
    return [(e, ranks[p]) for (e, _), p in zip(physical, pack_of, strict=True)]


def static_placement(num_experts: int, ranks: int, redundant: int = 0) -> Placement:
    """The placement made without any load: expert e on rank e mod W (round-robin), and the spare slots
    holding copies of experts 0, 1, ... in turn, each on the rank with a free slot that holds fewest
    copies of it (ties: the lower rank)."""
    slots = _check(num_experts, ranks, redundant)
    items, free = [(e, e % ranks) for e in range(num_experts)], [slots] * ranks
    for _, r in items:
        free[r] -= 1
    for i in range(redundant):
        e = i % num_experts
        r = min((r for r in range(ranks) if free[r]), key=lambda r: (sum(1 for x in items if x == (e, r)), r))
        items.append((e, r))
        free[r] -= 1
    return _placement(items)


def rebalance(loads_E: Sequence[float], ranks: int, redundant: int = 0, nodes: int = 1,
              groups: int | None = None) -> Placement:  # fmt: skip
    """The EPLB placement for measured ``loads_E`` (module docstring); hierarchical when ``nodes`` > 1 and
    ``groups`` is a multiple of it that divides E. Never busier at its busiest rank than
    ``static_placement`` on the same loads."""
    E = len(loads_E)
    slots = _check(E, ranks, redundant, nodes)
    if any(not (x >= 0) for x in loads_E):
        raise ValueError(f"eplb loads = {list(loads_E)!r} are invalid: accepted numbers >= 0")
    hierarchical = nodes > 1 and groups is not None and groups % nodes == 0 and E % groups == 0
    if hierarchical and (slots * ranks) % nodes == 0:
        size = E // groups
        group_loads = [sum(loads_E[g * size : (g + 1) * size]) for g in range(groups)]
        node_of_group = balanced_packing(group_loads, nodes)
        per_node = ranks // nodes
        items = []
        for n in range(nodes):
            experts = [e for g in range(groups) if node_of_group[g] == n for e in range(g * size, (g + 1) * size)]
            items += _place_node(loads_E, experts, slots * per_node, list(range(n * per_node, (n + 1) * per_node)))
    else:
        items = _place_node(loads_E, list(range(E)), slots * ranks, list(range(ranks)))
    placed, static = _placement(items), static_placement(E, ranks, redundant)
    if max(placed.rank_loads(loads_E, ranks)) > max(static.rank_loads(loads_E, ranks)):
        return static
    return placed


@dataclass(frozen=True)
class Move:
    """Where one slot of the new placement gets its expert's weights: ``dst_rank``'s local slot ``dst_slot``
    from ``src_rank``'s local slot ``src_slot`` of the old placement (``src_rank == dst_rank``: a local copy,
    nothing sent). A rank's local slots are its physical experts in physical order."""

    dst_rank: int
    dst_slot: int
    src_rank: int
    src_slot: int


def local_slots(placement: Placement, rank: int) -> list[int]:
    """The physical experts ``rank`` holds, in physical order: local slot l is the l-th of them."""
    return [p for p, r in enumerate(placement.owner_P) if r == rank]


def expert_moves(old: Placement, new: Placement, ranks: int) -> list[Move]:
    """One ``Move`` per slot of ``new``, ordered by (dst_rank, dst_slot). A slot takes its logical expert
    from the same rank when the rank held it before (no transfer), else from the lowest rank that held it
    (its first slot of it). Every rank computes the same list from the two placements alone."""
    if len(old.logical_of_P) != len(new.logical_of_P) or set(old.logical_of_P) != set(new.logical_of_P):
        raise ValueError(
            f"eplb move: the new placement has {len(new.logical_of_P)} physical experts of "
            f"{len(set(new.logical_of_P))} logical ones: accepted the old one's {len(old.logical_of_P)} of "
            f"{len(set(old.logical_of_P))}"
        )
    held = []  # per rank: logical expert -> its first local slot in the old placement
    for r in range(ranks):
        first: dict[int, int] = {}
        for slot, p in enumerate(local_slots(old, r)):
            first.setdefault(old.logical_of_P[p], slot)
        held.append(first)
    moves = []
    for r in range(ranks):
        old_count, new_slots = len(local_slots(old, r)), local_slots(new, r)
        if len(new_slots) != old_count:
            raise ValueError(
                f"eplb move: rank {r} would hold {len(new_slots)} experts: accepted the {old_count} it holds "
                "(re-placement keeps every rank's slot count)"
            )
        for slot, p in enumerate(new_slots):
            e = new.logical_of_P[p]
            src = r if e in held[r] else min(q for q in range(ranks) if e in held[q])
            moves.append(Move(r, slot, src, held[src][e]))
    return moves


class LoadWindow:
    """Routed copies per layer and expert over the last ``window`` steps: what ``rebalance`` re-places from.

    ``record`` takes one step's copies per expert of every layer, summed over the EP group (a layer's
    ``MoEOutput.counts_WE.sum(0)``: the counts are on the host already, so recording adds no sync). The
    window's totals are kept as a running sum, so ``loads`` costs nothing per step."""

    def __init__(self, layers: int, experts: int, window: int):
        for name, value in (("layers", layers), ("experts", experts), ("window", window)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"LoadWindow {name} = {value!r} is invalid: accepted an integer >= 1")
        self.layers, self.experts = layers, experts
        self._steps: deque[tuple[tuple[int, ...], ...]] = deque(maxlen=window)
        self._sum = [[0] * experts for _ in range(layers)]

    def record(self, counts_LE: Sequence[Sequence[int]]) -> None:
        """One step's copies per expert, for every layer."""
        step = tuple(tuple(int(c) for c in layer) for layer in counts_LE)
        if len(step) != self.layers or any(len(layer) != self.experts for layer in step):
            shape = f"{len(step)} layers of {sorted({len(layer) for layer in step})} experts"
            raise ValueError(f"LoadWindow.record got {shape}: accepted {self.layers} layers of {self.experts}")
        if len(self._steps) == self._steps.maxlen:  # the oldest step leaves the window
            for totals, old in zip(self._sum, self._steps[0], strict=True):
                for e, c in enumerate(old):
                    totals[e] -= c
        self._steps.append(step)
        for totals, new in zip(self._sum, step, strict=True):
            for e, c in enumerate(new):
                totals[e] += c

    @property
    def steps(self) -> int:
        """Steps in the window now (at most ``window``)."""
        return len(self._steps)

    def loads(self) -> list[list[int]]:
        """Per layer, each expert's copies summed over the window."""
        return [list(totals) for totals in self._sum]


__all__ = [
    "LoadWindow",
    "Move",
    "Placement",
    "balanced_packing",
    "expert_moves",
    "local_slots",
    "rebalance",
    "replicate",
    "static_placement",
]
