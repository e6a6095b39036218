"""Token dispatch to the experts' ranks and combine back, over ``all_to_all_single``.

Shape legend: T = tokens on this rank, K = top_k, E = experts, W = EP group size,
L = experts on this rank, P = token copies this rank sends, R = copies it receives, D = hidden.

Dispatch, in four steps:
 1. every rank counts its copies per expert; one all-gather gives each rank the W×E matrix
    (``exchange_counts``), from which capacity, send splits and receive splits all follow;
 2. the kept copies are sorted by destination slot (owner rank, then local expert), so the
    copies for each rank are contiguous;
 3. ``all_to_all_single`` with those splits delivers them; each rank receives them grouped by
    source rank, then local expert;
 4. a fixed index reorders them expert-major (all copies of local expert 0, then 1, ...),
    the layout grouped expert compute needs.
Combine runs the same steps backwards and sums each token's copies with their combine weights.
Backward of both is the reverse all-to-all (``_AllToAll`` swaps the splits).

``DispatchMeta`` carries everything combine needs; dispatchers keep no per-call state.
EP = 1 uses ``LocalDispatcher``: the same permutation, no collectives.

Test-only slowdown: ``MOEBENCH_TEST_ONLY_SLOW_DISPATCH=0.15`` makes every dispatch take 15 %
longer (a busy wait of that fraction of its own time), so moebench's tests can prove that a
regression comparison catches a slower dispatch. It is honoured only inside a pytest run; set
anywhere else, building a dispatcher raises, so no benchmark can carry it by accident.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from runtime.placement import local_experts

# ---------------------------------------------------------------------------------------------
# Pure functions


def slot_of_expert(expert_to_rank: tuple[int, ...]) -> torch.Tensor:
    """``slot_E[e]`` = position of expert e when experts are listed rank-major, then by id."""
    order = sorted(range(len(expert_to_rank)), key=lambda e: (expert_to_rank[e], e))
    slot_E = torch.empty(len(order), dtype=torch.long)
    slot_E[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return slot_E


def permute_order(ids_TK: torch.Tensor, keep_TK: torch.Tensor, slot_E: torch.Tensor) -> torch.Tensor:
    """Flat (token-major) indices of the kept copies, stably sorted by destination slot: [P]."""
    kept_P = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)
    slots_P = slot_E.to(ids_TK.device)[ids_TK.reshape(-1)[kept_P]]
    return kept_P[torch.sort(slots_P, stable=True).indices]


def source_to_expert_major(counts_WL: torch.Tensor) -> torch.Tensor:
    """Index that reorders rows grouped [source rank][local expert] into [local expert][source].

    ``counts_WL[s, l]`` rows arrive from source s for local expert l. With ``idx`` returned,
    ``x_expert_major = x_source_major[idx]``.
    """
    num_src, num_local = counts_WL.shape
    flat = counts_WL.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).reshape(num_src, num_local)
    chunks = [
        torch.arange(int(starts[s, l]), int(starts[s, l] + counts_WL[s, l]), dtype=torch.long)
        for l in range(num_local)
        for s in range(num_src)
    ]
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)


def unpermute(y_PD: torch.Tensor, meta: DispatchMeta, weights_TK: torch.Tensor) -> torch.Tensor:
    """out[t] = Σ over kept copies c of token t: weights[c] · y[c]; zeros for tokens with none."""
    w_P = weights_TK.reshape(-1)[meta.order_P].to(y_PD.dtype)
    out_TD = y_PD.new_zeros(meta.num_tokens, y_PD.shape[-1])
    return out_TD.index_add_(0, meta.order_P // meta.top_k, y_PD * w_P[:, None])


# ---------------------------------------------------------------------------------------------
# The test-only slowdown

SLOWDOWN_ENV = "MOEBENCH_TEST_ONLY_SLOW_DISPATCH"


def injected_slowdown() -> float:
    """The test-only dispatch slowdown as a fraction (0.0 when unset); see the module docstring."""
    text = os.environ.get(SLOWDOWN_ENV)
    if text is None:
        return 0.0
    if "PYTEST_CURRENT_TEST" not in os.environ:
        raise RuntimeError(f"{SLOWDOWN_ENV} = {text!r} is set outside a pytest run: it exists for tests only, unset it")
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 10:
        raise ValueError(f"{SLOWDOWN_ENV} = {text!r} is invalid: accepted a fraction from 0 to 10")
    return fraction


def _stall(fraction: float, start: float, device: torch.device) -> None:
    """Busy-wait ``fraction`` of the time since ``start`` (the test-only slowdown)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: test-only, to know how long the dispatch really took
    until = time.perf_counter() + fraction * (time.perf_counter() - start)
    while time.perf_counter() < until:
        pass


# ---------------------------------------------------------------------------------------------
# Differentiable all-to-all


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward is the reverse all-to-all (splits swapped)."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad_out):
        return _all_to_all(grad_out, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, output_splits, input_splits, group)


# ---------------------------------------------------------------------------------------------
# Dispatchers


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo a dispatch. Split lists are host ints (already synced)."""

    num_tokens: int  # T
    top_k: int  # K
    order_P: torch.Tensor  # flat copy index (t·K + k) of each sent copy, in send order
    input_splits: list[int]  # copies sent to each rank
    output_splits: list[int]  # copies received from each rank
    to_expert_major_R: torch.Tensor | None  # received (source-major) -> expert-major; None if W = 1
    to_source_major_R: torch.Tensor | None  # its inverse
    tokens_per_expert: list[int]  # rows per local expert in the expert-major layout


class LocalDispatcher:
    """EP = 1: every expert is local; dispatch is a sort by expert, combine its inverse."""

    def __init__(self, num_experts: int):
        self.rank, self.ep_size = 0, 1
        self.local_experts = tuple(range(num_experts))
        self.slot_E = torch.arange(num_experts)
        self.slowdown = injected_slowdown()

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        return counts_E[None]

    def dispatch(self, x_TD, ids_TK, keep_TK, kept_WE) -> tuple[torch.Tensor, DispatchMeta]:
        start = time.perf_counter()
        order_P = permute_order(ids_TK, keep_TK, self.slot_E)
        meta = DispatchMeta(
            num_tokens=x_TD.shape[0],
            top_k=ids_TK.shape[1],
            order_P=order_P,
            input_splits=[order_P.numel()],
            output_splits=[order_P.numel()],
            to_expert_major_R=None,
            to_source_major_R=None,
            tokens_per_expert=kept_WE[0].tolist(),  # kept_WE is already on the host
        )
        x_RD = x_TD.index_select(0, order_P // meta.top_k)  # on CPU 5x faster than x_TD[idx]
        if self.slowdown:
            _stall(self.slowdown, start, x_TD.device)
        return x_RD, meta

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        return unpermute(y_RD, meta, weights_TK)


class AllToAllDispatcher:
    """EP > 1 over a process group (NCCL on GPUs, gloo on CPU), passed in, never global."""

    def __init__(self, expert_to_rank: tuple[int, ...], group):
        self.group = group
        self.rank, self.ep_size = dist.get_rank(group), dist.get_world_size(group)
        self.expert_to_rank = expert_to_rank
        self.local_experts = local_experts(expert_to_rank, self.rank)
        self.slot_E = slot_of_expert(expert_to_rank)
        self._rank_of_expert_E = torch.tensor(expert_to_rank, dtype=torch.long)
        self.slowdown = injected_slowdown()

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        counts_WE = counts_E.new_empty(self.ep_size * counts_E.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12
        gather(counts_WE, counts_E.contiguous(), group=self.group)
        return counts_WE.view(self.ep_size, -1)

    def dispatch(self, x_TD, ids_TK, keep_TK, kept_WE) -> tuple[torch.Tensor, DispatchMeta]:
        # kept_WE is on the host (the layer synced once after exchange_counts): splits are host ints.
        start = time.perf_counter()
        send_W = torch.zeros(self.ep_size, dtype=torch.long).index_add_(0, self._rank_of_expert_E, kept_WE[self.rank])
        recv_WL = kept_WE[:, list(self.local_experts)]
        to_expert = source_to_expert_major(recv_WL).to(x_TD.device)
        order_P = permute_order(ids_TK, keep_TK, self.slot_E)
        meta = DispatchMeta(
            num_tokens=x_TD.shape[0],
            top_k=ids_TK.shape[1],
            order_P=order_P,
            input_splits=send_W.tolist(),
            output_splits=recv_WL.sum(dim=1).tolist(),
            to_expert_major_R=to_expert,
            to_source_major_R=torch.argsort(to_expert),
            tokens_per_expert=recv_WL.sum(dim=0).tolist(),
        )
        x_PD = x_TD.index_select(0, order_P // meta.top_k)
        x_RD = all_to_all(x_PD, meta.output_splits, meta.input_splits, self.group).index_select(0, to_expert)
        if self.slowdown:
            _stall(self.slowdown, start, x_TD.device)
        return x_RD, meta

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        y_source_major = y_RD.index_select(0, meta.to_source_major_R)
        y_PD = all_to_all(y_source_major, meta.input_splits, meta.output_splits, self.group)
        return unpermute(y_PD, meta, weights_TK)
