"""Start ranks on this host, or join the ranks ``torchrun`` started, with one code path.

``launch(fn, world_size, ...)`` calls ``fn(ctx, *args)`` on every rank with a ``RankContext``
(rank, world size, process group, device) and returns every rank's return value in rank order.

- Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR in the environment) it joins the process
  group torchrun's rendezvous describes (``init_method="env://"``): single- or multi-node. The
  group is joined once per process and kept for later launches; it is destroyed at exit.
- Otherwise it spawns ``world_size`` processes on this host with a loopback rendezvous on a free
  port. A rank that raises makes ``launch`` raise in the caller.

Backends: "nccl" needs one GPU per rank (NCCL refuses two ranks on one GPU); "gloo" runs on CPU.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    group: object | None  # the process group (None when world_size == 1 and nothing was started)
    device: torch.device
    backend: str


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def is_rank_zero() -> bool:
    """True in the process that should print: rank 0 under torchrun, or any non-torchrun process."""
    return int(os.environ.get("RANK", "0")) == 0


def resolve_device(device: str, backend: str) -> tuple[str, str]:
    """Turn "auto" choices into concrete ("cpu" | "cuda", "gloo" | "nccl")."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but no CUDA device is visible: accepted 'cpu' or 'auto'")
    if backend == "auto":
        backend = "nccl" if device == "cuda" else "gloo"
    if backend == "nccl" and device != "cuda":
        raise ValueError(f"backend = 'nccl' needs device = 'cuda', got {device!r}: accepted backend 'gloo' on CPU")
    return device, backend


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# glibc mallopt parameters: with the defaults, glibc moves its mmap threshold as buffers are freed,
# so whether a 1 MiB tensor costs page faults depends on the process's allocation history, and two
# runs of the same code differ by up to 2x in small CPU ops. Fixed thresholds remove that.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
STEADY_MALLOC = {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2**30}


def steady_allocator() -> bool:
    """Fix glibc's mmap and trim thresholds in this process (CPU ranks); False where that is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, STEADY_MALLOC["M_MMAP_THRESHOLD"])
    return bool(ok and mallopt(_M_TRIM_THRESHOLD, STEADY_MALLOC["M_TRIM_THRESHOLD"]))


def _init(rank: int, world_size: int, device: str, backend: str, init_method: str) -> RankContext:
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Ranks on one host share its cores: without this, W ranks × all-core thread pools thrash.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, torch.get_num_threads() // local_ranks))
        steady_allocator()
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, **kwargs)
    return RankContext(rank, world_size, dist.group.WORLD, dev, backend)


def _spawned_rank(rank, world_size, device, backend, port, out_dir, fn, args):
    ctx = _init(rank, world_size, device, backend, f"tcp://127.0.0.1:{port}")
    try:
        result = fn(ctx, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


_torchrun_ctx: RankContext | None = None


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error's message (a spawned rank's traceback is one long message)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _leave_torchrun() -> None:
    """At exit: wait for every rank, then destroy the group (a rank tearing down while another
    still talks to it can abort the process)."""
    global _torchrun_ctx
    _torchrun_ctx = None  # drop our reference to the group first: one freed at interpreter teardown aborts
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _join_torchrun(device: str, backend: str) -> RankContext:
    """Join torchrun's process group once per process; later launches reuse it."""
    global _torchrun_ctx
    if _torchrun_ctx is None:
        _torchrun_ctx = _init(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, backend, "env://")
        atexit.register(_leave_torchrun)
    elif (_torchrun_ctx.device.type, _torchrun_ctx.backend) != (device, backend):
        raise ValueError(
            f"device/backend = {device}/{backend} but this torchrun job joined "
            f"{_torchrun_ctx.device.type}/{_torchrun_ctx.backend}: one job uses one of them"
        )
    return _torchrun_ctx


def launch(fn, world_size: int, *args, device: str = "auto", backend: str = "auto") -> list:
    """Run ``fn(ctx, *args)`` on ``world_size`` ranks; return the per-rank results in rank order."""
    device, backend = resolve_device(device, backend)
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world_size:
            raise ValueError(f"world_size = {world_size} but torchrun started {env_world} ranks: they must agree")
        ctx = _join_torchrun(device, backend)
        try:
            outcome = (None, fn(ctx, *args))
        except Exception as err:
            outcome = (f"rank {ctx.rank}: {type(err).__name__}: {last_line(err)}", None)
        # Every rank learns whether any rank failed, so all of them raise (and go on to the next
        # run) together rather than some waiting for the others. A rank that fails while the
        # others sit inside a collective still leaves them waiting until the backend's timeout.
        gathered = [None] * env_world
        dist.all_gather_object(gathered, outcome, group=ctx.group)
        errors = [e for e, _ in gathered if e is not None]
        if errors:
            raise RuntimeError("; ".join(errors))
        return [r for _, r in gathered]
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(
            f"world_size = {world_size} with NCCL needs {world_size} GPUs, {torch.cuda.device_count()} visible: "
            "accepted world_size <= GPU count, or device = 'cpu' (gloo)"
        )
    with tempfile.TemporaryDirectory(prefix="moebench-ranks-") as out_dir:
        mp.spawn(
            _spawned_rank,
            args=(world_size, device, backend, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=True,
        )
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
