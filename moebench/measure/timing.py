"""The one timing helper: warm-up, per-iteration samples, max over ranks, robust summary.

On CUDA each iteration is bracketed by CUDA events on the current stream; on CPU by
``time.perf_counter`` after the work returns (CPU ops are synchronous). A collective ends with
its slowest rank, so each iteration's time is the max over the ranks of ``group``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from moebench.metrics import nearest_rank


@dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]  # per-iteration seconds, max over ranks

    @property
    def median(self) -> float:
        return float(np.median(self.samples_s))

    def percentile(self, p: float) -> float:
        """LoadGen's nearest-rank percentile, see ``moebench.metrics.nearest_rank``."""
        return nearest_rank(self.samples_s, p)

    @property
    def cv(self) -> float:
        """Coefficient of variation, population std / mean."""
        return float(np.std(self.samples_s) / np.mean(self.samples_s))


def _time_once(fn, device: torch.device) -> float:
    """Seconds one call of ``fn()`` takes: CUDA events on the current stream, else perf_counter."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()  # sync: the sample is only known once the stream has reached ``end``
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _max_over_ranks(samples: list[list[float]], device: torch.device, group) -> list[list[float]]:
    samples_t = torch.tensor(samples, dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(samples_t, op=dist.ReduceOp.MAX, group=group)
    return samples_t.cpu().tolist()


def time_fn(fn, *, warmup: int, repeats: int, device: torch.device, group=None, on_warm=None) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the samples."""
    timing = time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats, device=device, group=group, on_warm=on_warm)
    return timing["fn"]


def steady_round_s(rounds_s: list[float]) -> float:
    """The typical round of a warm-up: the median, leaving out the first round (one-off costs:
    allocations, lazy initialisation, connections) when there are others."""
    return float(np.median(rounds_s[1:] or rounds_s))


def time_interleaved(
    fns: dict, *, warmup: int, repeats: int, device: torch.device, group=None, on_warm=None
) -> dict[str, Timing]:
    """Time several functions in rounds: each round calls every function once, in order.

    Sample i of every function comes from the same round, so a ratio of two functions' samples
    taken round by round cancels most of the drift a shared machine adds between rounds; that is
    what the within-run ratios (``dispatch_over_a2a``, ``moe_over_dense``) are built from.
    ``on_warm(round_s)``, when given, is called after a warm-up of at least one round with its
    typical round (``steady_round_s``): the timed rounds that follow take ``repeats`` times that.
    """
    warm_s = []
    for _ in range(warmup):
        start = time.perf_counter()
        for fn in fns.values():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # sync: the round's work is done (warm-up only, untimed)
        warm_s.append(time.perf_counter() - start)
    if on_warm is not None and warm_s:
        on_warm(steady_round_s(warm_s))
    rounds = [[_time_once(fn, device) for fn in fns.values()] for _ in range(repeats)]
    rounds = _max_over_ranks(rounds, device, group) if rounds else []
    return {name: Timing(tuple(r[i] for r in rounds)) for i, name in enumerate(fns)}
