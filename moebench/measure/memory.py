"""Training memory, measured: bytes of tensors saved for backward (``SavedTensors``), of a set of tensors
(``tensor_bytes``) and of an optimizer's state (``optimizer_state_bytes``). Every count is of
*storages*: a tensor and its views (or two views of one buffer) count once, at the storage's full size.

``SavedTensors`` sees what autograd packs through ``torch.autograd.graph.saved_tensors_hooks``: the
innermost hooks take over, so inside a non-reentrant ``torch.utils.checkpoint`` region only what the
checkpoint itself saves for the recomputation (its tensor inputs, packed before its own hooks are
installed) reaches these hooks, and recomputed tensors never do. The formula these numbers are held
against is ``moebench.plan.memory``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def _storage_key(t: torch.Tensor) -> tuple[int, str]:
    storage = t.untyped_storage()
    return storage.data_ptr(), str(t.device)


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Σ storage bytes over ``tensors``, each storage once (views of one buffer count once)."""
    seen: dict[tuple[int, str], int] = {}
    for t in tensors:
        seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (Adam's exp_avg, exp_avg_sq and its ``step`` scalars
    included); 0 for a stateless one (SGD without momentum, or before its first step)."""
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


class SavedTensors:
    """Within ``with SavedTensors(params) as saved:``, every tensor autograd packs for backward is
    recorded by storage; ``saved.bytes`` is their total, each storage once, leaving out the storages of
    ``exclude`` (the parameters: a matmul saves its weight, which is no activation).

    A storage is known by its address (and device), unique while it lives; every saved storage lives
    until backward frees the graph, so count one forward (its loss and backward may run inside the block:
    backward packs nothing). A second forward after a backward could reuse a freed address, uncounted."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._excluded = {_storage_key(p) for p in exclude}
        self._storages: dict[tuple[int, str], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self._excluded:
            self._storages.setdefault(key, t.untyped_storage().nbytes())
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        """Bytes of the distinct storages saved so far."""
        return sum(self._storages.values())

    @property
    def storages(self) -> int:
        """How many distinct storages were saved."""
        return len(self._storages)


__all__ = ["SavedTensors", "optimizer_state_bytes", "tensor_bytes"]
