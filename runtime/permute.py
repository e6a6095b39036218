"""The pure index arithmetic of dispatch: send order, chunk sizes, layout reorders, unpermute.

Shape legend: T = tokens on this rank, K = top_k, E = experts, W = EP group size, L = experts on
this rank, S = slots (experts listed rank-major, then by id), P = token copies this rank sends,
C = chunks, D = hidden.

Functions of tensors and host integers with no hidden state, shared by both dispatchers
(runtime/dispatch.py) and tested on their own (tests/test_dispatch_properties.py). Host index
arithmetic runs in numpy: a tiny torch op costs ~10 µs of dispatch, and these run per layer per step.
"""

from __future__ import annotations

import numpy as np
import torch


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
    # sync: nonzero's output size (P, the kept copies) is data-dependent, so CUDA tells the host
    kept_P = torch.nonzero(keep_TK.reshape(-1)).squeeze(1)
    slots_P = slot_E.to(ids_TK.device)[ids_TK.reshape(-1)[kept_P]]  # a small host-to-device copy (E slots)
    by_slot = torch.sort(slots_P, stable=True).indices
    order_P = kept_P[by_slot]
    if chunks == 1:
        return order_P
    per_slot_S = to_device(torch.from_numpy(np.asarray(per_slot_S, dtype=np.int64)), ids_TK.device)
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


ORDERED_SUM_K = 3  # from this top_k on, a token's copies are summed in k order (``unpermute``)


def unpermute(
    y_PD: torch.Tensor,
    order_P: torch.Tensor,
    token_P: torch.Tensor,
    num_tokens: int,
    weights_TK: torch.Tensor,
    owned=False,
    rows=slice(None),
    out=None,
) -> torch.Tensor:
    """out[t] = Σ over kept copies c of token t: weights[c] · y[c]; zeros for tokens with none.

    ``order_P``: each sent copy's flat (token, k) index; ``token_P``: its token (a dispatch's
    ``DispatchMeta`` holds both); ``num_tokens``: T, the rows of ``out``.

    ``rows``: ``y_PD`` holds only those rows of the send order (one chunk), added into ``out`` (a
    fresh zero tensor when None). ``owned``: the caller owns ``y_PD`` and needs it no more, so the
    weights scale it in place when no gradient flows through it (saves a [P, D] allocation: on CPU
    its page faults alone cost about as much as the multiply).

    The sum's order. Two addends give the same bits in either order, so with K <= 2 the copies are added
    into their tokens as they come (``index_add_``). With K >= 3 the order of a token's additions would
    follow the send order, which the placement of its experts decides (and on CUDA, atomics), so each
    weighted copy is put in its own (token, k) slot and the K slots are summed: the same bits whatever
    the placement (what a re-placement's exactness needs). That path takes the whole send order at once
    (``rows`` all, ``out`` None)."""
    w_P = weights_TK.reshape(-1)[order_P[rows]].to(y_PD.dtype)
    in_place = owned and not (torch.is_grad_enabled() and (y_PD.requires_grad or w_P.requires_grad))
    weighted_PD = y_PD.mul_(w_P[:, None]) if in_place else y_PD * w_P[:, None]
    top_k = weights_TK.shape[1]
    if top_k >= ORDERED_SUM_K:
        if out is not None or rows != slice(None):
            raise ValueError(f"unpermute with top_k = {top_k} takes every copy at once: accepted rows = all, no out")
        slots_SD = weighted_PD.new_zeros(num_tokens * top_k, weighted_PD.shape[-1])
        return slots_SD.index_copy(0, order_P, weighted_PD).view(num_tokens, top_k, -1).sum(1)
    out_TD = y_PD.new_zeros(num_tokens, y_PD.shape[-1]) if out is None else out
    return out_TD.index_add_(0, token_P[rows], weighted_PD)  # in place under autograd too: backward needs no out


def token_of_copy(order_P: torch.Tensor, top_k: int) -> torch.Tensor:
    """Each copy's token, ``order_P // top_k`` (in numpy on CPU: a third of torch's op cost)."""
    if order_P.device.type == "cpu":
        return torch.from_numpy(order_P.numpy() // top_k)
    return order_P // top_k


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host index tensor on ``device``, without a host sync on CUDA (pinned, non-blocking copy)."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)  # no sync: queued on the current stream
