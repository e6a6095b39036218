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
  belady  the offline optimum, the upper bound an online policy is judged against. It needs the
          steps in advance: ``Belady(steps)`` replays a recorded sequence of needed sets, repeated
          periodically, and refuses a step that departs from it. With ``slots`` and ``horizon`` it
          follows an exact plan of the first ``horizon`` steps (``optimal_plan``: the most hits
          any choices give, serving hits first), when that search fits ``PLAN_BUDGET``. Past the
          plan it follows Belady's MIN rule: evict the expert whose next use lies furthest ahead,
          never-again first; take a step's misses furthest-needed first (the one needed soonest
          is loaded last and stays); among experts next used in the same step, evict the one used
          again soonest after it, then the lower id. The rule is optimal when each step needs one
          expert; with several it is a heuristic (``tests/test_cache_policy.py`` pins a sequence
          where LRU beats it).

``simulate`` runs a policy over a sequence of steps with no prefetch and counts hits: the pure
function the invariants (on one-expert steps Belady's hits are the exhaustive optimum, so ≥ LRU's
and LFU's) are tested on.
"""

from __future__ import annotations

import bisect
import functools
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

    def __init__(self, steps: list[list[int]], slots: int | None = None, horizon: int = 0):
        """``slots`` and ``horizon``: plan the first ``horizon`` steps exactly (``optimal_plan``)
        when the search is small enough; later steps, or a larger search, follow the rule."""
        if not steps:
            raise ValueError("cache policy 'belady' needs steps: accepted the recorded needed experts of each step")
        self.steps = [sorted(set(step)) for step in steps]
        self.step, self.inside, self.pending = 0, False, set()  # step: the current one, or the next
        self._uses: dict[int, list[int]] = {}  # expert -> the steps of one period that need it
        for i, step in enumerate(self.steps):
            for e in step:
                self._uses.setdefault(e, []).append(i)
        needs = [self.steps[t % len(self.steps)] for t in range(horizon)]
        self.plan = optimal_plan(needs, slots) if slots and horizon else None  # resident set after each step

    def _target(self) -> frozenset | None:
        """The planned resident set after the current step, while the plan lasts."""
        if self.plan is not None and self.inside and self.step < len(self.plan):
            return self.plan[self.step]
        return None

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
        loaded last, so the experts left resident after the step are those needed soonest. With a
        plan, the misses it keeps go last, whatever their next use."""
        hits = [e for e in sorted(set(needed)) if e in resident]
        misses = sorted(
            (e for e in sorted(set(needed)) if e not in resident), key=lambda e: -self._use_from(e, self.step + 1)
        )
        target = self._target()
        if target is not None:
            misses = [e for e in misses if e not in target] + [e for e in misses if e in target]
        return hits + misses

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
        """With a plan: one the plan does not keep. Else the rule: furthest next use; among experts
        next used in the same step, the one used again soonest after it (the other, kept, hits
        there and is then free to go), then the lower id."""
        target = self._target()
        if target is not None and resident - target:
            resident = resident - target  # the order above guarantees one (see ``optimal_plan``)

        def key(e: int) -> tuple[float, float]:
            first = self.next_use(e)
            return first, -self._use_from(e, first + 1) if first != float("inf") else 0.0

        return max(sorted(resident), key=key)


PLAN_BUDGET = 3_000_000  # successor states an exact plan may visit; beyond it, the rule alone


def optimal_plan(needs: list[list[int]], slots: int, budget: int = PLAN_BUDGET) -> list[frozenset] | None:
    """The resident sets, after each step, that give the most hits over ``needs`` from an empty
    cache; None when the search would visit more than ``budget`` successor states.

    Served hits first, a step's cost depends only on the resident set R it starts with (its
    misses are N − R, whatever is evicted), and the set after it can be any R' ⊆ R ∪ N of
    min(slots, |R ∪ N|) experts that keeps at least one miss (loading the misses it drops first,
    each evicting one R' does not keep, and the one it keeps last). So the optimum is a search
    over those sets, step by step (memoised: the states reachable are few for a rank's experts).
    """
    steps = [frozenset(n) for n in needs]
    visited = 0

    def successors(resident: frozenset, need: frozenset) -> list[frozenset]:
        misses = need - resident
        if not misses:
            return [resident]
        pool = sorted(resident | need)
        keep = min(slots, len(pool))
        return [frozenset(c) for c in itertools.combinations(pool, keep) if misses & set(c)]

    @functools.cache
    def best(t: int, resident: frozenset) -> tuple[int, frozenset | None]:
        nonlocal visited
        if t == len(steps):
            return 0, None
        options = successors(resident, steps[t])
        visited += len(options)
        if visited > budget:
            raise _TooLarge
        hits = len(steps[t] & resident)
        value, choice = max(((best(t + 1, r)[0], r) for r in options), key=lambda vr: (vr[0], sorted(vr[1])))
        return hits + value, choice

    try:
        plan, resident = [], frozenset()
        for t in range(len(steps)):
            resident = best(t, resident)[1]
            plan.append(resident)
        return plan
    except (_TooLarge, RecursionError):
        return None


class _TooLarge(Exception):
    """The exact plan's search passed its budget."""


def make(policy: str, steps: list[list[int]] | None = None, slots: int | None = None, horizon: int = 0):
    """A fresh policy by name (``steps``: the recorded needed sets Belady replays; ``slots`` and
    ``horizon``: how far it plans exactly)."""
    if policy == "lru":
        return LRU()
    if policy == "lfu":
        return LFU()
    if policy == "belady":
        return Belady(steps or [], slots, horizon)
    raise ValueError(f"cache policy = {policy!r} is invalid: accepted one of {', '.join(map(repr, POLICIES))}")


def step_order(needed, resident) -> list[int]:
    """The order a step's accesses are served in: its resident experts, then the others, by id."""
    needed = sorted(set(needed))
    return [e for e in needed if e in resident] + [e for e in needed if e not in resident]


def simulate(policy: str, steps: list[list[int]], slots: int, plan: bool = True) -> int:
    """Hits of a ``slots``-entry cache serving ``steps`` once (no prefetch), starting empty
    (``plan``: Belady plans the whole sequence exactly, where the search is small enough)."""
    p, resident, hits = make(policy, steps, slots, len(steps) if plan else 0), set(), 0
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
