"""Start ranks on this host, or join the ranks ``torchrun`` started, with one code path.

``launch(fn, world_size, ...)`` calls ``fn(ctx, *args)`` on every rank with a ``RankContext``
(rank, world size, process group, device) and returns every rank's return value in rank order.

- Under ``torchrun`` (RANK, WORLD_SIZE, MASTER_ADDR in the environment) it joins the process
  group torchrun's rendezvous describes (``init_method="env://"``): single- or multi-node. The
  group is joined once per process and kept for later launches; it is destroyed at exit.
- Otherwise it spawns ``world_size`` processes on this host (``rank_entry.py``: each dies with
  this process, from its first instruction) that meet at a rendezvous store this process holds,
  listening on 127.0.0.1 only; gloo's own sockets stay on loopback too. A rank that raises stops
  the others and makes ``launch`` raise in the caller; so does an interrupt (Ctrl-C), after the
  ranks are gone. Nothing is left on disk.

Backends: "nccl" needs one GPU per rank (NCCL refuses two ranks on one GPU); "gloo" runs on CPU.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import multiprocessing.spawn
import os
import pickle
import selectors
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from moebench.launch import watchdog
from moebench.measure import host
from moebench.text import last_line


@dataclass(frozen=True)
class RankContext:
    rank: int
    world_size: int
    group: object | None  # the process group (None when world_size == 1 and nothing was started)
    device: torch.device
    backend: str
    heartbeat_fd: int = -1  # the watchdog's pipe (``launch(..., watchdog_s=...)``); -1: none
    store_beats: watchdog.StoreBeats | None = None  # under torchrun with a watchdog: beats in its store

    def beat(self, step: int, layer: int = -1) -> None:
        """Tell the watchdog this rank reached ``step`` (and ``layer``); a no-op without one."""
        watchdog.beat(self.heartbeat_fd, step, layer)
        if self.store_beats is not None:
            self.store_beats.beat(step, layer)


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


def _init(rank: int, world_size: int, device: str, backend: str, **rendezvous) -> RankContext:
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # Ranks on one host share its cores (cores // ranks each; [parallel] threads_per_rank, applied by
        # the kind, wins): without this, W ranks × all-core thread pools thrash.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(host.threads_per_rank(local_ranks))
        steady_allocator()
    kwargs = {"device_id": dev} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=world_size, **rendezvous, **kwargs)
    return RankContext(rank, world_size, dist.group.WORLD, dev, backend)


_torchrun_ctx: RankContext | None = None


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
        _torchrun_ctx = _init(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), device, backend, init_method="env://"
        )
        atexit.register(_leave_torchrun)
    elif (_torchrun_ctx.device.type, _torchrun_ctx.backend) != (device, backend):
        raise ValueError(
            f"device/backend = {device}/{backend} but this torchrun job joined "
            f"{_torchrun_ctx.device.type}/{_torchrun_ctx.backend}: one job uses one of them"
        )
    return _torchrun_ctx


_timed_groups: dict[float, object] = {}


def _watched(ctx: RankContext, timeout_s: float) -> RankContext:
    """The torchrun context with a group whose collectives time out after ``timeout_s`` (made once
    per timeout: ``new_group`` is collective, and every rank runs the same runs in the same order)
    and heartbeats in torchrun's store."""
    if timeout_s not in _timed_groups:
        _timed_groups[timeout_s] = dist.new_group(timeout=datetime.timedelta(seconds=timeout_s))
    store = dist.distributed_c10d._get_default_store()
    beats = watchdog.StoreBeats(store, ctx.rank, ctx.world_size)
    return dataclasses.replace(ctx, group=_timed_groups[timeout_s], store_beats=beats)


def _collective_failed(err: Exception) -> bool:
    """Whether ``err`` came from the backend (a peer gone or silent), not from this rank's own code."""
    text = str(err)
    backend_error = isinstance(err, getattr(dist, "DistError", ()))
    return backend_error or any(mark in text for mark in ("gloo", "nccl", "NCCL", "Timed out", "Connection"))


def _fail_fast(ctx: RankContext, err: Exception) -> None:
    """A rank's run failed under torchrun with a watchdog: a peer may be dead or stopped, so any
    further collective could wait on it. Say which rank got least far, and end this process at
    once; torchrun's agent then stops the other ranks (and restarts all of them with
    ``--max-restarts``)."""
    named = ctx.store_beats.culprit() if ctx.store_beats is not None else "no heartbeats"
    print(f"moebench: rank {ctx.rank}: {type(err).__name__}: {last_line(err)}; {named}", file=sys.stderr, flush=True)
    os._exit(1)


def launch(fn, world_size: int, *args, device: str = "auto", backend: str = "auto", watchdog_s=None) -> list:
    """Run ``fn(ctx, *args)`` on ``world_size`` ranks; return the per-rank results in rank order.
    ``watchdog_s``: spawned ranks get a heartbeat (``ctx.beat``) and a rank silent that long, or
    one that dies, stops the run with ``watchdog.RankFailure`` naming it (``moebench/launch/watchdog.py``).
    Under torchrun (``_fail_fast``) the ranks' collectives time out after ``watchdog_s`` and a rank
    whose collective fails names the culprit from the store's heartbeats and ends the job."""
    device, backend = resolve_device(device, backend)
    if under_torchrun():
        env_world = int(os.environ["WORLD_SIZE"])
        if env_world != world_size:
            raise ValueError(f"world_size = {world_size} but torchrun started {env_world} ranks: they must agree")
        ctx = _join_torchrun(device, backend)
        if watchdog_s is not None:
            ctx = _watched(ctx, watchdog_s)
        try:
            outcome = (None, fn(ctx, *args))
        except Exception as err:
            if watchdog_s is not None and _collective_failed(err):
                _fail_fast(ctx, err)
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
    return _spawn(fn, args, world_size, device, backend, watchdog_s)


# -------------------------------------------------------------------------------------------
# Spawned ranks

ENTRY = Path(__file__).with_name("rank_entry.py")
RENDEZVOUS_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default for a process group
STOP_GRACE_S = 5.0  # how long a killed rank may take to be reaped
# Where a spawned rank's gloo pairs listen (GLOO_SOCKET_IFNAME, unless the user set it).
LOOPBACK_INTERFACE = "lo0" if sys.platform == "darwin" else "lo"


class _LoopbackStore:
    """A rendezvous store held by this process, listening on 127.0.0.1 only (the ranks are clients).

    ``TCPStore(host_name=...)`` names where clients connect, but its server listens on every
    interface; a socket bound here first and handed over (``master_listen_fd``, which the store
    then owns and closes) is what it serves on instead. Binding port 0 also leaves no window for
    another process to take the port."""

    def __init__(self):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            self.port = listener.getsockname()[1]
            fd = listener.detach()
        self.store = dist.TCPStore(
            "127.0.0.1", self.port, is_master=True, timeout=RENDEZVOUS_TIMEOUT, wait_for_workers=False,
            master_listen_fd=fd,
        )  # fmt: skip

    def close(self) -> None:
        self.store = None  # its server stops and closes the socket


def _spawned_rank(
    rank: int, world_size: int, device: str, backend: str, port: int, fn, args, timeout_s=None, heartbeat_fd=-1
):
    """A spawned rank's body (called by ``rank_entry`` once the payload is unpickled). ``timeout_s``
    (with a watchdog): the group's collective timeout, so that no rank waits on a dead peer for the
    backend's 30-minute default, even if the watchdog's kill came late."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)  # gloo's pairs listen on loopback too
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    timeout = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    ctx = _init(rank, world_size, device, backend, store=store, **timeout)
    ctx = dataclasses.replace(ctx, heartbeat_fd=heartbeat_fd)
    try:
        return fn(ctx, *args)
    finally:
        dist.destroy_process_group()


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    result_fd: int  # read end of the rank's result pipe
    data: bytearray
    heartbeat_fd: int = -1  # read end of its heartbeat pipe (with a watchdog)


def _preparation(rank: int) -> dict:
    """What a ``multiprocessing`` child is told first (sys.path, working folder, main module), less
    the authentication key, which the ranks do not use."""
    data = multiprocessing.spawn.get_preparation_data(f"rank{rank}")
    data.pop("authkey", None)
    return data


def _start_rank(rank: int, body_args: tuple, heartbeat: bool = False) -> _Rank:
    read_fd, write_fd = os.pipe()
    beat_read, beat_write = os.pipe() if heartbeat else (-1, -1)
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []  # moebench/ itself is no import path
    cmd = [sys.executable, *safe_path, str(ENTRY), str(os.getpid()), str(write_fd)]
    passed = (write_fd, beat_write) if heartbeat else (write_fd,)  # the same numbers in the rank
    try:
        # A session of its own: a terminal's Ctrl-C reaches moebench only, which stops the ranks.
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=passed, start_new_session=True)
    finally:
        for fd in passed:
            os.close(fd)
    payload = pickle.dumps((_spawned_rank, (rank, *body_args, beat_write)))
    try:
        with proc.stdin:
            proc.stdin.write(pickle.dumps((_preparation(rank), payload)))
    except BrokenPipeError:
        pass  # the rank died at once: its exit code tells
    return _Rank(rank, proc, read_fd, bytearray(), beat_read)


def _spawn(fn, args: tuple, world_size: int, device: str, backend: str, watchdog_s=None) -> list:
    """Start the ranks, collect every rank's answer; stop all of them on the first failure or an interrupt."""
    store = _LoopbackStore()
    ranks = []
    monitor = watchdog.Monitor(world_size, watchdog_s) if watchdog_s is not None else None
    try:
        for rank in range(world_size):
            body = (world_size, device, backend, store.port, fn, args, watchdog_s)
            ranks.append(_start_rank(rank, body, heartbeat=monitor is not None))
        results = _collect(ranks, monitor)
        _stop(ranks, grace_s=STOP_GRACE_S)  # every rank answered: let them finish exiting
        return results
    finally:
        _stop(ranks, grace_s=0)  # a failure or an interrupt: kill what is left now
        store.close()


def _collect(ranks: list[_Rank], monitor: watchdog.Monitor | None = None) -> list:
    """Read every rank's answer as it comes (and its heartbeats, with a ``monitor``); raise on the
    first rank that fails, or, with a monitor, on the first that stays silent too long."""
    results = {}
    with selectors.DefaultSelector() as sel:
        for r in ranks:
            sel.register(r.result_fd, selectors.EVENT_READ, ("answer", r))
            if r.heartbeat_fd >= 0:
                sel.register(r.heartbeat_fd, selectors.EVENT_READ, ("beat", r))
        while len(results) < len(ranks):
            live = [r.rank for r in ranks if r.rank not in results]
            timeout = None if monitor is None else monitor.wait_s(live)
            events = sel.select(timeout)
            if not events and monitor is not None:
                stopped = frozenset(r.rank for r in ranks if watchdog.process_stopped(r.proc.pid))
                if (failure := monitor.verdict(live, stopped=stopped)) is not None:
                    raise failure
            for key, _ in events:
                what, r = key.data
                chunk = os.read(key.fd, 1 << 20)
                if what == "beat":
                    if chunk:
                        monitor.feed(r.rank, chunk)
                    else:
                        sel.unregister(key.fd)
                    continue
                if chunk:
                    r.data += chunk
                    continue
                sel.unregister(r.result_fd)
                try:
                    results[r.rank] = _answer(r)
                except RuntimeError as err:
                    if monitor is None:
                        raise
                    raise _culprit(ranks, monitor, r, err) from None
    return [results[r.rank] for r in ranks]


def _culprit(ranks: list[_Rank], monitor: watchdog.Monitor, first: _Rank, err: RuntimeError) -> watchdog.RankFailure:
    """After a first failure, the rank to name: one that exited without an answer (a crash; its
    peers then fail in their collectives), within ``SETTLE_S``; else, of the ranks that raised,
    the one that got least far (its peers raise later, from the collective it left)."""
    deadline = time.monotonic() + watchdog.SETTLE_S
    while time.monotonic() < deadline:
        dead = [r for r in ranks if r.proc.poll() is not None and not _answered(r)]
        if dead:
            r = dead[0]
            code = r.proc.returncode
            how = f": exited with code {code}" if code >= 0 else f": killed by signal {-code}"
            return monitor.failed(r.rank, "crashed", how)
        time.sleep(0.02)
    raised = [r for r in ranks if r is first or (r.proc.poll() is not None and _answered(r))]
    culprit = min(raised, key=lambda r: (monitor.last[r.rank].step, monitor.last[r.rank].layer, r.rank))
    detail = last_line(str(err)) if culprit is first else _error_line(culprit)
    return monitor.failed(culprit.rank, "failed", f": {detail}")


def _error_line(r: _Rank) -> str:
    """The last line of the traceback a rank answered with."""
    try:
        status, value = pickle.loads(r.data)
    except Exception:
        return "no answer"
    return last_line(value) if status == "error" and isinstance(value, str) else "no error"


def _answered(r: _Rank) -> bool:
    """Whether an exited rank's result pipe holds an answer (drained to its end)."""
    if r.result_fd >= 0:
        with contextlib.suppress(OSError):
            while chunk := os.read(r.result_fd, 1 << 20):
                r.data += chunk
    try:
        pickle.loads(r.data)
    except Exception:
        return False
    return True


def _answer(r: _Rank):
    """The value a rank returned, once its pipe is closed; RuntimeError when it failed."""
    try:
        status, value = pickle.loads(r.data)
    except Exception:  # nothing (or half an answer) came: the rank died
        status, value = "error", None
    if status == "ok":
        return value
    if value is None:
        try:
            code = r.proc.wait(timeout=STOP_GRACE_S)
            value = f"exited with code {code}" if code >= 0 else f"killed by signal {-code}"
        except subprocess.TimeoutExpired:
            value = "closed its result pipe"
        raise RuntimeError(f"rank {r.rank}: {value} before it answered")
    raise RuntimeError(f"{value.rstrip()}\nrank {r.rank}: {last_line(value)}")


def _stop(ranks: list[_Rank], grace_s: float) -> None:
    """Give the ranks ``grace_s`` to exit, kill the rest, reap them all; bounded, so an interrupt never hangs."""
    deadline = time.monotonic() + grace_s
    for r in ranks:
        try:
            r.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
    for r in ranks:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r.proc.wait(timeout=STOP_GRACE_S)
        for name in ("result_fd", "heartbeat_fd"):
            if getattr(r, name) >= 0:
                os.close(getattr(r, name))
                setattr(r, name, -1)
