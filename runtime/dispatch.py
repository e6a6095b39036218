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

``DispatchMeta`` carries everything combine needs; dispatchers keep no per-call state. The
index arithmetic (send order, chunk sizes, reorders, unpermute) is pure functions in
``runtime/permute.py``. Two dispatchers, one per path:
  ``LocalDispatcher``     EP = 1 without a group: every expert local, one source, so the send
                          order is already expert-major; no collective, no reorder, no transport.
  ``AllToAllDispatcher``  an EP group (NCCL on GPUs, gloo on CPU), passed in, never global; a
                          one-rank group runs the collective path at EP = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from runtime import collective
from runtime.permute import (
    chunk_sizes,
    expert_to_source_major,
    permute_order,
    slot_of_expert,
    source_to_expert_major,
    to_device,
    token_of_copy,
    unpermute,
)
from runtime.placement import local_experts

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
    """What both dispatchers share: the send, the reorders, the weighted sum, and the serial path.

    The pieces (``plan``, ``send``, ``to_expert_major``, ``to_source_major``, ``exchange``,
    ``unpermute``) are what the layer pipelines chunk by chunk; ``dispatch`` and ``combine`` are
    the serial path's two halves, what the harness times against its references. A subclass gives
    ``exchange_counts``, ``plan`` and ``exchange``, and its identity: ``group``, ``rank``,
    ``ep_size``, ``expert_to_rank``, ``local_experts``.
    """

    exchange_copies: bool  # an exchange returns a fresh tensor (combine may scale it in place)

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Every rank's copies per expert, [W, E]."""
        raise NotImplementedError

    def plan(self, ids_TK, keep_TK, kept_WE: torch.Tensor, chunks: int = 1, expert_major: bool = True) -> DispatchMeta:
        """Send order and per-chunk splits and layouts (``kept_WE`` on the host)."""
        raise NotImplementedError

    def exchange(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        """Launch an exchange; ``.wait()`` gives the received rows."""
        raise NotImplementedError

    def send(self, x_TD: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The send buffer: every kept copy's row, in send order."""
        return x_TD.index_select(0, meta.token_P)  # on CPU 5x faster than x_TD[idx]

    def unpermute(self, y_PD, meta: DispatchMeta, weights_TK, owned=False, rows=slice(None), out=None):
        """Each token's copies, back from the experts in send order, summed with their weights
        (``rows``, ``out``: one chunk's rows, added into ``out``)."""
        return unpermute(y_PD, meta.order_P, meta.token_P, meta.num_tokens, weights_TK, owned, rows, out)

    @staticmethod
    def to_expert_major(x_RD: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return x_RD if chunk.to_expert_major_R is None else x_RD.index_select(0, chunk.to_expert_major_R)

    @staticmethod
    def to_source_major(y_RD: torch.Tensor, chunk: Chunk) -> torch.Tensor:
        return y_RD if chunk.to_source_major_R is None else y_RD.index_select(0, chunk.to_source_major_R)

    def dispatch(self, x_TD, ids_TK, keep_TK, kept_WE, expert_major=True) -> tuple[torch.Tensor, DispatchMeta]:
        """The serial dispatch: plan, send, exchange, and reorder expert-major when ``expert_major``
        (see ``plan``; the rows come in ``meta.chunks[0].runs``)."""
        meta = self.plan(ids_TK, keep_TK, kept_WE, expert_major=expert_major)
        (chunk,) = meta.chunks
        x_RD = self.exchange(self.send(x_TD, meta), chunk.output_splits, chunk.input_splits).wait()
        return self.to_expert_major(x_RD, chunk), meta

    def combine(self, y_RD: torch.Tensor, weights_TK: torch.Tensor, meta: DispatchMeta) -> torch.Tensor:
        """The serial combine: reorder source-major (when dispatch did), exchange back, weighted sum per token."""
        (chunk,) = meta.chunks
        y_PD = self.exchange(self.to_source_major(y_RD, chunk), chunk.input_splits, chunk.output_splits).wait()
        # an exchange's output is ours to scale in place; a local one hands back the caller's y_RD
        return self.unpermute(y_PD, meta, weights_TK, owned=self.exchange_copies)


class _Ready:
    """An exchange with nothing to exchange (EP = 1)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def wait(self) -> torch.Tensor:
        return self.x


class LocalDispatcher(Dispatcher):
    """EP = 1: every expert is local; dispatch is a sort by expert, combine its inverse.

    One source rank, so the send order (by expert, then token) is already expert-major: every
    layout is the same, and the exchange hands the rows back as they are."""

    group = None
    rank, ep_size = 0, 1
    exchange_copies = False  # the rows come back as the caller's own tensor

    def __init__(self, num_experts: int):
        self.expert_to_rank = (0,) * num_experts
        self.local_experts = tuple(range(num_experts))
        self.slot_E = torch.arange(num_experts)  # slot of expert e is e (one rank)

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """This rank's copies per expert as the [1, E] matrix (no collective)."""
        return counts_E[None]

    def plan(self, ids_TK, keep_TK, kept_WE: torch.Tensor, chunks: int = 1, expert_major: bool = True) -> DispatchMeta:
        """The kept copies by expert then token (by chunk first when ``chunks`` > 1); chunk i holds
        ``chunk_sizes`` part i of every expert's copies. ``expert_major`` changes nothing here."""
        num_tokens, top_k = ids_TK.shape
        if chunks == 1:  # serial: one chunk of every kept copy
            rows = kept_WE[0].tolist()
            chunk = Chunk(slice(0, sum(rows)), [sum(rows)], [sum(rows)], rows, rows, None, None, None)
            order_P = permute_order(ids_TK, keep_TK, self.slot_E)
            return DispatchMeta(num_tokens, top_k, order_P, token_of_copy(order_P, top_k), (chunk,))
        kept_E = kept_WE[0].numpy()
        order_P = permute_order(ids_TK, keep_TK, self.slot_E, kept_E, chunks)
        first, out = 0, []
        for rows_E in chunk_sizes(kept_E, chunks).tolist():
            n = sum(rows_E)
            out.append(Chunk(slice(first, first + n), [n], [n], rows_E, rows_E, None, None, None))
            first += n
        return DispatchMeta(num_tokens, top_k, order_P, token_of_copy(order_P, top_k), tuple(out))

    def exchange(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> _Ready:
        """Nothing to exchange: the rows are already here."""
        return _Ready(x)


class AllToAllDispatcher(Dispatcher):
    """EP > 1 over ``group`` (or a one-rank group, to run the collective path at EP = 1).

    ``transport``: "collective" (``all_to_all_single``) or "local_copy", the compute-only step
    (runtime/collective.py); ``set_transport`` switches it between timed rounds."""

    exchange_copies = True

    def __init__(self, expert_to_rank: tuple[int, ...], group, transport: str = "collective"):
        self.set_transport(transport)
        self.group = group
        self.rank, self.ep_size = dist.get_rank(group), dist.get_world_size(group)
        self.expert_to_rank = tuple(expert_to_rank)
        self.local_experts = local_experts(self.expert_to_rank, self.rank)
        self.slot_E = slot_of_expert(self.expert_to_rank)
        self._expert_of_slot_S = torch.argsort(self.slot_E).numpy()
        self._local_L = np.array(self.local_experts, dtype=np.int64)
        self._owner_EW = np.eye(self.ep_size, dtype=np.int64)[list(self.expert_to_rank)]  # one-hot owner rank
        self._run_experts = list(range(len(self.local_experts))) * self.ep_size  # received runs' experts

    def set_transport(self, transport: str) -> None:
        """Exchange over ``transport`` from the next call on (one of ``collective.TRANSPORTS``)."""
        if transport not in collective.TRANSPORTS:
            accepted = ", ".join(map(repr, collective.TRANSPORTS))
            raise ValueError(f"transport = {transport!r} is invalid: accepted one of {accepted}")
        self.transport = transport

    def exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """Every rank's copies per expert, [W, E] (one all-gather)."""
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
                    to_expert_major_R=to_device(source_to_expert_major(recv_WL), device) if reorder else None,
                    to_source_major_R=to_device(expert_to_source_major(recv_WL), device) if reorder else None,
                )
            )
            first += n
        return DispatchMeta(num_tokens, top_k, order_P, token_of_copy(order_P, top_k), tuple(out))

    def exchange(self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]):
        """Launch an all-to-all over the group (``.wait()`` for its rows)."""
        return collective.start(x, output_splits, input_splits, self.group, self.transport)
