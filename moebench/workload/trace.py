"""Routing traces: recorded expert choices, replayed in place of the router's, so a benchmark can
run the routing a user's own model produces.

Shape legend: L = layers, N = trace tokens, T = tokens on this rank, K = top_k, E = experts.

The format, ``moebench.routing/1``, is a ``.npz`` file (``numpy.savez``) or a JSON file with:

- ``format``: the string "moebench.routing/1";
- ``num_experts``: E, the experts the ids index;
- ``ids``: integers [L, N, K]: for each layer, each token, its K expert choices (distinct, in
  [0, E)); the order within a token does not matter;
- ``params`` (optional): a JSON string (npz) or table (JSON) saying where the trace came from.

Tokens are in the order they were routed: batch by batch, and within a batch rank by rank
(``moebench run --record-routing`` writes them so). Replay gives batch b of rank r (of W ranks,
T tokens each) the rows ``(b·W + r)·T + i`` for i < T, modulo N: a trace recorded by a run of
the same shape is replayed exactly, and a longer or shorter one is cycled through. A trace needs
at least W·T tokens (one batch of every rank).

Replay keeps the rest of the router: its logits, softmax, losses and the combine weights (the
softmax probabilities of the replayed experts, renormalised when ``normalize_topk``) are computed
as usual; only the choice of experts comes from the trace.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moebench import atomic
from moebench.text import clip
from runtime.router import Router, RouterOutput

FORMAT = "moebench.routing/1"


@dataclass(frozen=True)
class RoutingTrace:
    ids_LNK: np.ndarray  # int64 expert ids
    num_experts: int
    source: str  # the file it was read from

    @property
    def layers(self) -> int:
        return self.ids_LNK.shape[0]

    @property
    def tokens(self) -> int:
        return self.ids_LNK.shape[1]

    @property
    def top_k(self) -> int:
        return self.ids_LNK.shape[2]


def trace_file(scenario_path: str | Path, trace: str) -> Path:
    """A scenario's ``trace`` file: a relative path is relative to the scenario file's folder."""
    return Path(scenario_path).parent / trace


def save(path: str | Path, ids_LNK: np.ndarray, num_experts: int, params: dict | None = None) -> None:
    """Write a trace as ``.npz`` (the format above), atomically (``moebench.atomic``)."""
    ids = np.asarray(ids_LNK)
    dtype = np.int16 if num_experts <= np.iinfo(np.int16).max else np.int32

    def fill(f) -> None:
        np.savez(f, format=FORMAT, num_experts=num_experts, ids=ids.astype(dtype), params=json.dumps(params or {}))

    atomic.write(path, fill, binary=True)


def load(path: str | Path) -> RoutingTrace:
    """Read a ``.npz`` or ``.json`` trace; ``ValueError`` naming the file and what is wrong."""
    path = Path(path)
    try:
        if path.suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(doc, dict):
                raise ValueError("a JSON trace is a table with format, num_experts and ids")
            fmt, experts, ids = doc.get("format"), doc.get("num_experts"), doc.get("ids")
        else:
            fmt, experts, ids = _read_npz(path)
            fmt, experts = (None if v is None else v[()] for v in (fmt, experts))
    except RecursionError:
        raise ValueError(f"{path}: not a readable routing trace ({FORMAT}): nested too deeply") from None
    except (OSError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError) as err:
        reason = getattr(err, "strerror", None) or clip(
            str(err).splitlines()[0] if str(err) else type(err).__name__, 200
        )
        raise ValueError(f"{path}: not a readable routing trace ({FORMAT}, .npz or .json): {reason}") from None
    if str(fmt) != FORMAT:
        raise ValueError(f"{path}: format = {clip(repr(str(fmt)))} is invalid: accepted {FORMAT!r}")
    if isinstance(experts, (bool, np.bool_)) or not isinstance(experts, (int, np.integer)) or experts < 1:
        raise ValueError(f"{path}: num_experts = {clip(str(experts))} is invalid: accepted an integer >= 1")
    return RoutingTrace(_ids_array(path, ids, int(experts)), int(experts), str(path))


def _read_npz(path: Path) -> tuple:
    """The ``format``, ``num_experts`` and ``ids`` arrays of an ``.npz`` (``None`` for a missing one);
    ``ValueError`` saying what the file is instead (a lone ``.npy`` array, text, a member that is no array)."""
    with path.open("rb") as f:
        head = f.read(6)
    if head.startswith(b"\x93NUMPY"):
        raise ValueError("a single .npy array, not an .npz archive holding format, num_experts and ids")
    if not head.startswith(b"PK"):
        raise ValueError("neither an .npz archive (a zip of numpy arrays) nor a .json file (which needs that suffix)")
    with np.load(path, allow_pickle=False) as npz:
        found = []
        for key in ("format", "num_experts", "ids"):
            if key not in npz:
                found.append(None)
                continue
            try:
                value = npz[key]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError):
                value = None  # an object array, a damaged or encrypted member
            if not isinstance(value, np.ndarray):  # numpy hands a member without the .npy header back as bytes
                raise ValueError(f"member {key!r} is not a numpy array (a plain, non-object .npy inside the zip)")
            found.append(value)
    return tuple(found)


def _ids_array(path: Path, ids, num_experts: int) -> np.ndarray:
    """``ids`` as int64 [layers, tokens, top_k]; ``ValueError`` naming what it is instead."""
    accepted = "accepted integer expert ids [layers, tokens, top_k]"
    if ids is None:
        raise ValueError(f"{path}: ids is missing: {accepted}")
    try:
        array = np.asarray(ids)
    except (ValueError, OverflowError):  # ragged lists
        array = np.asarray([])
    if array.ndim != 3 or 0 in array.shape:
        if array.size == 0:
            what = "is empty or ragged"
        elif array.ndim == 0:
            what = f"= {clip(str(ids))} is a single value"
        else:
            what = f"of shape {'x'.join(map(str, array.shape))} is invalid"
        raise ValueError(f"{path}: ids {what}: {accepted}")
    if isinstance(ids, list) and any(isinstance(v, bool) for v in np.asarray(ids, dtype=object).ravel()):
        array = array.astype(bool)  # JSON true/false among the ids, which numpy would read as 1 and 0
    if array.dtype.kind not in "iu":
        kind = {"b": "booleans", "f": "floats", "O": "values that are not 64-bit integers"}
        raise ValueError(f"{path}: ids of {kind.get(array.dtype.kind, str(array.dtype))} is invalid: {accepted}")
    if array.dtype.kind == "u" and array.max() > np.iinfo(np.int64).max:  # int64 would wrap it negative
        raise ValueError(
            f"{path}: expert id {clip(str(int(array.max())))} is out of range: accepted ids from 0 to {num_experts - 1}"
        )
    return array.astype(np.int64)


def check(trace: RoutingTrace, *, num_experts: int, top_k: int, layers: int, tokens_needed: int) -> None:
    """Refuse a trace the run cannot replay (``ValueError`` naming the file, the value, what is accepted)."""
    where = trace.source
    if trace.num_experts != num_experts:
        raise ValueError(
            f"{where}: num_experts = {clip(str(trace.num_experts))} is invalid: accepted {num_experts} (the model's)"
        )
    if trace.top_k != top_k:
        raise ValueError(f"{where}: {trace.top_k} choices per token is invalid: accepted {top_k} (the model's top_k)")
    if trace.layers != layers:
        raise ValueError(f"{where}: {trace.layers} layers is invalid: accepted {layers} (the model's layers)")
    low, high = int(trace.ids_LNK.min()), int(trace.ids_LNK.max())
    if low < 0 or high >= num_experts:
        bad = low if low < 0 else high
        raise ValueError(f"{where}: expert id {bad} is out of range: accepted ids from 0 to {num_experts - 1}")
    if top_k > 1:
        ordered = np.sort(trace.ids_LNK, axis=2)
        repeats = np.argwhere((ordered[:, :, 1:] == ordered[:, :, :-1]).any(axis=2))
        if len(repeats):
            layer, token = repeats[0]
            raise ValueError(
                f"{where}: layer {layer}, token {token} chooses one expert twice: accepted {top_k} distinct ids"
            )
    if trace.tokens < tokens_needed:
        raise ValueError(
            f"{where}: {trace.tokens} tokens is too few: accepted at least {tokens_needed} "
            "(tokens_per_rank x world_size, one batch of every rank)"
        )


def batch_rows(trace: RoutingTrace, batch: int, rank: int, world_size: int, tokens_per_rank: int) -> np.ndarray:
    """The ids [L, T, K] of one rank's batch: rows (b·W + r)·T + i, modulo the trace's tokens."""
    start = (batch * world_size + rank) * tokens_per_rank
    rows = (start + np.arange(tokens_per_rank)) % trace.tokens
    return trace.ids_LNK[:, rows, :]


class ReplayRouter(Router):
    """A ``Router`` whose expert choices come from a trace (``use``); everything else runs as usual."""

    def __init__(self, router: Router):
        super().__init__(router.weight_ED.shape[1], router.weight_ED.shape[0], router.top_k, router.normalize)
        self.load_state_dict(router.state_dict())
        self.to(router.weight_ED.device)
        self.ids_TK: torch.Tensor | None = None

    def use(self, ids_TK: torch.Tensor) -> None:
        """The choices the next calls replay, one row per token of the input."""
        self.ids_TK = ids_TK.to(self.weight_ED.device, torch.long)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        routed = super().forward(x_TD)
        if self.ids_TK is None or self.ids_TK.shape[0] != x_TD.shape[0]:
            rows = None if self.ids_TK is None else self.ids_TK.shape[0]
            raise ValueError(f"ReplayRouter: {x_TD.shape[0]} tokens but {rows} replayed rows: call use() first")
        weights_TK = routed.probs_TE.gather(1, self.ids_TK)
        if self.normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(routed.logits_TE, routed.probs_TE, weights_TK, self.ids_TK)


def replay(stack, ids_LTK: np.ndarray) -> None:
    """Make every layer of ``stack`` replay its rows of ``ids_LTK``; the stack was built with replay
    routers (``MoEStack(..., wrap_router=ReplayRouter)``)."""
    for layer, ids_TK in zip(stack.layers, ids_LTK, strict=True):
        if not isinstance(layer.router, ReplayRouter):
            raise TypeError("replay needs a stack built with wrap_router=ReplayRouter")
        layer.router.use(torch.from_numpy(np.ascontiguousarray(ids_TK)))


def stack_routes(stack, x_TD: torch.Tensor) -> np.ndarray:
    """The expert choices [L, T, K] each layer of ``stack`` makes on ``x_TD`` (one forward)."""
    routes = []
    with torch.no_grad():
        h_TD = x_TD
        for layer in stack.layers:
            routes.append(layer.router(h_TD).ids_TK.cpu().numpy())
            h_TD = h_TD + layer(h_TD).out_TD
    return np.stack(routes)


def assemble(per_rank_batches: list[list[np.ndarray]]) -> np.ndarray:
    """Every rank's recorded batches ([rank][batch] of [L, T, K]) in trace order: [L, N, K]."""
    batches = len(per_rank_batches[0])
    ordered = [per_rank_batches[rank][b] for b in range(batches) for rank in range(len(per_rank_batches))]
    return np.concatenate(ordered, axis=1)
