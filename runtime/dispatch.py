"""Token dispatch to the experts' ranks and combine back, over ``all_to_all_single``.

Shape legend: T = tokens on this rank, K = top_k, E = experts, W = EP group size,
L = experts on this rank, P = token copies this rank sends, R = copies it receives, D = hidden.

Dispatch, in four steps:
 1. every rank counts its copies per expert; one all-gather gives each rank the W×E matrix
    (``exchange_counts``), from which capacity, send splits and receive splits all follow;
 2. the kept copies are sorted by destination slot (owner rank, then local expert), so the
    copies for each rank are contiguous;
 3. ``all_to_all_single`` with those splits delivers them; each rank receives them grouped by
    source rank, then local expert: runs of rows of one local expert each;
 4. the experts take those runs as they are (the ``loop`` backend: one FFN per run), or, for the
    grouped backends, which need every expert's rows contiguous, a fixed index reorders them
    expert-major (all copies of local expert 0, then 1, ...). At EP = 1 both are the same.
Combine runs the same steps backwards and sums each token's copies with their combine weights.
Backward of both is the reverse all-to-all (``runtime/collective.py`` swaps the splits).

Chunks (``ParallelConfig.overlap_chunks`` = C > 1): each (rank, expert) count of kept copies is
split into C parts by ``chunk_sizes``, so chunk i is a complete, smaller dispatch whose splits
every rank derives from the same W×E counts. Sends are ordered chunk-major; the layer pipelines
the chunks (runtime/layer.py). C = 1 is the serial path.

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

import numpy as np
import torch
import torch.distributed as dist

from runtime import collective
from runtime.placement import local_experts

# ---------------------------------------------------------------------------------------------
# Pure functions


def slot_of_expert(expert_to_rank: tuple[int, ...]) -> torch.Tensor:
    """``slot_E[e]`` = position of expert e when experts are listed rank-major, then by id."""
    order = sorted(range(len(expert_to_rank)), key=lambda e: (expert_to_rank[e], e))
    slot_E = torch.empty(len(order), dtype=torch.long)
    slot_E[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return slot_E


def chunk_sizes(counts, chunks: int) -> np.ndarray:
    """Split every count n into ``chunks`` parts: part i = ⌊(i+1)·n/C⌋ − ⌊i·n/C⌋. Shape [C, *counts].

    Every rank can compute every other rank's chunk sizes from the exchanged counts alone, so
    chunking needs no communication beyond the one count exchange. Host arithmetic, in numpy
    (a tiny torch op costs ~10 µs of dispatch; these run per layer per step)."""
    counts = np.asarray(counts, dtype=np.int64)
    if chunks == 1:
        return counts[None]
    bounds = np.arange(chunks + 1).reshape(-1, *(1,) * counts.ndim) * counts // chunks
    return bounds[1:] - bounds[:-1]


def permute_order(
    ids_TK: torch.Tensor, keep_TK: torch.Tensor, slot_E: torch.Tensor, per_slot_S: np.ndarray | None = None, chunks=1
) -> torch.Tensor:
    """Flat (token-major) indices of the kept copies in send order: [P].

    One chunk: stably sorted by destination slot. C chunks: by chunk, then slot, then token, where
    copy j (in token order) of the n kept for a slot goes to chunk ⌈(j+1)·C/n⌉ − 1, the inverse of
    ``chunk_sizes``. ``per_slot_S`` (kept copies per slot, host) is needed when ``chunks > 1``.

    On CPU the same steps run in numpy (``_permute_order_host``): its stable sort of 16-bit keys is
    a radix sort and it has no per-op dispatch cost, 2.5x faster at 2,048 copies than torch's.
    """
    if ids_TK.device.type == "cpu" and slot_E.numel() <= 2**16:
        order = _permute_order_host(ids_TK.numpy(), keep_TK.numpy(), slot_E.numpy(), per_slot_S, chunks)
        return torch.from_numpy(order)
    return _permute_order_torch(ids_TK, keep_TK, slot_E, per_slot_S, chunks)


def _permute_order_torch(ids_TK, keep_TK, slot_E, per_slot_S, chunks) -> torch.Tensor:
    """``permute_order`` in torch ops on the routing's device (CUDA: no host round trip)."""
    kept_P = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)
    slots_P = slot_E.to(ids_TK.device)[ids_TK.reshape(-1)[kept_P]]
    by_slot = torch.sort(slots_P, stable=True).indices
    order_P = kept_P[by_slot]
    if chunks == 1:
        return order_P
    per_slot_S = _to_device(torch.from_numpy(np.asarray(per_slot_S, dtype=np.int64)), ids_TK.device)
    slot_P = slots_P[by_slot]
    start_S = torch.cumsum(per_slot_S, 0) - per_slot_S
    j_P = torch.arange(order_P.numel(), device=order_P.device) - start_S[slot_P]
    chunk_P = torch.div((j_P + 1) * chunks - 1, per_slot_S[slot_P], rounding_mode="floor")
    return order_P[torch.sort(chunk_P, stable=True).indices]


def _permute_order_host(ids_TK: np.ndarray, keep_TK: np.ndarray, slot_E: np.ndarray, per_slot_S, chunks) -> np.ndarray:
    """``permute_order`` in numpy; the sort keys (slots < 2^16, chunks ≤ 4096) are 16-bit."""
    kept_P = np.flatnonzero(keep_TK.reshape(-1))
    slots_P = slot_E.astype(np.uint16)[ids_TK.reshape(-1)[kept_P]]
    by_slot = np.argsort(slots_P, kind="stable")
    order_P = kept_P[by_slot]
    if chunks == 1:
        return order_P
    per_slot_S = np.asarray(per_slot_S, dtype=np.int64)
    slot_P = slots_P[by_slot]
    start_S = np.cumsum(per_slot_S) - per_slot_S
    j_P = np.arange(order_P.size) - start_S[slot_P]
    chunk_P = ((j_P + 1) * chunks - 1) // per_slot_S[slot_P]
    return order_P[np.argsort(chunk_P.astype(np.uint16), kind="stable")]


def _block_moves(counts_WL) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped in blocks (s, l) of ``counts_WL[s, l]`` rows: per block, its start in the
    source-major layout and in the expert-major one, both listed in source-major block order."""
    counts = np.asarray(counts_WL, dtype=np.int64)
    flat = counts.reshape(-1)
    src_start = np.cumsum(flat) - flat
    by_expert = counts.T.reshape(-1)
    dst_start = (np.cumsum(by_expert) - by_expert).reshape(counts.T.shape).T.reshape(-1)
    return src_start, dst_start


def source_to_expert_major(counts_WL) -> torch.Tensor:
    """Index that reorders rows grouped [source rank][local expert] into [local expert][source].

    ``counts_WL[s, l]`` rows arrive from source s for local expert l. With ``idx`` returned,
    ``x_expert_major = x_source_major[idx]``. Row r of block b in the expert-major layout reads
    ``r + src_start[b] − dst_start[b]`` (vectorised, host numpy).
    """
    counts = np.asarray(counts_WL, dtype=np.int64)
    src_start, dst_start = _block_moves(counts)
    shift = (src_start - dst_start).reshape(counts.shape).T.reshape(-1)  # in expert-major block order
    blocks = counts.T.reshape(-1)
    return torch.from_numpy(np.arange(blocks.sum()) + np.repeat(shift, blocks))


def expert_to_source_major(counts_WL) -> torch.Tensor:
    """The inverse of ``source_to_expert_major``: ``y_source_major = y_expert_major[idx]``."""
    counts = np.asarray(counts_WL, dtype=np.int64)
    src_start, dst_start = _block_moves(counts)
    flat = counts.reshape(-1)
    return torch.from_numpy(np.arange(flat.sum()) + np.repeat(dst_start - src_start, flat))


def unpermute(
    y_PD: torch.Tensor, meta: DispatchMeta, weights_TK: torch.Tensor, owned=False, rows=slice(None), out=None
) -> torch.Tensor:
    """out[t] = Σ over kept copies c of token t: weights[c] · y[c]; zeros for tokens with none.

    ``rows``: ``y_PD`` holds only those rows of the send order (one chunk), added into ``out`` (a
    fresh zero tensor when None). ``owned``: the caller owns ``y_PD`` and needs it no more, so the
    weights scale it in place when no gradient flows through it (saves a [P, D] allocation: on CPU
    its page faults alone cost about as much as the multiply)."""
    w_P = weights_TK.reshape(-1)[meta.order_P[rows]].to(y_PD.dtype)
    out_TD = y_PD.new_zeros(meta.num_tokens, y_PD.shape[-1]) if out is None else out
    in_place = owned and not (torch.is_grad_enabled() and (y_PD.requires_grad or w_P.requires_grad))
    weighted_PD = y_PD.mul_(w_P[:, None]) if in_place else y_PD * w_P[:, None]
    return out_TD.index_add_(0, meta.token_P[rows], weighted_PD)  # in place under autograd too: backward needs no out


def _token_of_copy(order_P: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each copy's token, ``order_P // top_k`` (in numpy on CPU: a third of torch's op cost)."""
    if order_P.device.type == "cpu":
        return torch.from_numpy(order_P.numpy() // top_k)
    return order_P // top_k


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device``, without a host sync on CUDA (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # no sync: queued on the current stream


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
# Dispatch metadata


@dataclass(frozen=True)
class Chunk:
    """One chunk of a dispatch: a complete, smaller all-to-all. Split lists are host ints."""

    rows: slice  # its rows of the send buffer (sends are chunk-major, so they are contiguous)
    input_splits: list[int]  # copies sent to each rank
    output_splits: list[int]  # copies received from each rank
    tokens_per_expert: list[int]  # rows per local expert
    runs: list[int]  # the rows the experts get, as runs of consecutive rows of one local expert each
    run_experts: list[int] | None  # the local expert of each run; None: run l is expert l (expert-major)
    to_expert_major_R: torch.Tensor | None  # received (source-major) -> expert-major; None without a group
    to_source_major_R: torch.Tensor | None  # its inverse


@dataclass(frozen=True)
class DispatchMeta:
    """What combine needs to undo a dispatch; dispatchers keep no per-call state."""

    num_tokens: int  # T
    top_k: int  # K
    order_P: torch.Tensor  # flat copy index (t·K + k) of each sent copy, in send order
    token_P: torch.Tensor  # its token, order_P // K
    chunks: tuple[Chunk, ...]  # one on the serial path

    @property
    def input_splits(self) -> list[int]:
        """Copies sent to each rank, over all chunks."""
        return [sum(s) for s in zip(*(c.input_splits for c in self.chunks), strict=True)]

    @property
    def output_splits(self) -> list[int]:
        """Copies received from each rank, over all chunks."""
        return [sum(s) for s in zip(*(c.output_splits for c in self.chunks), strict=True)]

    @property
    def tokens_per_expert(self) -> list[int]:
        """Rows per local expert, over all chunks."""
        return [sum(s) for s in zip(*(c.tokens_per_expert for c in self.chunks), strict=True)]


# ---------------------------------------------------------------------------------------------
# Dispatchers


class Dispatcher:
    """Plans, sends and brings back the token copies of one layer. ``group`` None: EP = 1, every
    expert local, no collectives (``LocalDispatcher``); else the EP group (NCCL on GPUs, gloo on
    CPU), passed in, never global (``AllToAllDispatcher``).

    The pieces (``plan``, ``send``, ``to_expert_major``, ``to_source_major``, ``exchange``,
    ``unpermute``) are what the layer pipelines chunk by chunk; ``dispatch`` and ``combine`` are
    the serial path's two halves, what the harness times against its references.
    """

    transport = "collective"  # or "local_copy": the compute-only step (runtime/collective.py)

    def __init__(self, expert_to_rank: tuple[int, ...], group=None):
        self.group = group
        self.rank, self.ep_size = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        self.expert_to_rank = tuple(expert_to_rank)
        self.local_experts = local_experts(self.expert_to_rank, self.rank)
        self.slot_E = slot_of_expert(self.expert_to_rank)
        self._expert_of_slot_S = torch.argsort(self.slot_E).numpy()
        self._local_L = np.array(self.local_experts, dtype=np.int64)
        self._owner_EW = np.eye(self.ep_size, dtype=np.int64)[list(self.expert_to_rank)]  # one-hot owner rank
        self._run_experts = list(range(len(self.local_experts))) * self.ep_size  # received runs' experts
        self.slowdown = injected_slowdown()

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Every rank's copies per expert, [W, E] (an all-gather; no collective at EP = 1)."""
        if self.group is None:
            return counts_E[None]
        counts_WE = counts_E.new_empty(self.ep_size * counts_E.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch < 2.12
        gather(counts_WE, counts_E.contiguous(), group=self.group)
        return counts_WE.view(self.ep_size, -1)

    def plan(self, ids_TK, keep_TK, kept_WE: torch.Tensor, chunks: int = 1, expert_major: bool = True) -> DispatchMeta:
        """Send order and per-chunk splits and layouts. ``kept_WE`` is on the host (the layer synced
        once after ``exchange_counts``), so every split is a host int with no further sync.

        ``expert_major``: the experts need their rows expert-major (the grouped backends); else they
        take the rows as received, in (source rank, local expert) runs (the loop backend), and the
        two reorders are skipped. At EP = 1 there is one source, so both layouts are the same."""
        device = ids_TK.device
        num_tokens, top_k = ids_TK.shape
        if self.group is None and chunks == 1:  # EP 1, serial: one chunk of every kept copy, nothing to reorder
            rows = kept_WE[0].tolist()
            chunk = Chunk(slice(0, sum(rows)), [sum(rows)], [sum(rows)], rows, rows, None, None, None)
            order_P = permute_order(ids_TK, keep_TK, self.slot_E)
            return DispatchMeta(num_tokens, top_k, order_P, _token_of_copy(order_P, top_k), (chunk,))
        kept = kept_WE.numpy()
        per_slot_S = kept[self.rank][self._expert_of_slot_S] if chunks > 1 else None  # for the chunk of each copy
        order_P = permute_order(ids_TK, keep_TK, self.slot_E, per_slot_S, chunks)
        send_CW = chunk_sizes(kept[self.rank], chunks) @ self._owner_EW  # copies sent per chunk and rank
        recv_CWL = chunk_sizes(kept[:, self._local_L], chunks)
        reorder = expert_major and self.ep_size > 1  # received source-major; the experts want expert-major
        first, out = 0, []
        for send_W, recv_WL in zip(send_CW.tolist(), recv_CWL, strict=True):
            tokens_per_expert = recv_WL.sum(axis=0).tolist()
            if expert_major or self.ep_size == 1:  # expert-major: run l is local expert l
                runs, run_experts = tokens_per_expert, None
            else:  # as received: run (s, l) is local expert l's rows from source s
                runs, run_experts = recv_WL.reshape(-1).tolist(), self._run_experts
            n = sum(send_W)
            out.append(
                Chunk(
                    rows=slice(first, first + n),
                    input_splits=send_W,
                    output_splits=recv_WL.sum(axis=1).tolist(),
                    tokens_per_expert=tokens_per_expert,
                    runs=runs,
                    run_experts=run_experts,
                    to_expert_major_R=_to_device(source_to_expert_major(recv_WL), device) if reorder else None,
                    to_source_major_R=_to_device(expert_to_source_major(recv_WL), device) if reorder else None,
                )
            )
            first += n
        return DispatchMeta(num_tokens, top_k, order_P, _token_of_copy(order_P, top_k), tuple(out))

    def send(self, x_TD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The send buffer: every kept copy's row, in send order."""
        return x_TD.index_select(0, meta.token_P)  # on CPU 5x faster than x_TD[idx]

    def exchange(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        """Launch an all-to-all (``.wait()`` for its rows); without a group the rows are already there."""
        if self.group is None:
            return _Ready(x)
        return collective.start(x, output_splits, input_splits, self.group, self.transport)

    def unpermute(self, y_PD, meta: DispatchMeta, weights_TK, owned=False, rows=slice(None), out=None):
        """Each token's copies, back from the experts in send order, summed with their weights
        (``rows``, ``out``: one chunk's rows, added into ``out``)."""
        return unpermute(y_PD, meta, weights_TK, owned, rows, out)

    def stall(self, start: float, device: torch.device) -> None:
        """The test-only slowdown, when set (see the module docstring)."""
        if self.slowdown:
            _stall(self.slowdown, start, device)

    @staticmethod
    def to_expert_major(x_RD: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return x_RD if chunk.to_expert_major_R is None else x_RD.index_select(0, chunk.to_expert_major_R)

    @staticmethod
    def to_source_major(y_RD: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return y_RD if chunk.to_source_major_R is None else y_RD.index_select(0, chunk.to_source_major_R)

    def dispatch(self, x_TD, ids_TK, keep_TK, kept_WE, expert_major=True) -> tuple[torch.Tensor, DispatchMeta]:
        """The serial dispatch: plan, send, exchange, and reorder expert-major when ``expert_major``
        (see ``plan``; the rows come in ``meta.chunks[0].runs``)."""
        start = time.perf_counter()
        meta = self.plan(ids_TK, keep_TK, kept_WE, expert_major=expert_major)
        (chunk,) = meta.chunks
        x_RD = self.exchange(self.send(x_TD, meta), chunk.output_splits, chunk.input_splits).wait()
        x_RD = self.to_expert_major(x_RD, chunk)
        self.stall(start, x_TD.device)
        return x_RD, meta

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The serial combine: reorder source-major (when dispatch did), exchange back, weighted sum per token."""
        (chunk,) = meta.chunks
        y_PD = self.exchange(self.to_source_major(y_RD, chunk), chunk.input_splits, chunk.output_splits).wait()
        # an exchange's output is ours to scale in place; without a group it is the caller's y_RD
        return self.unpermute(y_PD, meta, weights_TK, owned=self.group is not None)


class _Ready:
    """An exchange with nothing to exchange (EP = 1)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def wait(self) -> torch.Tensor:
        return self.x


class LocalDispatcher(Dispatcher):
    """EP = 1: every expert is local; dispatch is a sort by expert, combine its inverse."""

    def __init__(self, num_experts: int):
        super().__init__((0,) * num_experts)


class AllToAllDispatcher(Dispatcher):
    """EP > 1 (or a one-rank group, to run the collective path at EP = 1)."""

    def __init__(self, expert_to_rank: tuple[int, ...], group):
        super().__init__(expert_to_rank, group)
