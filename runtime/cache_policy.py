"""Eviction policies of the expert cache (runtime/offload.py): which resident expert to drop.

A policy sees every access of the cache (``access(e)``: expert e is needed now, resident or not),
every admission (``admit(e)``: e was copied in, on a miss or by a prefetch) and, when the cache is
full and must load an expert, chooses the ``victim`` among the resident ones:

  lru     the expert used longest ago (an admission counts as a use);
  lfu     the expert accessed least often since the cache was built, ties to the least recently
          used (admissions by prefetch are not accesses);
  belady  the expert whose next access lies furthest in the future, never-again first (Belady's
          MIN: the fewest misses any policy can have on a known sequence, without prefetch). It
          needs the sequence in advance: ``Belady(sequence)`` replays a recorded one, repeated
          periodically, and refuses an access that departs from it.

``simulate`` runs a policy over a sequence with no prefetch and counts hits: the pure function
the invariants (Belady's hits ≥ LRU's and LFU's on every sequence) are tested on.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict

POLICIES = ("lru", "lfu", "belady")


class LRU:
    def __init__(self):
        self._last_use: OrderedDict[int, None] = OrderedDict()  # least recent first

    def access(self, e: int) -> None:
        self._last_use[e] = None
        self._last_use.move_to_end(e)

    def admit(self, e: int) -> None:
        self.access(e)

    def victim(self, resident: set[int]) -> int:
        return next(e for e in self._last_use if e in resident)


class LFU:
    def __init__(self):
        self._count: dict[int, int] = {}
        self._tick = itertools.count()
        self._last_use: dict[int, int] = {}

    def access(self, e: int) -> None:
        self._count[e] = self._count.get(e, 0) + 1
        self._last_use[e] = next(self._tick)

    def admit(self, e: int) -> None:
        self._last_use[e] = next(self._tick)

    def victim(self, resident: set[int]) -> int:
        return min(resident, key=lambda e: (self._count.get(e, 0), self._last_use.get(e, -1)))


class Belady:
    """MIN over a known access sequence, repeated: access i is ``sequence[i mod len(sequence)]``."""

    def __init__(self, sequence: list[int]):
        if not sequence:
            raise ValueError("Belady needs the recorded access sequence; it is empty")
        self.sequence, self.position = list(sequence), 0
        self._uses: dict[int, list[int]] = {}  # expert -> its positions within one period
        for i, e in enumerate(self.sequence):
            self._uses.setdefault(e, []).append(i)

    def access(self, e: int) -> None:
        want = self.sequence[self.position % len(self.sequence)]
        if e != want:
            raise RuntimeError(
                f"Belady replay diverged at access {self.position}: expert {e} accessed, the recorded sequence "
                f"has {want} (the run must repeat the recorded steps in order)"
            )
        self.position += 1

    def admit(self, e: int) -> None:
        pass

    def next_use(self, e: int) -> float:
        """Position of the next access of ``e`` at or after ``self.position``; inf if never."""
        uses = self._uses.get(e)
        if not uses:
            return float("inf")
        period = len(self.sequence)
        base, offset = divmod(self.position, period)
        i = bisect.bisect_left(uses, offset)
        return base * period + (uses[i] if i < len(uses) else period + uses[0])

    def victim(self, resident: set[int]) -> int:
        # at a miss the access being served has already been counted, so ``position`` is the next one
        return max(sorted(resident), key=self.next_use)


def make(policy: str, sequence: list[int] | None = None):
    """A fresh policy by name (``sequence``: Belady's recorded accesses)."""
    if policy == "lru":
        return LRU()
    if policy == "lfu":
        return LFU()
    if policy == "belady":
        return Belady(sequence or [])
    raise ValueError(f"cache policy = {policy!r} is invalid: accepted one of {', '.join(map(repr, POLICIES))}")


def simulate(policy: str, sequence: list[int], slots: int) -> int:
    """Hits of a ``slots``-entry cache serving ``sequence`` once (no prefetch), starting empty."""
    p, resident, hits = make(policy, sequence), set(), 0
    for e in sequence:
        p.access(e)
        if e in resident:
            hits += 1
            continue
        if len(resident) == slots:
            resident.remove(p.victim(resident))
        resident.add(e)
        p.admit(e)
    return hits
