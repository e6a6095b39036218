"""Redundant experts and failover: replicas of the busiest experts, and routing around lost ones.

Logical and physical experts. The router picks among E *logical* experts. With N redundant
experts a layer holds P = E + N *physical* experts: physical p < E is logical expert p in its
placed home (the primary), physical E + i is the i-th replica. ``logical_of_P[p]`` names the
logical expert of each physical one, and the dispatcher places the physical experts
(``owner_P``). Every copy of one logical expert has the same weights, so which copy computes a
token changes nothing in the output: a layer with replicas equals the plain layer.

Which experts get replicas (``replicate``): DeepSeek's EPLB rule for choosing replicas, one
at a time, each to the logical expert with the highest measured load per copy (ties: lower id),
so a very hot expert can get several. Where a replica goes: the rank with the lowest load that
holds no copy of that expert, where a rank's load is Σ over its physical experts of load_e /
copies_e (ties: fewer physical experts, then the lower rank). EPLB's hierarchical packing, which
also moves the primaries, is not done: the primaries stay where the placement put them.

How a replicated expert's copies are split (``split_counts``, ``physical_ids``). The kept copies
of logical expert e over the whole EP group, in global token order (rank 0's tokens first, the
order capacity uses), are cut into m_e contiguous blocks, m_e its live copies in physical order:
block i = copies ⌊i·n/m⌋ … ⌊(i+1)·n/m⌋ − 1 of the n, served by the i-th live copy. Every rank
derives every rank's share from the exchanged W×E counts alone, so the split needs no extra
communication, and the copies of e differ in load by at most one token.

Lost experts. ``alive_P`` marks the physical experts that still serve. A logical expert with a
live copy loses nothing: its blocks go to the live copies (failover). A logical expert with none
is *unavailable*, and ``on_loss`` decides its copies' fate:

- ``"reroute"``: the token keeps its choices that are still available, and each lost one is
  replaced by its next-best available expert not chosen yet (``reroute``), whose combine weight is
  its own softmax probability (the softmax over all E experts is not redone); the K weights are
  renormalised to sum to 1 when ``normalize_topk`` is set, as for any token;
- ``"drop"``: the copy is dropped like a capacity drop: weight 0, the token's other copies keep
  their weights.

A layer gets replicas at construction (``MoELayer(redundancy=RedundancyConfig(...))``): its
dispatcher places the physical experts and its experts are ``ReplicatedExperts``, the physical
experts this rank holds, each computing with its logical expert's weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from runtime.experts import GroupedExperts

ON_LOSS = ("reroute", "drop")


@dataclass(frozen=True)
class RedundancyConfig:
    """``redundant`` replicas of the experts with the highest ``loads_E`` (measured loads, one per
    logical expert, the same on every rank so every rank builds the same layout; ``replicate``)."""

    loads_E: tuple[float, ...]  # measured load of each logical expert (copies routed to it)
    redundant: int  # replicas to add, >= 0

    def __post_init__(self):
        loads = tuple(self.loads_E)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in loads)
        if not numbers or not all(math.isfinite(v) and v >= 0 for v in loads):
            raise ValueError(f"RedundancyConfig.loads_E = {self.loads_E!r} is invalid: accepted finite numbers >= 0")
        object.__setattr__(self, "loads_E", tuple(float(v) for v in loads))
        if isinstance(self.redundant, bool) or not isinstance(self.redundant, int) or self.redundant < 0:
            raise ValueError(f"RedundancyConfig.redundant = {self.redundant!r} is invalid: accepted an integer >= 0")


def check_on_loss(on_loss: str) -> str:
    """``on_loss`` itself, or a ``ValueError`` naming what is accepted."""
    if on_loss not in ON_LOSS:
        raise ValueError(f"on_loss = {on_loss!r} is invalid: accepted one of {', '.join(map(repr, ON_LOSS))}")
    return on_loss


@dataclass(frozen=True)
class Replicas:
    """Physical experts of one layer: each one's logical expert and its rank, and which are alive."""

    logical_of_P: tuple[int, ...]
    owner_P: tuple[int, ...]
    alive_P: tuple[bool, ...]

    @functools.cached_property  # read on every forward: computed once per layout
    def num_logical(self) -> int:
        return max(self.logical_of_P) + 1  # every logical expert has a copy

    @property
    def num_redundant(self) -> int:
        return len(self.logical_of_P) - self.num_logical

    @functools.cached_property
    def copies_E(self) -> tuple[int, ...]:
        """Copies of each logical expert (alive or not)."""
        counts = [0] * self.num_logical
        for e in self.logical_of_P:
            counts[e] += 1
        return tuple(counts)

    @functools.cached_property
    def identity(self) -> bool:
        """Physical expert p is logical expert p (no replicas, nothing re-placed): dispatch needs no remap."""
        return all(p == e for p, e in enumerate(self.logical_of_P))

    @functools.cached_property
    def all_alive(self) -> bool:
        return all(self.alive_P)

    @functools.cached_property
    def _live(self) -> tuple[tuple[int, ...], ...]:
        live = [[] for _ in range(self.num_logical)]
        for p, e in enumerate(self.logical_of_P):
            if self.alive_P[p]:
                live[e].append(p)
        return tuple(map(tuple, live))

    def live_copies(self, e: int) -> tuple[int, ...]:
        """The physical experts that serve logical expert ``e``, in physical order."""
        return self._live[e]

    def available_E(self) -> torch.Tensor:
        """True for the logical experts with a live copy (host)."""
        return torch.tensor([bool(live) for live in self._live])

    def with_alive(self, alive_P) -> Replicas:
        alive = tuple(bool(a) for a in alive_P)
        if len(alive) != len(self.logical_of_P):
            want = len(self.owner_P)
            raise ValueError(f"alive_P has {len(alive)} entries: accepted one per physical expert ({want})")
        return Replicas(self.logical_of_P, self.owner_P, alive)


def plain(expert_to_rank: tuple[int, ...]) -> Replicas:
    """No redundancy: physical = logical, every expert alive."""
    n = len(expert_to_rank)
    return Replicas(tuple(range(n)), tuple(expert_to_rank), (True,) * n)


def replicate(loads_E, expert_to_rank: tuple[int, ...], ep_size: int, redundant: int) -> Replicas:
    """``redundant`` replicas, chosen and placed by the module docstring's rule."""
    loads = [float(v) for v in loads_E]
    num = len(loads)
    if len(expert_to_rank) != num:
        raise ValueError(f"loads_E has {num} entries: accepted one per expert ({len(expert_to_rank)})")
    logical, owner = list(range(num)), list(expert_to_rank)
    copies, holders = [1] * num, [{expert_to_rank[e]} for e in range(num)]
    for _ in range(redundant):
        open_E = [e for e in range(num) if len(holders[e]) < ep_size]
        if not open_E:
            raise ValueError(
                f"redundant_experts = {redundant} is invalid: every expert is already on all {ep_size} ranks "
                f"after {len(logical) - num}; accepted at most {num * (ep_size - 1)}"
            )
        e = max(open_E, key=lambda e: (loads[e] / copies[e], -e))
        rank_load, rank_count = [0.0] * ep_size, [0] * ep_size
        for p, l in enumerate(logical):
            rank_load[owner[p]] += loads[l] / copies[l]
            rank_count[owner[p]] += 1
        rank = min((r for r in range(ep_size) if r not in holders[e]), key=lambda r: (rank_load[r], rank_count[r], r))
        logical.append(e)
        owner.append(rank)
        copies[e] += 1
        holders[e].add(rank)
    return Replicas(tuple(logical), tuple(owner), (True,) * len(logical))


def _blocks(n: int, m: int) -> np.ndarray:
    """Block bounds of n copies over m live copies: bound i = ⌊i·n/m⌋, i = 0..m."""
    return np.arange(m + 1) * n // m


def split_counts(kept_WE: torch.Tensor, replicas: Replicas) -> torch.Tensor:
    """Copies each rank sends to each *physical* expert [W, P] from the logical ``kept_WE`` (host).
    A logical expert without a live copy must have no kept copies (rerouted or dropped before)."""
    kept = kept_WE.numpy().astype(np.int64)
    out = np.zeros((kept.shape[0], len(replicas.logical_of_P)), dtype=np.int64)
    for e in range(kept.shape[1]):
        live, n = replicas.live_copies(e), int(kept[:, e].sum())
        if not live:
            if n:
                raise ValueError(f"logical expert {e} has {n} kept copies but no live copy")
            continue
        bounds = _blocks(n, len(live))
        start_W = np.cumsum(kept[:, e]) - kept[:, e]
        end_W = start_W + kept[:, e]
        lo, hi = bounds[:-1][None, :], bounds[1:][None, :]
        out[:, live] = np.clip(np.minimum(hi, end_W[:, None]) - np.maximum(lo, start_W[:, None]), 0, None)
    return torch.from_numpy(out)


def physical_ids(
    ids_TK: torch.Tensor, keep_TK: torch.Tensor, kept_WE: torch.Tensor, rank: int, replicas: Replicas
) -> torch.Tensor:
    """The physical expert of each of this rank's copies [T, K] (a dropped copy's is its primary's
    home, and it is not sent). Copy j of logical expert e in global token order goes to live copy
    ⌈(j+1)·m/n⌉ − 1, the block of ``split_counts``."""
    num = kept_WE.shape[1]
    kept = kept_WE.numpy().astype(np.int64)
    width = max(len(replicas.live_copies(e)) for e in range(num)) or 1
    table_EM = np.tile(np.arange(num)[:, None], (1, width))  # unavailable experts: their primary
    m_E = np.ones(num, dtype=np.int64)
    for e in range(num):
        live = replicas.live_copies(e)
        if live:
            table_EM[e, : len(live)], m_E[e] = live, len(live)
    n_E = np.maximum(kept.sum(0), 1)
    offset_E = kept[:rank].sum(0)
    device = ids_TK.device
    flat = ids_TK.reshape(-1)
    keep = keep_TK.reshape(-1)
    # position of each kept copy among this rank's kept copies of its expert, in token order
    key = torch.where(keep, flat, torch.full_like(flat, num))  # dropped copies sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num + 1)
    starts = torch.cumsum(counts, 0) - counts
    pos = torch.empty_like(flat)
    pos[order] = torch.arange(flat.numel(), device=device) - starts[key[order]]
    as_t = {name: torch.from_numpy(v).to(device) for name, v in (("m", m_E), ("n", n_E), ("off", offset_E))}
    j = as_t["off"][flat] + pos
    block = torch.div((j + 1) * as_t["m"][flat] - 1, as_t["n"][flat], rounding_mode="floor")
    block = torch.where(keep, block, torch.zeros_like(block))
    table = torch.from_numpy(table_EM).to(device)
    return table[flat, block].reshape(ids_TK.shape)


def reroute(
    probs_TE: torch.Tensor, ids_TK: torch.Tensor, normalize: bool, available_E: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``weights_TK``, ``ids_TK`` after rerouting (module docstring): the token's available choices
    first, then its most probable available experts, K in all, in descending probability.
    ``available_E`` is on the host (its count is checked without a device sync)."""
    top_k = ids_TK.shape[1]
    if int(available_E.sum()) < top_k:
        raise ValueError(f"{int(available_E.sum())} experts are available: accepted at least top_k = {top_k}")
    available_E = available_E.to(probs_TE.device)
    chosen_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(1, ids_TK, True)
    # priority: kept choices above every other expert (probabilities are <= 1), unavailable last
    priority_TE = torch.where(available_E, probs_TE + 2.0 * chosen_TE, torch.full_like(probs_TE, -1.0))
    picked_TK = torch.sort(priority_TE, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights_TK = probs_TE.gather(1, picked_TK)
    order_TK = torch.sort(weights_TK, dim=-1, descending=True, stable=True).indices  # as route() lists them
    weights_TK, ids_TK = weights_TK.gather(1, order_TK), picked_TK.gather(1, order_TK)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, ids_TK


class ReplicatedExperts(GroupedExperts):
    """The physical experts one rank holds when the layer has replicas (the ``Experts`` protocol):
    ``GroupedExperts`` over them, local expert l being physical expert ``physical_L[l]``, which
    computes with the weights of its logical expert (``experts_L[l]``: every copy is the same)."""

    def __init__(
        self,
        replicas: Replicas,
        physical_L: Sequence[int],
        hidden: int,
        ffn_hidden: int,
        activation: str,
        dtype: torch.dtype,
        backend: str,
    ):
        logical_L = [replicas.logical_of_P[p] for p in physical_L]
        super().__init__(logical_L, hidden, ffn_hidden, activation, dtype, backend)
        self.physical_L = tuple(physical_L)

    def rehome(self, replicas: Replicas, physical_L: Sequence[int]) -> None:
        """After a re-placement (``MoELayer.set_placement``, which has moved the weights into place): local
        expert l is now physical expert ``physical_L[l]``. The slot count is fixed by the stacked weights."""
        if len(physical_L) != len(self.physical_L):
            raise ValueError(f"rehome: {len(physical_L)} physical experts: accepted this rank's {len(self.physical_L)}")
        self.physical_L = tuple(physical_L)
        self.experts_L = tuple(replicas.logical_of_P[p] for p in physical_L)
