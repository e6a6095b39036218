"""CPU offload of experts: every local expert's weights in host memory, a few on the compute device.

``OffloadedExperts`` are a layer's experts when it is built with ``offload`` (``MoELayer``; the
``Experts`` protocol of runtime/experts.py). It keeps all
L local experts' weights in host memory (pinned when the device is CUDA) and an ``ExpertCache`` of
``cache_slots`` experts on the device: two slot tensors, [S, D, H] and [S, F, D], allocated once,
so the device never holds more than S experts' weights whatever the routing (prefetches load into
the same slots). A forward needs expert e (it has rows this step): a hit uses its slot; a miss
copies e in, first evicting the expert the policy names (runtime/cache_policy.py) when the slots
are full. Experts are computed one at a time, the resident ones first (so a miss never evicts an
expert this forward still needs), each with the loop backend's FFN on its runs, so S = 1 works;
the outputs are bitwise those of the all-resident layer with the loop backend (the same bytes, the
same ops; a grouped backend sums in another order). Inference only: a forward that needs
gradients is refused.

Prefetch (``prefetch(experts)``): load experts a later forward is expected to need, evicting by
policy, and score the guess when that forward comes: ``prefetch_accuracy`` = predicted experts that
were used / predicted. What to predict is the stack's business (runtime/stack.py: the next
layer's router on this layer's input, or the recorded truth).

Copies. On CUDA every copy runs on the cache's own copy stream, so a prefetch issued before a
layer computes flows while it computes. Two hand-offs per slot, both CUDA events: before the copy
stream overwrites a slot it waits for the compute stream's last use of it (``_freed``); before
the compute stream reads a slot it waits for the copy that filled it (``_filled``). Host weights
are pinned, so the copies are truly asynchronous. On CPU the same calls are plain host copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from runtime import cache_policy
from runtime.experts import GroupedExperts, _activate

PREFETCH = ("none", "next_layer", "oracle")


@dataclass(frozen=True)
class OffloadConfig:
    """``cache_slots`` experts of a rank's layer resident on the device; ``policy`` evicts;
    ``prefetch`` says what the stack loads ahead (see ``runtime.stack.MoEStack``)."""

    cache_slots: int
    policy: str = "lru"
    prefetch: str = "none"

    def __post_init__(self):
        if isinstance(self.cache_slots, bool) or not isinstance(self.cache_slots, int) or self.cache_slots < 1:
            raise ValueError(f"OffloadConfig.cache_slots = {self.cache_slots!r} is invalid: accepted an integer >= 1")
        if self.policy not in cache_policy.POLICIES:
            accepted = ", ".join(map(repr, cache_policy.POLICIES))
            raise ValueError(f"OffloadConfig.policy = {self.policy!r} is invalid: accepted one of {accepted}")
        if self.prefetch not in PREFETCH:
            accepted = ", ".join(map(repr, PREFETCH))
            raise ValueError(f"OffloadConfig.prefetch = {self.prefetch!r} is invalid: accepted one of {accepted}")


@dataclass
class CacheStats:
    """Counts since the cache was built (or ``reset``)."""

    accesses: int = 0  # (forward, expert) pairs with rows
    hits: int = 0
    misses_E: list[int] = field(default_factory=list)  # per local expert
    copied_experts: int = 0  # copies into a slot, misses and prefetches
    needed_copies: int = 0  # of those, the ones a forward needed: its misses and its prefetched experts it used
    h2d_bytes: int = 0
    copy_s: float = 0.0  # time the copies took (CUDA: on the copy stream; call ``ExpertCache.copy_seconds``)
    predicted: int = 0  # experts a prefetch named
    predicted_used: int = 0  # of those, used by the next forward

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    @property
    def prefetch_accuracy(self) -> float:
        return self.predicted_used / self.predicted if self.predicted else float("nan")


class ExpertCache:
    """``slots`` device slots over the L experts held in host memory (see the module docstring)."""

    def __init__(self, w_in_LDH: torch.Tensor, w_down_LFD: torch.Tensor, slots: int, policy, device):
        num_local = w_in_LDH.shape[0]
        if slots > num_local:
            raise ValueError(
                f"OffloadConfig.cache_slots = {slots} is invalid: accepted 1 to {num_local} (the experts on this rank)"
            )
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.host_in_LDH = w_in_LDH.detach().cpu().contiguous()
        self.host_down_LFD = w_down_LFD.detach().cpu().contiguous()
        if cuda:  # pinned: an asynchronous copy needs page-locked host memory
            self.host_in_LDH, self.host_down_LFD = self.host_in_LDH.pin_memory(), self.host_down_LFD.pin_memory()
        self.slot_in_SDH = torch.empty((slots, *w_in_LDH.shape[1:]), dtype=w_in_LDH.dtype, device=self.device)
        self.slot_down_SFD = torch.empty((slots, *w_down_LFD.shape[1:]), dtype=w_down_LFD.dtype, device=self.device)
        self.policy = policy
        self.slot_of: dict[int, int] = {}  # resident expert -> its slot
        self._free = list(range(slots - 1, -1, -1))
        self.stats = CacheStats(misses_E=[0] * num_local)
        self._predicted: set[int] = set()
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._filled = [torch.cuda.Event() for _ in range(slots)] if cuda else None
        self._freed = [torch.cuda.Event() for _ in range(slots)] if cuda else None
        self._copy_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # CUDA: start, end of each copy
        self._prefetched: set[int] = set()  # experts the last prefetch copied in
        self._missed = 0  # misses of the forward in progress
        if cuda:
            # the copy stream writes the slots, which the compute stream allocated: should the cache be
            # dropped with a copy in flight, the allocator must not reuse their memory before it ends
            self.slot_in_SDH.record_stream(self._copy_stream)
            self.slot_down_SFD.record_stream(self._copy_stream)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (what a miss copies)."""
        return (self.host_in_LDH[0].numel() + self.host_down_LFD[0].numel()) * self.host_in_LDH.element_size()

    def reset_stats(self) -> None:
        self.copy_seconds()  # CUDA: settle the copies in flight, so they count before the reset
        self.stats = CacheStats(misses_E=[0] * len(self.stats.misses_E))

    def copy_seconds(self) -> float:
        """``stats.copy_s`` with every copy issued so far counted (CUDA: waits for them)."""
        self._settle(wait=True)
        return self.stats.copy_s

    def _settle(self, wait: bool) -> None:
        """Add the finished copies' times to ``stats.copy_s`` (``wait``: all of them, waiting)."""
        while self._copy_events:
            start, end = self._copy_events[0]
            if wait:
                end.synchronize()  # sync: a copy's time is known once the copy stream has passed it
            elif not end.query():  # no sync: only copies already done
                return
            self.stats.copy_s += start.elapsed_time(end) / 1e3
            self._copy_events.pop(0)

    @torch.no_grad()
    def load_host(self, w_in_LDH: torch.Tensor, w_down_LFD: torch.Tensor) -> None:
        """Replace the host copy of every expert's weights; refused once an expert is resident (its
        slot would keep the old weights)."""
        if self.slot_of:
            raise RuntimeError("offloaded experts take their weights before the first forward: an expert is resident")
        self.host_in_LDH.copy_(w_in_LDH)
        self.host_down_LFD.copy_(w_down_LFD)

    def weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's (w_in, w_down) on the device, for the forward now computing it: an access."""
        self.policy.access(e)
        self.stats.accesses += 1
        if e in self.slot_of:
            self.stats.hits += 1
        else:
            self.stats.misses_E[e] += 1
            self._missed += 1
            self._load(e)
        s = self.slot_of[e]
        if self._filled is not None:
            # hand-off: the compute stream reads slot s only after the copy stream has filled it
            torch.cuda.current_stream(self.device).wait_event(self._filled[s])
        return self.slot_in_SDH[s], self.slot_down_SFD[s]

    def done_with(self, e: int) -> None:
        """The forward has issued its last use of e's slot (CUDA: record when the compute stream is past it)."""
        if self._freed is not None:
            self._freed[self.slot_of[e]].record(torch.cuda.current_stream(self.device))

    def prefetch(self, experts: list[int]) -> None:
        """Load ``experts`` (most wanted first) ahead of the next forward, evicting only experts not
        named, and stop when every slot holds a named one: a prefetch never evicts its own guess."""
        experts = list(dict.fromkeys(experts))
        self._predicted, self._prefetched = set(experts), set()
        for e in experts:
            if e in self.slot_of:
                continue
            if not self._free and not set(self.slot_of) - self._predicted:
                break
            self._load(e, keep=self._predicted)
            self._prefetched.add(e)

    def begin_forward(self, needed: list[int]) -> list[int]:
        """A forward needs these experts: the order to access them in (the policy's ``order``: the
        resident ones first, so a miss never evicts an expert this forward still needs)."""
        self.policy.begin_step(needed)
        return self.policy.order(needed, self.slot_of)

    def end_forward(self, used: set[int]) -> None:
        """Score the last prefetch against the experts this forward used; count its needed copies."""
        self.policy.end_step()
        self.stats.needed_copies += self._missed + len(self._prefetched & used)
        self._missed, self._prefetched = 0, set()
        if self._predicted:
            self.stats.predicted += len(self._predicted)
            self.stats.predicted_used += len(self._predicted & used)
            self._predicted = set()

    def _load(self, e: int, keep: set[int] = frozenset()) -> None:
        # a free slot, else evict: never an expert this prefetch names (the caller left one evictable)
        s = self._free.pop() if self._free else self.slot_of.pop(self.policy.victim(set(self.slot_of) - keep))
        self.slot_of[e] = s
        self.policy.admit(e)
        self.stats.copied_experts += 1
        self.stats.h2d_bytes += self.expert_bytes
        if self._copy_stream is None:
            start = time.perf_counter()
            self.slot_in_SDH[s].copy_(self.host_in_LDH[e])
            self.slot_down_SFD[s].copy_(self.host_down_LFD[e])
            self.stats.copy_s += time.perf_counter() - start
            return
        # hand-off: the copy stream overwrites slot s only after the compute stream's last read of it
        self._copy_stream.wait_event(self._freed[s])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self._copy_stream):
            start.record(self._copy_stream)
            self.slot_in_SDH[s].copy_(self.host_in_LDH[e], non_blocking=True)
            self.slot_down_SFD[s].copy_(self.host_down_LFD[e], non_blocking=True)
            end.record(self._copy_stream)
            self._filled[s].record(self._copy_stream)
        self._copy_events.append((start, end))
        self._settle(wait=False)  # keep the list to the copies in flight


class OffloadedExperts(nn.Module):
    """A layer's experts behind an ``ExpertCache`` (the ``Experts`` protocol), forward only."""

    expert_major = False  # takes runs in any order, as the loop backend does

    def __init__(
        self,
        experts: GroupedExperts,
        config: OffloadConfig,
        steps: list[list[int]] | None = None,
        horizon: int = 0,
        device=None,
    ):
        """``experts``: the resident experts whose weights (and ``experts_L``) move to host memory;
        ``device``: where the cache's slots live (default: the experts' device). ``steps``: the
        recorded needed experts (local ids) of each forward in turn, for Belady; ``horizon``: how
        many forwards it plans exactly (``cache_policy.optimal_plan``)."""
        super().__init__()
        self.activation, self.config, self.experts_L = experts.activation, config, experts.experts_L
        device = experts.w_in_LDH.device if device is None else device
        policy = cache_policy.make(config.policy, steps, config.cache_slots, horizon)
        self.cache = ExpertCache(experts.w_in_LDH, experts.w_down_LFD, config.cache_slots, policy, device)

    def load_global(self, w_in_EDH: torch.Tensor, w_down_EFD: torch.Tensor) -> None:
        """Rows ``experts_L`` of the global weights into the cache's host memory (before any forward)."""
        self.cache.load_host(w_in_EDH[list(self.experts_L)], w_down_EFD[list(self.experts_L)])

    def forward(self, x_RD: torch.Tensor, runs: list[int], run_experts: list[int] | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() and x_RD.requires_grad:
            raise RuntimeError("offloaded experts are inference-only: run the forward under torch.no_grad()")
        if x_RD.device != self.cache.device:  # the cache's slots and copy stream are fixed at construction
            raise RuntimeError(
                f"offloaded experts cache on {self.cache.device}, input on {x_RD.device}: build the layer with "
                f"MoELayer(..., device={x_RD.device.type!r}) (moving it with .to() leaves the cache where it was)"
            )
        run_experts = run_experts if run_experts is not None else list(range(len(runs)))
        out_RD = x_RD.new_empty(x_RD.shape[0], self.cache.slot_down_SFD.shape[-1])
        by_expert: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for x, out, e, n in zip(torch.split(x_RD, runs), torch.split(out_RD, runs), run_experts, runs, strict=True):
            if n:
                by_expert.setdefault(e, []).append((x, out))
        for e in self.cache.begin_forward(sorted(by_expert)):  # one access per expert per forward
            w_in, w_down = self.cache.weights(e)
            for x, out in by_expert[e]:
                torch.mm(_activate(x @ w_in, self.activation, True), w_down, out=out)
            self.cache.done_with(e)
        self.cache.end_forward(set(by_expert))
        return out_RD
