"""Heartbeats from spawned ranks, and the verdict on a rank that crashes or stops sending them.

A rank that dies is seen at once (its result pipe closes), but a rank that stops (SIGSTOP, a
deadlock, a peer waiting in a collective for it) is not: gloo's default collective timeout is 30
minutes. With a watchdog (``launch(..., watchdog_s=T)``) every rank gets a heartbeat pipe, and
the code it runs calls ``ctx.beat(step, layer)`` as it progresses. The launching process reads the
beats in the loop that collects the ranks' answers and, when a rank has been silent for T seconds,
stops every rank of the run and raises ``RankFailure`` naming the culprit:

- **hung**: a rank the OS shows stopped (SIGSTOP: state "T"), overdue or not (a peer that
  reached the same layer first and waits for it can be overdue a moment earlier), else, among the
  silent ranks, the one that got least far (lowest (step, layer) of its last beat; ties to the one silent longest): a
  rank blocked in a collective waiting for a stopped peer has reached further than that peer;
- **crashed**: a rank whose process exited before answering. When several ranks fail within
  ``SETTLE_S`` of each other (the peers of a dead rank see their connection reset), the one that
  exited without an answer is named, not a peer that raised; with none such, the first rank that
  raised is named as **failed**.

Before a rank's first beat it has ``STARTUP_S`` (imports, rendezvous) rather than T.
"""

from __future__ import annotations

import os
import struct
import time
from dataclasses import dataclass, field

BEAT = struct.Struct("<qq")  # step, layer: 16 bytes, written whole (below PIPE_BUF, so never split)
STARTUP_S = 120.0  # silence allowed before a rank's first beat
SETTLE_S = 0.5  # how long after a first failure the others' are gathered before naming one


class RankFailure(RuntimeError):
    """A rank crashed, failed or hung; ``rank``, ``how`` ("crashed": exited without an answer |
    "failed": raised | "hung": silent too long), the last beat it sent
    (``step``, ``layer``: -1 when none) and ``silent_s`` (since that beat, or since start)."""

    def __init__(self, rank: int, how: str, step: int, layer: int, silent_s: float, detail: str = ""):
        where = "before its first heartbeat" if step < 0 else f"last heartbeat at step {step}, layer {layer}"
        super().__init__(f"rank {rank} {how} ({where}, {silent_s:.1f} s before the verdict){detail}")
        self.rank, self.how, self.step, self.layer, self.silent_s = rank, how, step, layer, silent_s


def beat(fd: int, step: int, layer: int = -1) -> None:
    """Rank side: one heartbeat on the pipe ``fd`` (a no-op for fd < 0: no watchdog)."""
    if fd >= 0:
        os.write(fd, BEAT.pack(step, layer))


@dataclass
class _Last:
    step: int = -1
    layer: int = -1
    at: float = field(default_factory=time.monotonic)


class Monitor:
    """Parent side: every rank's last beat, and which rank is overdue."""

    def __init__(self, ranks: int, timeout_s: float, startup_s: float = STARTUP_S):
        self.timeout_s, self.startup_s = timeout_s, startup_s
        self.last = [_Last() for _ in range(ranks)]
        self._partial = [b""] * ranks

    def feed(self, rank: int, data: bytes) -> None:
        """Beats read from ``rank``'s pipe (any split: whole records are taken)."""
        data = self._partial[rank] + data
        whole = len(data) - len(data) % BEAT.size
        for step, layer in BEAT.iter_unpack(data[:whole]):
            self.last[rank] = _Last(step, layer)
        self._partial[rank] = data[whole:]

    def _allowed(self, rank: int) -> float:
        return self.startup_s if self.last[rank].step < 0 else self.timeout_s

    def wait_s(self, live: list[int], now: float | None = None) -> float:
        """Seconds until the first of the ``live`` ranks would be overdue (>= 0)."""
        now = time.monotonic() if now is None else now
        return max(0.0, min((self.last[r].at + self._allowed(r) - now for r in live), default=self.timeout_s))

    def verdict(
        self, live: list[int], now: float | None = None, stopped: frozenset = frozenset()
    ) -> RankFailure | None:
        """The hung rank, if any of the ``live`` ranks is overdue; None otherwise. ``stopped``:
        ranks whose process the OS shows stopped (``process_stopped``), named before the others,
        overdue or not: a peer that reached the same layer first, then waited for the stopped
        rank in a collective, can be overdue a moment before the stopped rank is."""
        now = time.monotonic() if now is None else now
        silent = [r for r in live if now - self.last[r].at >= self._allowed(r)]
        if not silent:
            return None
        candidates = [r for r in live if r in stopped] or silent
        culprit = min(candidates, key=lambda r: (self.last[r].step, self.last[r].layer, self.last[r].at))
        last = self.last[culprit]
        return RankFailure(culprit, "hung", last.step, last.layer, now - last.at)

    def failed(self, rank: int, how: str, detail: str = "") -> RankFailure:
        """A ``RankFailure`` for ``rank`` with its last beat: ``how`` = "crashed" or "failed"."""
        last = self.last[rank]
        return RankFailure(rank, how, last.step, last.layer, time.monotonic() - last.at, detail)


def process_stopped(pid: int) -> bool:
    """Whether the OS shows process ``pid`` stopped (Linux /proc; False where it cannot tell)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


# -------------------------------------------------------------------------------------------
# Under torchrun: no launching process of ours watches the ranks, so they watch each other.

STORE_KEY = "moebench/beat/{}"


class StoreBeats:
    """Heartbeats written to torchrun's rendezvous store (``{step} {layer} {wall time}`` under
    ``moebench/beat/{rank}``), so that a rank whose collective failed can name the peer that
    stopped: the one that got least far, ties to the one silent longest (as ``Monitor.verdict``)."""

    def __init__(self, store, rank: int, world_size: int):
        self.store, self.rank, self.world_size = store, rank, world_size

    def beat(self, step: int, layer: int) -> None:
        self.store.set(STORE_KEY.format(self.rank), f"{step} {layer} {time.time()}")

    def culprit(self) -> str:
        """One line naming the rank that got least far, from every peer's last beat."""
        beats = {}
        for rank in range(self.world_size):
            key = STORE_KEY.format(rank)
            if rank != self.rank and self.store.check([key]):  # check: get would wait for a missing key
                step, layer, at = self.store.get(key).decode().split()
                beats[rank] = (int(step), int(layer), float(at))
        if not beats:
            return "no peer had sent a heartbeat"
        rank = min(beats, key=lambda r: (beats[r][0], beats[r][1], beats[r][2]))
        step, layer, at = beats[rank]
        return f"rank {rank} got least far (last heartbeat at step {step}, layer {layer}, {time.time() - at:.1f} s ago)"
