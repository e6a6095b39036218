"""Checkpoints of expert-parallel training state with ``torch.distributed.checkpoint`` (DCP).

What is saved: for every layer, the router (replicated: the same key on every rank, which DCP
writes once) and each expert's weights under its *global* expert id, plus the optimizer's state
the same way (Adam's ``exp_avg`` and ``exp_avg_sq`` per expert, its ``step`` once) and the
training step. Keys:

    layers.{l}.router.weight_ED                    layers.{l}.experts.{e}.w_in_DH / .w_down_FD
    optim.layers.{l}.router.weight_ED.{name}       optim.layers.{l}.experts.{e}.w_in_DH.{name} ...
    optim.layers.{l}.experts.w_in_LDH.step         train.step          ({name}: exp_avg, exp_avg_sq, step)

Because experts are keyed by global id, not by rank, a checkpoint saved at one EP size loads at
any other (resharding): each rank asks DCP for the experts it owns now. Each save goes to its own
folder ``step-{s:08d}``; DCP writes the folder's ``.metadata`` last, after every rank's data, so
``latest`` only ever finds complete checkpoints (a crash mid-save leaves one without it).

Loading is weights-only. Every value is a tensor, which DCP reads with ``torch.load(...,
weights_only=True)``; DCP's ``.metadata`` file is a pickle, which ``SafeReader`` reads with an
unpickler that accepts only DCP's own metadata classes, torch's size, dtype and layout lookups and
a path; metadata declaring a non-tensor value is refused, and the load planner refuses to unpickle
bytes, so a crafted checkpoint cannot run code. The optimizer is Adam (``exp_avg``, ``exp_avg_sq``,
a host ``step``); others are refused. Redundant experts and offloaded experts are not checkpointed
(inference features; training refuses them).
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader

STEP_DIR = "step-{:08d}"
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch": {"Size", "float32", "float64", "float16", "bfloat16", "int64", "int32", "uint8", "bool", "strided"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
    "torch.serialization": {"_get_layout"},  # a layout looked up by its name
    "pathlib": {"PosixPath", "WindowsPath"},  # the checkpoint id DCP records
}


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that builds only DCP's metadata classes and torch's size and dtype types."""

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}: refused (weights-only loading accepts DCP metadata only)"
        )


class SafeReader(FileSystemReader):
    """DCP's file reader, reading ``.metadata`` with ``_MetadataUnpickler`` instead of ``pickle.load``,
    and refusing metadata that declares anything but tensors: DCP reads a value the metadata calls
    bytes with ``torch.load(weights_only=False)``, which could run code."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = _MetadataUnpickler(io.BytesIO(stream.read())).load()
        if not isinstance(metadata, dcp_metadata.Metadata):
            raise pickle.UnpicklingError(f"{path}: not checkpoint metadata: refused")
        for key, value in metadata.state_dict_metadata.items():
            if not isinstance(value, dcp_metadata.TensorStorageMetadata):
                raise pickle.UnpicklingError(f"{path}: key {key!r} is not a tensor: refused (weights-only loading)")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _params(layers) -> list[tuple[str, torch.nn.Parameter, list[tuple[str, int | None]]]]:
    """Per parameter: its key, itself, and its saved pieces (key, expert slice index or None: whole)."""
    out = []
    for l, layer in enumerate(layers):
        if not layer.replicas.identity:  # local slots are physical experts, not the logical ones keyed below
            raise ValueError(
                "checkpointing a layer with redundant or re-placed experts is refused: accepted plain layers"
            )
        out.append((f"layers.{l}.router.weight_ED", layer.router.weight_ED, [(f"layers.{l}.router.weight_ED", None)]))
        for stacked, piece, param in (
            ("w_in_LDH", "w_in_DH", layer.experts.w_in_LDH),
            ("w_down_LFD", "w_down_FD", layer.experts.w_down_LFD),
        ):
            pieces = [(f"layers.{l}.experts.{e}.{piece}", i) for i, e in enumerate(layer.local_experts)]
            out.append((f"layers.{l}.experts.{stacked}", param, pieces))
    return out


def state_dict(layers, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> dict[str, torch.Tensor]:
    """This rank's part of the checkpoint: views into the live weights and optimizer state, so that
    ``dcp.load`` into it writes straight into them. Creates the optimizer's state when it has none
    yet (a fresh optimizer being loaded into), zeros, as Adam makes it on its first step."""
    if optimizer is not None and (type(optimizer) is not torch.optim.Adam or _adam_option(optimizer)):
        raise ValueError(
            f"checkpointing the optimizer {type(optimizer).__name__} is refused: accepted torch.optim.Adam without "
            "amsgrad, fused or capturable (its state is exp_avg, exp_avg_sq and a host step)"
        )
    state: dict[str, torch.Tensor] = {"train.step": torch.tensor(step, dtype=torch.int64)}
    for param_key, param, pieces in _params(layers):
        for key, i in pieces:
            state[key] = param.data if i is None else param.data[i]
        if optimizer is None:
            continue
        slots = optimizer.state[param]
        if not slots:  # Adam's lazy state, made here so that a load has somewhere to go
            slots["step"] = torch.tensor(0.0)
            slots["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            slots["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        for name, value in slots.items():
            if value.dim() == 0:  # one per parameter (Adam's step), the same on every rank
                state[f"optim.{param_key}.{name}"] = value
                continue
            for key, i in pieces:
                state[f"optim.{key}.{name}"] = value if i is None else value[i]
    return state


def _adam_option(optimizer) -> bool:
    """Whether an Adam option that changes the state's layout or device is on."""
    return any(group.get(k) for group in optimizer.param_groups for k in ("amsgrad", "fused", "capturable"))


def save(directory: str | Path, layers, optimizer, step: int, group=None) -> Path:
    """Save the training state after ``step`` steps to ``directory/step-{step}`` (every rank calls)."""
    path = Path(directory) / STEP_DIR.format(step)
    state = {k: v.detach().clone() for k, v in state_dict(layers, optimizer, step).items()}  # views -> own storage
    with _single_process_quiet(group):
        dcp.save(state, checkpoint_id=path, process_group=group, no_dist=group is None)
    return path


def latest(directory: str | Path) -> Path | None:
    """The newest complete checkpoint under ``directory`` (its ``.metadata`` written), or None."""
    found = sorted(p for p in Path(directory).glob("step-*") if (p / ".metadata").is_file())
    return found[-1] if found else None


class _TensorsOnly(DefaultLoadPlanner):
    """DCP's load planner, except that it never unpickles a bytes value (the second guard, after
    ``SafeReader``'s check of the metadata)."""

    def load_bytes(self, read_item, value) -> None:
        raise pickle.UnpicklingError(f"checkpoint value {read_item.dest_index.fqn!r} is bytes: refused (weights-only)")


@torch.no_grad()
def load(path: str | Path, layers, optimizer=None, group=None) -> int:
    """Load a checkpoint into this rank's layers (and optimizer), whatever EP size saved it; returns
    the step it was saved after. Weights-only: see the module docstring."""
    state = state_dict(layers, optimizer)
    SafeReader(path).read_metadata()  # its refusal raised here, not wrapped in DCP's CheckpointException
    with _single_process_quiet(group):
        dcp.load(
            state,
            checkpoint_id=path,
            storage_reader=SafeReader(path),
            planner=_TensorsOnly(),
            process_group=group,
            no_dist=group is None,
        )
    return int(state["train.step"])


@contextlib.contextmanager
def _single_process_quiet(group):
    """Without a group DCP warns that it assumes one process: that is what no group means here."""
    with warnings.catch_warnings():
        if group is None:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield
