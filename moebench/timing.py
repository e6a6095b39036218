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


def time_fn(fn, *, warmup: int, repeats: int, device: torch.device, group=None) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed; return the samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    samples_t = torch.tensor(samples, dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(samples_t, op=dist.ReduceOp.MAX, group=group)
    return Timing(tuple(samples_t.cpu().tolist()))
