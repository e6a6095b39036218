"""Metric formulas and the metric record every result carries; pure functions of numbers.

Conventions follow the field's (nccl-tests for all-to-all bandwidth, population CV, LoadGen's
nearest-rank percentiles); each metric's unit and formula, and the public source of each convention,
are in ``docs/results.md`` ("Metrics", "Definitions and their public sources").
"""

from __future__ import annotations

import math

import numpy as np

# Times that are differences of two times and so may be negative (noise): exposed_comm_s = overlapped −
# compute-only (moebench/measure/overlap.py). Every other metric in seconds is >= 0.
SIGNED = frozenset({"exposed_comm_s"})

# -------------------------------------------------------------------------------------------
# The metric record


def nearest_rank(samples, p: float) -> float:
    """The p-th percentile by MLPerf LoadGen's nearest rank: ``sorted[min(floor(n·p/100), n − 1)]``.

    p99 of 100 samples is the largest; p90 of 10 samples is the largest too. State n with it.
    """
    values = np.sort(np.asarray(samples, dtype=np.float64))
    index = min(math.floor(len(values) * p / 100 + 1e-9), len(values) - 1)  # 1e-9: 0.9·10 is 8.999…
    return float(values[index])


def metric(samples, unit: str, better: str, exact: bool = False) -> dict:
    """A metric with its raw samples and their summary. ``better`` is "higher" or "lower".

    ``exact``: the value is a deterministic function of the seeds (token counts, numerical errors,
    load statistics), so a regression comparison judges it against a tolerance; otherwise it is a
    measurement (times, rates) and is judged from its samples with a significance test.
    Percentiles are LoadGen's nearest rank (``nearest_rank``); CV is population std / mean.
    A single sample is its own median, percentiles and min.
    """
    if better not in ("higher", "lower"):
        raise ValueError(f"better = {better!r}: accepted 'higher' or 'lower'")
    values = np.asarray([float(v) for v in samples], dtype=np.float64)
    if values.size == 0:
        raise ValueError("a metric needs at least one sample")
    mean = float(values.mean())
    return {
        "unit": unit,
        "better": better,
        "exact": bool(exact),
        "samples": values.tolist(),
        "n": int(values.size),
        "median": float(np.median(values)),
        "mean": mean,
        "p90": nearest_rank(values, 90),
        "p99": nearest_rank(values, 99),
        "min": float(values.min()),
        "max": float(values.max()),
        "cv": float(values.std() / mean) if mean != 0 else 0.0,
    }


# -------------------------------------------------------------------------------------------
# All-to-all bandwidth (nccl-tests convention, skew-aware)


def a2a_rank_bytes(kept_WE, expert_to_rank, bytes_per_row: int) -> tuple[list[int], list[int]]:
    """Bytes each rank sends and receives in one dispatch all-to-all, its own chunk included.

    ``kept_WE[w][e]`` = token copies rank w sends to expert e (after capacity).
    """
    kept = np.asarray(kept_WE, dtype=np.int64)
    world = kept.shape[0]
    owner_E = np.asarray(expert_to_rank, dtype=np.int64)
    send_W = kept.sum(axis=1)
    recv_W = np.array([kept[:, owner_E == r].sum() for r in range(world)], dtype=np.int64)
    return (send_W * bytes_per_row).tolist(), (recv_W * bytes_per_row).tolist()


def a2a_size_bytes(send_W, recv_W) -> int:
    """S of nccl-tests ``alltoallv``: max over ranks of max(bytes sent, bytes received)."""
    return int(max(max(s, r) for s, r in zip(send_W, recv_W, strict=True)))


def algbw_gbps(size_bytes: float, time_s: float) -> float:
    """algbw = S / t, in GB/s (1e9 bytes)."""
    return size_bytes / time_s / 1e9


def busbw_gbps(algbw: float, world_size: int) -> float:
    """busbw = algbw · (n − 1) / n: comparable with a link's peak whatever n is."""
    return algbw * (world_size - 1) / world_size


# -------------------------------------------------------------------------------------------
# Load balance


def imbalance(loads) -> float:
    """max(L) / mean(L); 1.0 is perfect balance. NaN when every load is zero."""
    values = np.asarray(loads, dtype=np.float64)
    mean = values.mean()
    return float(values.max() / mean) if mean > 0 else math.nan


def load_cv(loads) -> float:
    """Coefficient of variation std(L) / mean(L), population std. NaN when every load is zero."""
    values = np.asarray(loads, dtype=np.float64)
    mean = values.mean()
    return float(values.std() / mean) if mean > 0 else math.nan


def rank_loads(expert_loads, expert_to_rank, world_size: int) -> list[int]:
    """Per-rank load: the sum of the loads of the experts each rank owns."""
    loads = np.zeros(world_size, dtype=np.int64)
    np.add.at(loads, np.asarray(expert_to_rank, dtype=np.int64), np.asarray(expert_loads, dtype=np.int64))
    return loads.tolist()


def balancedness(rank_loads_per_layer) -> float:
    """vLLM's balancedness over layers: Σ_l mean_w(R_lw) / Σ_l max_w(R_lw); 1.0 is perfect. NaN when every
    load is zero."""
    arr = np.asarray(rank_loads_per_layer, dtype=np.float64)
    peak = arr.max(axis=-1).sum()
    return float(arr.mean(axis=-1).sum() / peak) if peak > 0 else math.nan


def across_layers(values) -> dict:
    """Worst (max), median and mean of a per-layer statistic, and the worst layer's index."""
    arr = np.asarray(values, dtype=np.float64)
    return {
        "worst": float(arr.max()),
        "median": float(np.median(arr)),
        "mean": float(arr.mean()),
        "worst_layer": int(arr.argmax()),
    }


def is_finite_number(value: object) -> bool:
    """An int or float (not a bool) that is finite as a float; never raises, even for a 400-digit int."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
