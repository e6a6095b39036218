"""The expert-parallel MoE layer: route, dispatch, grouped experts, combine.

Shape legend: T = tokens on this rank, K = top_k, E = experts, W = EP group size,
L = experts on this rank, R = token copies received, D = hidden.

Gradients. The group's objective is the *sum* of the ranks' losses. Under that convention
  - expert weights live only on their owner; the backward all-to-alls bring every rank's
    gradient contribution to the owner, so expert gradients are complete with no reduction;
  - the router is replicated on every rank and sees only local tokens, so its gradients must be
    summed over the EP group: call ``reduce_replicated_grads()`` after backward.
If the group also forms data-parallel replicas of the experts, those replicas' expert gradients
are reduced over the expert-data-parallel group, which is outside this layer.

Features (offload, replicas, on_loss, transport, recomputation) are chosen at construction; see ``MoELayer``.

Re-placement (EPLB). A layer built with a ``placement`` (runtime/eplb.py: every rank holds the same number of
slots, each a copy of one logical expert) can move to another placement between steps: ``set_placement``
sends each slot's weights from a rank that held its expert (one all-to-all of whole experts; a rank that held
the expert already copies it locally), and with an optimizer its state moves with the weights. Which copy
computes a token never changes the result, so a layer's outputs for the same tokens are the same before and
after a move. Training with copies: ``reduce_replicated_grads`` also sums each logical expert's gradient over
its copies, so every copy takes the same optimizer step.

Recomputation (``recompute_experts``): the expert FFNs run under ``torch.utils.checkpoint`` (non-reentrant),
so backward recomputes their GEMMs and activations from the rows received, which are kept. Routing,
the split counts and both all-to-alls are never recomputed: a second exchange in backward would repeat
the communication and, with a router that drifted by rounding, could route differently.

Overlap. With ``overlap_chunks`` = C > 1 the dispatched copies go in C chunks (runtime/dispatch.py)
and the layer pipelines them: chunk i+1's dispatch all-to-all is in flight while the experts
compute chunk i, and chunk i's combine all-to-all while chunk i+1 computes. C = 1 is the serial
path: dispatch, experts, combine, one after the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.collective import TRANSPORTS
from runtime.config import MAX_CHUNKS, MoEConfig, ParallelConfig
from runtime.dispatch import AllToAllDispatcher, Dispatcher, LocalDispatcher
from runtime.eplb import Placement, expert_moves, local_slots
from runtime.experts import Experts, GroupedExperts
from runtime.offload import OffloadConfig, OffloadedExperts
from runtime.permute import ORDERED_SUM_K
from runtime.placement import place_experts
from runtime.ranges import span
from runtime.redundancy import (
    RedundancyConfig,
    Replicas,
    ReplicatedExperts,
    check_on_loss,
    physical_ids,
    plain,
    replicate,
    reroute,
    split_counts,
)
from runtime.router import (
    Router,
    RouterOutput,
    Sequences,
    cut_sequences,
    expert_capacity,
    keep_mask,
    kept_counts,
    load_balancing_loss,
    route_sequences,
    router_z_loss,
)
from runtime.weights import MoEWeights


@dataclass(frozen=True)
class MoEOutput:
    out_TD: torch.Tensor  # the layer's output for this rank's tokens (no residual added)
    aux_loss: torch.Tensor  # this rank's share of the load-balancing loss (sum over ranks = group's)
    z_loss: torch.Tensor  # this rank's share of the router z-loss (sum over ranks = group's)
    router_loss: torch.Tensor  # aux_loss_coef · aux_loss + z_loss_coef · z_loss, add it to the loss
    counts_WE: torch.Tensor  # copies each rank routed to each expert, before dropping (host)
    kept_WE: torch.Tensor  # copies each rank sent to each expert, after capacity (host)
    capacity: int | None  # per-expert capacity over the group's batch; None when dropless
    lost_tokens: torch.Tensor | None = None  # this rank's tokens with a choice no live copy serves (0-d)
    received_W: torch.Tensor | None = None  # copies each rank's experts receive, after capacity (host)
    sequence_routing: RouterOutput | None = None  # granularity "sequence": one row per sequence (serve keeps it)

    @property
    def tokens_dropped(self) -> int:
        """Token copies dropped by capacity over the whole EP group."""
        return int(self.counts_WE.sum() - self.kept_WE.sum())


@dataclass(frozen=True)
class RoutingPlan:
    """Routing of this rank's tokens and the group-wide keep decisions (what dispatch takes)."""

    routing: RouterOutput
    keep_TK: torch.Tensor  # copies kept after capacity
    counts_WE: torch.Tensor  # copies each rank routed to each expert, before dropping (host)
    kept_WE: torch.Tensor  # copies each rank sends to each expert, after capacity (host)
    capacity: int | None  # per-expert capacity over the group's batch; None when dropless
    num_tokens: int  # tokens over the whole EP group
    dispatch_ids_TK: torch.Tensor  # the physical expert of each copy (= routing.ids_TK without replicas)
    dispatch_kept_WP: torch.Tensor  # copies each rank sends to each physical expert (host; = kept_WE without)
    lost_tokens: torch.Tensor | None  # tokens with a choice no live copy serves (rerouted or dropped); 0-d
    sequence_routing: RouterOutput | None = None  # granularity "sequence": the router's row per sequence

    @property
    def dispatch_args(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What ``Dispatcher.plan`` / ``dispatch`` take: physical ids, keep mask, physical kept counts."""
        return self.dispatch_ids_TK, self.keep_TK, self.dispatch_kept_WP


def _replicas(placement: Placement) -> Replicas:
    """A placement's physical experts, every one alive."""
    return Replicas(placement.logical_of_P, placement.owner_P, (True,) * len(placement.owner_P))


def _first_owners(placement: Placement, num_experts: int) -> tuple[int, ...]:
    """The rank of each logical expert's first copy (the layer's ``expert_to_rank`` under a placement)."""
    return tuple(placement.owner_P[placement.logical_of_P.index(e)] for e in range(num_experts))


class MoELayer(nn.Module):
    """One rank's part of an expert-parallel MoE layer. ``group`` is required when ep_size > 1.

    Its features are fixed at construction (each choice validated there, with an error naming the
    argument, its value and what is accepted):
      ``dispatcher``       "auto" (local at EP = 1, all-to-all above), or force "local" / "all_to_all"
                           (all-to-all over a one-rank group exercises the collective path at EP = 1);
      ``offload``          an ``OffloadConfig``: the experts in host memory behind a device cache
                           (runtime/offload.py; inference only, ``overlap_chunks`` = 1, no replicas),
                           ``offload_steps`` / ``offload_horizon`` what Belady replays and plans;
      ``redundancy``       a ``RedundancyConfig``: replicas of the busiest experts (runtime/redundancy.py;
                           inference only, needs an EP group, no offload);
      ``on_loss``          what becomes of copies to an expert with no live copy: "reroute" or "drop";
      ``transport``        the all-to-all's: "collective", or "local_copy" (the compute-only step);
      ``wrap_dispatcher``  a function applied to the dispatcher the layer builds, whose result the
                           layer uses instead (it must keep the dispatcher's interface and results);
      ``wrap_router``      the same for the router (e.g. one that replays recorded choices; it must
                           keep the ``Router``'s parameters and output);
      ``recompute_experts`` backward recomputes the expert FFNs (see the module docstring);
      ``balance_group``    at ``ep_size`` = 1, a group of data-parallel ranks whose batches the load-balancing
                           and z losses are taken over (global-batch balancing: each rank's losses are its
                           share of the group's, as under EP); None: this rank's batch (or the EP group's).
      ``placement``        a ``runtime.eplb.Placement`` of physical experts (copies of logical ones, the same
                           number on every rank) in place of ``placement``'s one copy per expert; needs an EP
                           group, no offload, no ``redundancy``; ``set_placement`` re-places it.
    ``set_schedule`` changes ``overlap_chunks`` and ``transport`` between calls (serial against
    overlapped, compute-only rounds); ``set_alive`` marks lost expert copies.
    """

    def __init__(
        self,
        moe: MoEConfig,
        par: ParallelConfig | None = None,
        group=None,
        device=None,
        dispatcher: str = "auto",
        *,
        offload: OffloadConfig | None = None,
        offload_steps: list[list[int]] | None = None,
        offload_horizon: int = 0,
        redundancy: RedundancyConfig | None = None,
        on_loss: str = "reroute",
        transport: str = "collective",
        wrap_dispatcher: Callable[[Dispatcher], Dispatcher] | None = None,
        wrap_router: Callable[[Router], Router] | None = None,
        recompute_experts: bool = False,
        balance_group=None,
        placement: Placement | None = None,
    ):
        super().__init__()
        par = par if par is not None else ParallelConfig()
        self.moe, self.par = moe, par
        self.expert_to_rank = place_experts(moe, par)
        self.group = self._check(dispatcher, par, group, offload, offload_steps, redundancy, transport)
        if placement is not None:
            self._check_placement(placement, offload, redundancy)
        self._wrap_dispatcher, self._placed = wrap_dispatcher, placement is not None
        if balance_group is not None and self.group is not None:
            raise ValueError("MoELayer balance_group with an EP group is refused: accepted at ep_size = 1 only")
        if recompute_experts and (offload is not None or redundancy is not None):
            raise ValueError("MoELayer recompute_experts with offload or redundancy is refused: both are inference")
        self.recompute_experts, self.balance_group = bool(recompute_experts), balance_group
        self.on_loss = check_on_loss(on_loss)  # change it with ``set_alive``
        self.overlap_chunks = par.overlap_chunks  # change it with ``set_schedule``
        # 1. physical experts: the logical ones, plus replicas with ``redundancy``
        if placement is not None:
            self.replicas: Replicas = _replicas(placement)
            self.expert_to_rank = _first_owners(placement, moe.num_experts)
        elif redundancy is None:
            self.replicas = plain(self.expert_to_rank)
        else:
            self.replicas = replicate(redundancy.loads_E, self.expert_to_rank, par.ep_size, redundancy.redundant)
        # 2. the dispatcher over them
        if self.group is None:
            d: Dispatcher = LocalDispatcher(moe.num_experts)
        else:
            d = AllToAllDispatcher(self.replicas.owner_P, self.group, transport)
        self.dispatcher = d if wrap_dispatcher is None else wrap_dispatcher(d)
        self.rank = self.dispatcher.rank
        self.local_experts = self.dispatcher.local_experts  # physical ids
        # 3. the experts: resident, replicated or offloaded (the ``Experts`` protocol)
        router = Router(moe.hidden_size, moe.num_experts, moe.top_k, moe.normalize_topk, moe)
        self.router = router if wrap_router is None else wrap_router(router)
        shape = (moe.hidden_size, moe.ffn_hidden_size, moe.activation, moe.torch_dtype, moe.expert_backend)
        if redundancy is not None or placement is not None:
            self.experts: Experts = ReplicatedExperts(self.replicas, self.local_experts, *shape)
        elif offload is not None:  # built on the host, moved there; only the cache's slots are on the device
            resident = GroupedExperts(self.local_experts, *shape)
            self.experts = OffloadedExperts(resident, offload, offload_steps, offload_horizon, device)
        else:
            self.experts = GroupedExperts(self.local_experts, *shape)
        if device is not None:
            self.to(device)

    @staticmethod
    def _check(dispatcher, par: ParallelConfig, group, offload, offload_steps, redundancy, transport):
        """The group the layer's dispatcher uses (None: the local one), after refusing every
        impossible choice of the constructor's arguments."""
        if dispatcher not in ("auto", "local", "all_to_all"):
            raise ValueError(f"MoELayer dispatcher = {dispatcher!r}: accepted 'auto', 'local', 'all_to_all'")
        local = dispatcher == "local" or (dispatcher == "auto" and par.ep_size == 1)
        if local and par.ep_size != 1:
            raise ValueError(f"MoELayer dispatcher = 'local' needs ep_size = 1, got {par.ep_size}")
        if not local and (group is None or dist.get_world_size(group) != par.ep_size):
            size = None if group is None else dist.get_world_size(group)
            raise ValueError(f"ParallelConfig.ep_size = {par.ep_size} needs a process group of that size, got {size}")
        if offload is not None and not isinstance(offload, OffloadConfig):
            raise ValueError(f"MoELayer offload = {offload!r} is invalid: accepted an OffloadConfig or None")
        if offload is None and offload_steps is not None:
            raise ValueError("MoELayer offload_steps without offload is refused: accepted with an OffloadConfig")
        if redundancy is not None and not isinstance(redundancy, RedundancyConfig):
            raise ValueError(f"MoELayer redundancy = {redundancy!r} is invalid: accepted a RedundancyConfig or None")
        if offload is not None and redundancy is not None:
            raise ValueError("offload with redundant experts is refused: accepted one or the other")
        if offload is not None and offload.policy == "belady" and not offload_steps:
            raise ValueError(
                "MoELayer offload policy 'belady' needs offload_steps: accepted the needed experts per step"
            )
        chunks = par.overlap_chunks
        if offload is not None and chunks > 1:  # a chunk's forward would be a cache access of its own
            raise ValueError(f"offload with ParallelConfig.overlap_chunks = {chunks} is refused: accepted 1")
        if redundancy is not None and local:
            raise ValueError("redundant experts at ep_size = 1 are refused: accepted ep_size >= 2")
        if transport not in TRANSPORTS:
            accepted = ", ".join(map(repr, TRANSPORTS))
            raise ValueError(f"transport = {transport!r} is invalid: accepted one of {accepted}")
        if local and transport != "collective":
            raise ValueError(
                f"transport = {transport!r} needs an all-to-all: accepted 'collective' with the local "
                "dispatcher (ep_size = 1 without dispatcher = 'all_to_all')"
            )
        return None if local else group

    def _check_placement(self, placement, offload, redundancy) -> None:
        if not isinstance(placement, Placement):
            raise ValueError(f"MoELayer placement = {placement!r} is invalid: accepted an eplb.Placement or None")
        if self.group is None:
            raise ValueError("MoELayer placement at ep_size = 1 is refused: accepted with an EP group (ep_size >= 2)")
        if offload is not None or redundancy is not None:
            raise ValueError("MoELayer placement with offload or redundancy is refused: accepted one of the three")
        self._check_slots(placement)

    def _check_slots(self, placement: Placement) -> None:
        moe, ranks = self.moe, self.par.ep_size
        if sorted(set(placement.logical_of_P)) != list(range(moe.num_experts)):
            raise ValueError(
                f"MoELayer placement covers logical experts {sorted(set(placement.logical_of_P))}: accepted every "
                f"one of 0..{moe.num_experts - 1}"
            )
        if any(not 0 <= r < ranks for r in placement.owner_P) or len(set(placement.owner_P)) != ranks:
            owners = sorted(set(placement.owner_P))
            raise ValueError(f"MoELayer placement owners {owners}: accepted every rank of {ranks}")

    @property
    def transport(self) -> str | None:
        """The all-to-all's transport; None with the local dispatcher (no exchange)."""
        return None if self.group is None else self.dispatcher.transport

    def set_schedule(
        self, overlap_chunks: int | None = None, transport: str | None = None, expert_backend: str | None = None
    ) -> None:
        """From the next forward on: pipeline over ``overlap_chunks`` chunks and/or exchange over
        ``transport`` and/or compute the experts with ``expert_backend`` (runtime/experts.py; "rowwise" for
        batch-invariant checks; resident experts only) (None: unchanged). Validated as at construction."""
        if overlap_chunks is not None:
            if (
                isinstance(overlap_chunks, bool)
                or not isinstance(overlap_chunks, int)
                or not 1 <= overlap_chunks <= MAX_CHUNKS
            ):
                raise ValueError(
                    f"overlap_chunks = {overlap_chunks!r} is invalid: accepted an integer from 1 to {MAX_CHUNKS}"
                )
            if overlap_chunks > 1 and isinstance(self.experts, OffloadedExperts):
                raise ValueError(f"offload with overlap_chunks = {overlap_chunks} is refused: accepted 1")
        if transport is not None and transport not in TRANSPORTS:
            accepted = ", ".join(map(repr, TRANSPORTS))
            raise ValueError(f"transport = {transport!r} is invalid: accepted one of {accepted}")
        if transport is not None and transport != (self.transport or "collective"):  # local: "collective" holds
            if self.group is None:
                raise ValueError(f"transport = {transport!r} needs an all-to-all: the layer's dispatcher is local")
            self.dispatcher.set_transport(transport)  # validates it
        if overlap_chunks is not None:
            self.overlap_chunks = overlap_chunks
        if expert_backend is not None:
            if not isinstance(self.experts, GroupedExperts):
                raise ValueError(f"expert_backend = {expert_backend!r} is refused for offloaded experts")
            self.experts.set_backend(expert_backend)

    @torch.no_grad()
    def load_global_weights(self, weights: MoEWeights) -> None:
        """Copy the replicated router and this rank's experts (a replica: its logical expert's) from
        global weights."""
        self.experts.load_global(weights.w_in_EDH, weights.w_down_EFD)  # first: an offloaded layer may refuse
        self.load_router_weights(weights)

    @torch.no_grad()
    def load_router_weights(self, weights: MoEWeights) -> None:
        """Copy the router (gate and offsets) from global weights; the experts are left as they are."""
        self.router.weight_ED.copy_(weights.router_ED)
        self.router.bias_E.zero_()
        if weights.router_bias_E is not None:
            self.router.bias_E.copy_(weights.router_bias_E)
        if self.moe.has_score_bias:  # the choice bias (runtime/router.py ``gate``); None = zero
            bias_E = weights.score_bias_E
            self.router.score_bias_E.copy_(torch.zeros(self.moe.num_experts) if bias_E is None else bias_E)

    def set_alive(self, alive_P, on_loss: str | None = None) -> None:
        """Which physical experts still serve (the same on every rank of the group), and what becomes
        of copies to a logical expert none serves (``on_loss``: "reroute" or "drop"; None: unchanged)."""
        if on_loss is not None:
            self.on_loss = check_on_loss(on_loss)
        self.replicas = self.replicas.with_alive(alive_P)

    @torch.no_grad()
    def set_placement(self, placement: Placement, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Move to ``placement`` between steps (every rank of the group, the same placement): each slot's
        weights come from a rank that held its expert (``runtime.eplb.expert_moves``) in one all-to-all of
        whole experts, and so does, with ``optimizer``, every state tensor of the expert weights' shape
        (Adam's moments; scalar state such as the step count is the same for every slot). Gradients are not
        moved: a move is between optimizer steps, and the experts' gradients are set to None. Returns the
        bytes this rank sent. Refused without a ``placement`` at construction, with lost copies
        (``set_alive``), or for a placement that changes a rank's slot count."""
        if not self._placed:
            raise ValueError("MoELayer.set_placement needs a layer built with placement=: accepted then only")
        if not self.replicas.all_alive:
            raise ValueError("MoELayer.set_placement with lost copies is refused: accepted when every copy is alive")
        if not isinstance(placement, Placement):
            raise ValueError(f"MoELayer.set_placement({placement!r}): accepted a runtime.eplb.Placement")
        self._check_slots(placement)
        ranks, old = self.par.ep_size, Placement(self.replicas.logical_of_P, self.replicas.owner_P)
        moves = expert_moves(old, placement, ranks)  # the same list on every rank
        tensors = self._expert_tensors(optimizer)
        rows = [t.view(t.shape[0], -1).view(torch.uint8) for t in tensors]  # views: the writes below land in t
        width = sum(r.shape[1] for r in rows)
        sends = [m for m in moves if m.src_rank == self.rank and m.dst_rank != self.rank]  # (dst, dst_slot) order
        recvs = sorted((m for m in moves if m.dst_rank == self.rank and m.src_rank != self.rank),
                       key=lambda m: (m.src_rank, m.dst_slot))  # fmt: skip
        device = tensors[0].device
        send_NB = torch.cat([torch.cat([r[m.src_slot] for r in rows])[None] for m in sends]) if sends else None
        send_NB = send_NB if send_NB is not None else torch.empty(0, width, dtype=torch.uint8, device=device)
        recv_NB = torch.empty(len(recvs), width, dtype=torch.uint8, device=device)
        in_splits = [sum(1 for m in sends if m.dst_rank == r) for r in range(ranks)]
        out_splits = [sum(1 for m in recvs if m.src_rank == r) for r in range(ranks)]
        # synchronous: on NCCL the current stream waits for the exchange (a stream hand-off, not a host
        # block), so the copies below, and the next forward, read the received rows after they arrive
        dist.all_to_all_single(recv_NB, send_NB, out_splits, in_splits, group=self.group)
        local = [m for m in moves if m.dst_rank == self.rank == m.src_rank and m.dst_slot != m.src_slot]
        sources = sorted({m.src_slot for m in local})  # a local move may read a slot another one overwrites
        kept = {slot: [r[slot].clone() for r in rows] for slot in sources}
        for m in local:
            for r, b in zip(rows, kept[m.src_slot], strict=True):
                r[m.dst_slot].copy_(b)
        for i, m in enumerate(recvs):
            for r, part in zip(rows, recv_NB[i].split([r.shape[1] for r in rows]), strict=True):
                r[m.dst_slot].copy_(part)
        self.replicas = _replicas(placement)
        d = AllToAllDispatcher(self.replicas.owner_P, self.group, self.dispatcher.transport)
        self.dispatcher = d if self._wrap_dispatcher is None else self._wrap_dispatcher(d)
        self.local_experts = self.dispatcher.local_experts
        self.experts.rehome(self.replicas, local_slots(placement, self.rank))
        self.expert_to_rank = _first_owners(placement, self.moe.num_experts)
        for p in (self.experts.w_in_LDH, self.experts.w_down_LFD):
            p.grad = None  # they were the old slots' (module docstring: a move is between steps)
        return len(sends) * width

    def _expert_tensors(self, optimizer) -> list[torch.Tensor]:
        """The expert weights and the optimizer's state tensors shaped like them: what a re-placement moves, in
        an order every rank shares."""
        out = []
        for p in (self.experts.w_in_LDH, self.experts.w_down_LFD):
            out.append(p.data)
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            out += [state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].shape == p.shape]
        return out

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank of the EP group holds a copy of: the router."""
        return list(self.router.parameters())

    def reduce_replicated_grads(self) -> None:
        """Sum the replicated parameters' gradients over the EP group, and each logical expert's over its
        copies (``reduce_copy_grads``); a no-op at EP = 1."""
        if self.group is None:
            return
        for p in self.replicated_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.group)
        self.reduce_copy_grads()

    def copy_share_L(self) -> torch.Tensor:
        """1 / copies of each local slot's logical expert (host; all ones without copies)."""
        copies_E = self.replicas.copies_E
        return torch.tensor([1.0 / copies_E[e] for e in self.experts.experts_L], dtype=torch.float64)

    @torch.no_grad()
    def reduce_copy_grads(self) -> None:
        """With copies of an expert on several ranks (``placement`` with spare slots): every copy's gradient
        becomes the sum over the copies (each copy saw only the tokens it served), one all-reduce of an
        [E, ...] buffer per weight. A no-op when every logical expert has one copy."""
        if self.group is None or not isinstance(self.experts, ReplicatedExperts) or not self.replicas.num_redundant:
            return
        copies_E = self.replicas.copies_E
        copied = [e for e in range(self.moe.num_experts) if copies_E[e] > 1]  # the same list on every rank
        row_of = {e: i for i, e in enumerate(copied)}
        slots = [l for l, e in enumerate(self.experts.experts_L) if e in row_of]  # this rank's copied slots
        device = self.experts.w_in_LDH.device
        # host lists to the device: a pageable copy, synchronous with the host on CUDA (once per step)
        slots_t = torch.tensor(slots, dtype=torch.long, device=device)
        rows_t = torch.tensor([row_of[self.experts.experts_L[l]] for l in slots], dtype=torch.long, device=device)
        for p in (self.experts.w_in_LDH, self.experts.w_down_LFD):
            if p.grad is None:
                continue
            total = p.grad.new_zeros(len(copied), *p.shape[1:]).index_add_(0, rows_t, p.grad[slots_t])
            dist.all_reduce(total, group=self.group)
            p.grad[slots_t] = total[rows_t]

    def plan(self, x_TD: torch.Tensor, seqs: Sequences | None = None) -> RoutingPlan:
        """Route this rank's tokens and decide, group-wide, which copies each expert keeps. ``seqs``: the
        rows' sequences with granularity "sequence" (None: cut by ``MoEConfig.seq_len``)."""
        moe = self.moe
        routing, routing_B = self._route(x_TD, seqs)  # fp32 router
        reps, lost = self.replicas, None
        if not reps.all_alive:  # some copies lost: route around the logical experts none serves
            available_E = reps.available_E()
            lost = (~available_E.to(x_TD.device)[routing.ids_TK]).any(dim=1).sum()  # tokens that lost a choice
            if self.on_loss == "reroute":
                if not moe.plain_routing:  # reroute re-picks by softmax probabilities: the plain router's rule
                    raise ValueError("on_loss = 'reroute' with a router variant is refused: accepted on_loss 'drop'")
                weights_TK, ids_TK = reroute(routing.probs_TE, routing.ids_TK, moe.normalize_topk, available_E)
                routing = RouterOutput(routing.logits_TE, routing.probs_TE, weights_TK, ids_TK)
        ids_TK = routing.ids_TK
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=moe.num_experts)
        counts_WE = self.dispatcher.exchange_counts(counts_E).cpu()  # sync: splits are host ints
        num_tokens = int(counts_WE.sum()) // moe.top_k
        capacity = expert_capacity(moe.capacity_factor, num_tokens, moe.top_k, moe.num_experts)
        kept_WE = kept_counts(counts_WE, capacity)
        if lost is not None and self.on_loss == "drop":
            kept_WE[:, ~reps.available_E()] = 0  # dropped like a capacity drop: weight 0, not sent
        if capacity is None and lost is None:
            keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        else:
            keep_TK = keep_mask(ids_TK, kept_WE[self.rank].to(ids_TK.device))
        if not reps.identity:
            kept_WP = split_counts(kept_WE, reps)
            phys_TK = physical_ids(ids_TK, keep_TK, kept_WE, self.rank, reps)
        else:
            kept_WP, phys_TK = kept_WE, ids_TK
        return RoutingPlan(
            routing, keep_TK, counts_WE, kept_WE, capacity, num_tokens, phys_TK, kept_WP, lost, routing_B
        )

    def _route(self, x_TD: torch.Tensor, seqs: Sequences | None) -> tuple[RouterOutput, RouterOutput | None]:
        """The per-token routing, and with granularity "sequence" the per-sequence one (runtime/router.py)."""
        if self.moe.granularity == "token":
            if seqs is not None:
                raise ValueError("MoELayer: sequences given with granularity 'token': accepted granularity 'sequence'")
            return self.router(x_TD), None
        seqs = seqs if seqs is not None else Sequences(cut_sequences(x_TD.shape[0], self.moe.seq_len))
        return route_sequences(self.router, x_TD, seqs)

    def forward(self, x_TD: torch.Tensor, seqs: Sequences | None = None) -> MoEOutput:
        """The layer on this rank's tokens; ``seqs`` as ``plan``'s."""
        moe = self.moe
        with span("route", x_TD.device):
            # 1. Route; exchange group-wide copies per expert; capacity and the copies kept follow.
            plan = self.plan(x_TD, seqs)
            routing = plan.routing
            # 2. Auxiliary losses over the group's batch (this rank's share).
            counts_E = plan.counts_WE.sum(0).to(x_TD.device)
            if self.balance_group is not None:  # the balance group's copies per expert (data-parallel ranks)
                counts_E = counts_E.clone()
                dist.all_reduce(counts_E, group=self.balance_group)
                denom = int(counts_E.sum()) // moe.top_k  # sync: the loss's scale is a host int
            else:
                denom = plan.num_tokens
            denom = max(denom, 1)
            aux = load_balancing_loss(routing.probs_TE, counts_E, denom, moe.top_k)
            z = router_z_loss(routing.logits_TE, denom)
        # 3. Dispatch, grouped expert compute, combine: pipelined over chunks.
        out_TD = self.pipeline(x_TD.to(moe.torch_dtype), plan)
        return MoEOutput(
            out_TD=out_TD,
            aux_loss=aux,
            z_loss=z,
            router_loss=moe.aux_loss_coef * aux + moe.z_loss_coef * z,
            counts_WE=plan.counts_WE,
            kept_WE=plan.kept_WE,
            capacity=plan.capacity,
            lost_tokens=plan.lost_tokens,
            received_W=self._received(plan.dispatch_kept_WP),
            sequence_routing=plan.sequence_routing,
        )

    def _received(self, kept_WP: torch.Tensor) -> torch.Tensor:
        """Copies each rank's experts receive [W] from the physical kept counts (host, no sync)."""
        owner_P = torch.tensor(self.replicas.owner_P, dtype=torch.long)
        return torch.zeros(self.par.ep_size, dtype=kept_WP.dtype).index_add_(0, owner_P, kept_WP.sum(0))

    def pipeline(self, x_TD: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
        """Dispatch, experts and combine of ``overlap_chunks`` chunks, each chunk's all-to-alls in
        flight while another chunk computes. Every rank issues the collectives in the same order:
        dispatch 0, dispatch 1, combine 0, dispatch 2, combine 1, ..., combine C−1."""
        d, device, chunks = self.dispatcher, x_TD.device, self.overlap_chunks
        meta = d.plan(*plan.dispatch_args, chunks, self.experts.expert_major)
        x_PD = d.send(x_TD, meta)
        # one split, not a slice per chunk: under autograd each slice's backward would build a
        # zero tensor of the whole send buffer
        sends = x_PD.split([c.rows.stop - c.rows.start for c in meta.chunks])

        def launch_dispatch(i: int):
            c = meta.chunks[i]
            with span(f"dispatch[{i}]", device):
                return d.exchange(sends[i], c.output_splits, c.input_splits)

        in_flight, combines = launch_dispatch(0), []
        for i, chunk in enumerate(meta.chunks):
            ahead = launch_dispatch(i + 1) if i + 1 < len(meta.chunks) else None  # flows while chunk i computes
            with span(f"dispatch[{i}].wait", device):
                x_RD = d.to_expert_major(in_flight.wait(), chunk)
            with span(f"experts[{i}]", device):
                if self.recompute_experts and torch.is_grad_enabled():  # backward recomputes the FFNs from x_RD
                    y_RD = checkpoint(self.experts, x_RD, chunk.runs, chunk.run_experts, use_reentrant=False)
                else:
                    y_RD = self.experts(x_RD, chunk.runs, chunk.run_experts)
            with span(f"combine[{i}]", device):  # flows while chunk i+1 computes
                combines.append(d.exchange(d.to_source_major(y_RD, chunk), chunk.input_splits, chunk.output_splits))
            in_flight = ahead
        with span("combine.wait", device):
            if len(meta.chunks) == 1:
                return d.unpermute(
                    combines[0].wait(), meta, plan.routing.weights_TK, owned=True
                )  # made here, used once
            if self.moe.top_k >= ORDERED_SUM_K:  # every chunk first: the copies are summed in k order at once
                y_PD = torch.cat([pending.wait() for pending in combines])
                return d.unpermute(y_PD, meta, plan.routing.weights_TK, owned=True)
            out_TD = None
            for chunk, pending in zip(meta.chunks, combines, strict=True):  # each chunk's tokens, as it arrives
                out_TD = d.unpermute(
                    pending.wait(), meta, plan.routing.weights_TK, owned=True, rows=chunk.rows, out=out_TD
                )
            return out_TD
