"""The per-step series the deployment plan's alerts are judged on, recorded after a timed window.

Scope: rank side, ``record`` runs a few more steps after the throughput or latency kind's timed window
(only for a scenario with ``[alerts]``: ``RunSpec.alerts``) and records per step its end time, its
duration, the busiest expert's load over its capacity, the slowest single dispatch all-to-all (W > 1),
and the memory in use; parent side, ``alert_results`` turns the ranks' records into the run's series
(``details.series``), the alerts they fired (``measure/alerts.py``) and the ``alerts`` metric. Each
series' definition is in ``docs/results.md`` ("Alerts").

Cost: one forward per step (for ``train = true`` runs, the timed train step) over the ``[workload] steps``
stream once, or ``repeats`` steps of the one batch, at most ``MAX_STEPS``; at W > 1 one raw all-to-all
per layer per step besides. Shape legend: L = layers, W = ranks, E = experts.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moebench import metrics as M
from moebench.measure import alerts
from moebench.measure.common import raw_a2a_fn, stream_routes, stream_step
from moebench.measure.telemetry import host_rss_bytes
from runtime.router import expert_capacity

if TYPE_CHECKING:
    from moebench.spec import RunSpec

MAX_STEPS = 256  # steps a series records at most (a long stream is cut here)
ALERT_METRICS = ("alerts",)  # what a run with [alerts] adds to the throughput and latency metrics
ALERT_COLUMNS = (("alerts", "alerts", 1, ".0f"),)  # only in tables of runs with [alerts]


# -------------------------------------------------------------------------------------------
# Pure functions


def capacity_factor(routing_capacity_factor: float, alerts_capacity_factor: float) -> float:
    """The capacity an expert's load is judged against: the model's own (``[routing] capacity_factor``)
    when it drops at one, else ``[alerts] capacity_factor`` (a dropless model has no capacity of its own)."""
    return routing_capacity_factor if routing_capacity_factor > 0 else alerts_capacity_factor


def load_ratio(counts_LWE, cf: float, top_k: int) -> float:
    """max over layers and experts of routed copies / C, with C = ceil(cf · N · K / E) as the router's
    ``expert_capacity`` (N = the step's tokens over all ranks). Copies are counted before any drop."""
    worst = 0.0
    for counts_WE in counts_LWE:
        routed_E = torch.as_tensor(counts_WE).sum(0)
        tokens = int(routed_E.sum()) // top_k
        capacity = expert_capacity(cf, tokens, top_k, routed_E.numel())
        if capacity:
            worst = max(worst, int(routed_E.max()) / capacity)
    return worst


def exchange_splits(kept_WE, expert_to_rank, rank: int) -> tuple[list[int], list[int]]:
    """(output splits, input splits) of ``rank``'s dispatch all-to-all: copies received from each rank,
    copies sent to each rank, given the copies each rank keeps for each expert and the experts' owners."""
    kept_WE = torch.as_tensor(kept_WE)
    owner_E = torch.as_tensor(list(expert_to_rank))
    world = kept_WE.shape[0]
    sent = [int(kept_WE[rank, owner_E == r].sum()) for r in range(world)]
    received = [int(kept_WE[w, owner_E == rank].sum()) for w in range(world)]
    return received, sent


def host_memory_bytes() -> int | None:
    """The host's physical memory (sysconf); None where unreadable."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def memory_fraction(device: torch.device) -> float | None:
    """This rank's memory in use over the memory there is. GPU: the device's used memory (all processes,
    what NVML's used memory counts: ``cudaMemGetInfo``'s total − free) over its total. CPU: this process's
    resident set size (the telemetry sampler's ``host_rss_bytes``) over the host's physical memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (total - free) / total
    rss, total = host_rss_bytes(), host_memory_bytes()
    return rss / total if rss is not None and total else None


# -------------------------------------------------------------------------------------------
# Rank side


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: a step's time ends when its queued work is done


def _a2a_times(ctx, spec: RunSpec, stack, results, group) -> float:
    """The slowest of this step's per-layer dispatch all-to-alls, each timed alone (raw, same splits)."""
    hidden, dtype = spec.model["hidden"], spec.moe_config().torch_dtype
    worst = 0.0
    for layer, result in zip(stack.layers, results, strict=True):
        splits = exchange_splits(result.kept_WE, layer.expert_to_rank, ctx.rank)
        a2a = raw_a2a_fn([splits], hidden, dtype, ctx.device, group)
        dist.barrier(group=group)  # every rank starts the exchange together: its time is the collective's
        start = time.perf_counter()
        a2a()
        _sync(ctx.device)
        worst = max(worst, time.perf_counter() - start)
    return worst


def record(ctx, spec: RunSpec, stack, stream: list[torch.Tensor], step, group) -> dict:
    """This rank's series (module docstring), over the stream's steps once (or ``repeats`` steps).

    1. A train run times its own step (forward + backward) and reads the one batch's routing once;
       a forward run times ``stream_step``, which returns each step's routing with its output.
    2. Per step: the end time from the series' start and the duration, the load ratio, at W > 1 the
       slowest layer's all-to-all (timed after the step, outside its duration), the memory fraction.
    """
    cf = capacity_factor(float(spec.routing["capacity_factor"]), float(spec.alerts["capacity_factor"]))
    top_k, train = spec.model["top_k"], spec.workload["train"]
    steps = min(len(stream) if len(stream) > 1 else spec.scenario["repeats"], MAX_STEPS)
    routes = None if train else stream_routes(ctx, spec)
    fixed = None
    if train:
        with torch.no_grad():
            fixed = stack(stream[0])[1]
    out = {"t_s": [], "step_s": [], "load_ratio": [], "a2a_s": [] if group is not None else None, "memory": []}
    _sync(ctx.device)
    origin = time.perf_counter()
    for k in range(steps):
        start = time.perf_counter()
        if train:
            step()
            results = fixed
        else:
            results = stream_step(stack, stream, routes, k)[1]
        _sync(ctx.device)
        end = time.perf_counter()
        out["t_s"].append(end - origin)
        out["step_s"].append(end - start)
        out["load_ratio"].append(load_ratio([r.counts_WE for r in results], cf, top_k))
        if group is not None:
            out["a2a_s"].append(_a2a_times(ctx, spec, stack, results, group))
        out["memory"].append(memory_fraction(ctx.device))
    out["memory_scope"] = "device" if ctx.device.type == "cuda" else "host"
    return out


# -------------------------------------------------------------------------------------------
# Parent side


def _memory(per_rank: list[dict]) -> list:
    """Per step: on GPUs the fullest rank's device; on the CPU the ranks' sum (they share one host)."""
    columns = zip(*(r["series"]["memory"] for r in per_rank), strict=True)
    if per_rank[0]["series"]["memory_scope"] == "device":
        return [None if None in c else max(c) for c in columns]
    return [None if None in c else sum(c) for c in columns]


def run_series(spec: RunSpec, per_rank: list[dict]) -> dict:
    """The run's series from every rank's record: times are rank 0's; a step's tokens/s/GPU is
    tokens_per_rank over the slowest rank's step time; the all-to-all time, the slowest rank's."""
    first = per_rank[0]["series"]
    slowest = [max(c) for c in zip(*(r["series"]["step_s"] for r in per_rank), strict=True)]
    tokens = spec.workload["tokens_per_rank"]
    out = {
        "t_s": list(first["t_s"]),
        "expert_load_ratio": list(first["load_ratio"]),  # global counts: the same on every rank
        "tokens_per_s_per_gpu": [tokens / t if t > 0 else None for t in slowest],
        "memory_used": _memory(per_rank),
    }
    if first["a2a_s"] is not None:
        out["a2a_time_s"] = [max(c) for c in zip(*(r["series"]["a2a_s"] for r in per_rank), strict=True)]
    return out


def alert_results(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, dict]:
    """(metrics, details) a throughput or latency run adds for its [alerts]: the ``alerts`` metric (how
    many fired) and ``series`` and ``alerts`` in details (the runner moves ``alerts`` to the run); empty
    for a run without [alerts]."""
    if "series" not in per_rank[0]:
        return {}, {}
    series = run_series(spec, per_rank)
    fired = alerts.evaluate(series, spec.alerts)
    metrics = {"alerts": M.metric([len(fired)], "alerts", "lower", exact=True)}
    return metrics, {"series": series, "alerts": fired}
