"""Eviction policies of the expert cache (runtime/offload.py): which resident expert to drop.

A forward of a layer needs a set of experts (those with rows). The cache serves a step's set hits
first, then the misses (``order``: by id, Belady's furthest-needed first): an expert the step
still needs is then never resident when a miss evicts, so no policy evicts what it is about to use. A policy
sees each step begin (``begin_step(needed)``) and end, every access (``access(e)``), every
admission (``admit(e)``: e was copied in, on a miss or by a prefetch) and, when the cache is full
and must load an expert, chooses the ``victim`` among the resident ones:

  lru     the expert used longest ago (an admission counts as a use);
  lfu     the expert accessed least often since the cache was built, ties to the least recently
          used (admissions by prefetch are not accesses);
  belady  the expert whose next use lies furthest in the future, never-again first: Belady's MIN
          rule, the offline optimum when each step needs one expert (the classic paging model).
          For steps of several experts it also takes a step's misses furthest-needed first (so
          the one needed soonest is loaded last and stays), and among experts next used in the
          same step evicts the one used again soonest after it (the other stays, hits there, and
          is then free to go), then the lower id. That is a heuristic: an exhaustive search finds
          sequences where it is one hit short of the optimum, and rare ones where LRU beats it
          (``tests/test_cache_policy.py`` pins one). It needs the steps in advance:
          ``Belady(steps)`` replays a recorded sequence of needed sets, repeated periodically, and
          refuses a step that departs from it.

``simulate`` runs a policy over a sequence of steps with no prefetch and counts hits: the pure
function the invariants (on one-expert steps Belady's hits are the exhaustive optimum, so ≥ LRU's
and LFU's) are tested on.
"""

from __future__ import annotations

import bisect
import itertools
from collections import OrderedDict

POLICIES = ("lru", "lfu", "belady")


class _Stepless:
    """Policies that need no step boundaries: a step is served hits first, then misses by id."""

    def begin_step(self, needed: list[int]) -> None:
        pass

    def order(self, needed: list[int], resident) -> list[int]:
        return step_order(needed, resident)

    def end_step(self) -> None:
        pass


class LRU(_Stepless):
    def __init__(self):
        self._last_use: OrderedDict[int, None] = OrderedDict()  # least recent first

    def access(self, e: int) -> None:
        self._last_use[e] = None
        self._last_use.move_to_end(e)

    def admit(self, e: int) -> None:
        self.access(e)

    def victim(self, resident: set[int]) -> int:
        return next(e for e in self._last_use if e in resident)


class LFU(_Stepless):
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
    """MIN over a known sequence of steps, repeated: step i needs ``steps[i mod len(steps)]``."""

    def __init__(self, steps: list[list[int]]):
        if not steps:
            raise ValueError("cache policy 'belady' needs steps: accepted the recorded needed experts of each step")
        self.steps = [sorted(set(step)) for step in steps]
        self.step, self.inside, self.pending = 0, False, set()  # step: the current one, or the next
        self._uses: dict[int, list[int]] = {}  # expert -> the steps of one period that need it
        for i, step in enumerate(self.steps):
            for e in step:
                self._uses.setdefault(e, []).append(i)

    def begin_step(self, needed: list[int]) -> None:
        want = self.steps[self.step % len(self.steps)]
        if sorted(set(needed)) != want:
            raise RuntimeError(
                f"Belady replay diverged at step {self.step}: experts {sorted(set(needed))} needed, the recorded "
                f"sequence has {want} (the run must repeat the recorded steps in order)"
            )
        self.inside, self.pending = True, set(want)

    def access(self, e: int) -> None:
        self.pending.discard(e)

    def admit(self, e: int) -> None:
        pass

    def end_step(self) -> None:
        self.step, self.inside, self.pending = self.step + 1, False, set()

    def order(self, needed: list[int], resident) -> list[int]:
        """Hits first, then the misses needed furthest ahead first: the miss needed soonest is
        loaded last, so the experts left resident after the step are those needed soonest."""
        hits = [e for e in sorted(set(needed)) if e in resident]
        misses = [e for e in sorted(set(needed)) if e not in resident]
        return hits + sorted(misses, key=lambda e: -self._use_from(e, self.step + 1))

    def next_use(self, e: int) -> float:
        """The step that next needs ``e``: the current one while it still does; inf if never."""
        if e in self.pending:
            return self.step
        return self._use_from(e, self.step + 1 if self.inside else self.step)

    def _use_from(self, e: int, first: int) -> float:
        """The first step from ``first`` on that needs ``e``; inf if never."""
        uses = self._uses.get(e)
        if not uses:
            return float("inf")
        period = len(self.steps)
        base, offset = divmod(first, period)
        i = bisect.bisect_left(uses, offset)
        return base * period + (uses[i] if i < len(uses) else period + uses[0])

    def victim(self, resident: set[int]) -> int:
        """Furthest next use; among experts next used in the same step, the one used again
        soonest after it (the other, kept, hits there and is then free to go), then the lower id."""

        def key(e: int) -> tuple[float, float]:
            first = self.next_use(e)
            return first, -self._use_from(e, first + 1) if first != float("inf") else 0.0

        return max(sorted(resident), key=key)


def make(policy: str, steps: list[list[int]] | None = None):
    """A fresh policy by name (``steps``: the recorded needed sets Belady replays)."""
    if policy == "lru":
        return LRU()
    if policy == "lfu":
        return LFU()
    if policy == "belady":
        return Belady(steps or [])
    raise ValueError(f"cache policy = {policy!r} is invalid: accepted one of {', '.join(map(repr, POLICIES))}")


def step_order(needed, resident) -> list[int]:
    """The order a step's accesses are served in: its resident experts, then the others, by id."""
    needed = sorted(set(needed))
    return [e for e in needed if e in resident] + [e for e in needed if e not in resident]


def simulate(policy: str, steps: list[list[int]], slots: int) -> int:
    """Hits of a ``slots``-entry cache serving ``steps`` once (no prefetch), starting empty."""
    p, resident, hits = make(policy, steps), set(), 0
    for needed in steps:
        p.begin_step(needed)
        for e in p.order(needed, resident):
            p.access(e)
            if e in resident:
                hits += 1
                continue
            if len(resident) == slots:
                resident.remove(p.victim(resident))
            resident.add(e)
            p.admit(e)
        p.end_step()
    return hits
