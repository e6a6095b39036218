"""The serve kind: a small MoE decoder (runtime/model.py) behind a batching engine (runtime/engine.py),
fed requests on the wall clock; what users feel (TTFT, TPOT, ITL, end-to-end latency, goodput) and
what the engine costs (its overhead over the forward, an idle engine's TTFT over a bare prefill).

Metric definitions follow vLLM's ``bench serve`` and MLPerf LoadGen; they are written, with their
sources, in docs/results.md ("serve"). Every request's record is in ``details.requests``, so every
metric can be recomputed from the result file.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

from moebench import metrics as M
from moebench.measure.common import finite_check, ratios
from moebench.measure.eplb import EPLB_COLUMNS, EPLB_METRICS, eplb_checks, eplb_details, eplb_metrics
from moebench.measure.serving import measure_serve
from moebench.spec import check_decoder
from moebench.workload.requests import draw_requests
from runtime.model import max_context

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "serve"
ORDER = 3  # place in listings and "accepted" lists
FEATURES = frozenset({"decoder", "dp", "eplb"})  # what a scenario may ask of it (kinds/__init__.py)
COLUMNS = (
    ("ttft_s", "TTFT p50 (ms)", 1e3, ".1f"),
    ("ttft_s:p99", "TTFT p99 (ms)", 1e3, ".1f"),
    ("tpot_s", "TPOT p50 (ms)", 1e3, ".2f"),
    ("itl_s:p99", "ITL p99 (ms)", 1e3, ".2f"),
    ("e2el_s", "E2EL p50 (s)", 1, ".3f"),
    ("request_throughput", "req/s", 1, ".2f"),
    ("output_tokens_per_s", "out tok/s", 1, ".0f"),
    ("goodput", "goodput (req/s)", 1, ".2f"),
    ("ttft_over_prefill", "TTFT/prefill", 1, ".3f"),
    ("engine_overhead", "overhead", 1, ".3f"),
    ("rank_idle_fraction", "idle", 1, ".2f"),
    ("continuous_over_static", "cont/static", 1, ".2f"),  # only in tables of runs with baseline_rounds
    *EPLB_COLUMNS,  # only in tables of runs that set [eplb] interval
)
MAX_ARRIVAL_SPAN_S = 3600  # the mean arrival span ((requests − 1) / rate) a run may take: a typo is not a day's run
LATENCIES = ("ttft_s", "tpot_s", "itl_s", "e2el_s", "queue_time_s")
METRICS = (
    *LATENCIES,
    "request_throughput",
    "output_tokens_per_s",
    "output_tokens_per_s_per_gpu",
    "goodput",
    "ttft_over_prefill",
    "idle_ttft_s",
    "prefill_time_s",
    "engine_overhead",
    "kv_cache_bytes_per_token",
    "rank_idle_fraction",
    "continuous_over_static",
    *EPLB_METRICS,
)


def validate(spec: RunSpec) -> None:
    """A decoder needs attention heads; serving is dropless (with a capacity, a token's output would
    depend on what else is batched); every running request decodes one token per step."""
    serve = spec.serve
    check_decoder(spec)
    if serve["request_rate"] != "inf":
        rate, shape = float(serve["request_rate"]), float(serve["burstiness"])
        span = (serve["requests"] - 1) / rate
        if span > MAX_ARRIVAL_SPAN_S or not math.isfinite(1 / (rate * shape)):
            raise ValueError(
                f"[serve] request_rate = {serve['request_rate']!r} is invalid with requests = {serve['requests']} "
                f"and burstiness = {serve['burstiness']!r}: the arrivals would span about {span:.3g} s, accepted "
                f"at most {MAX_ARRIVAL_SPAN_S} s (a faster rate, or fewer requests)"
            )
    if spec.routing["capacity_factor"]:
        raise ValueError(
            f"[routing] capacity_factor = {spec.routing['capacity_factor']!r} is invalid for kind serve: accepted 0 "
            "(dropless: with a capacity a token's output depends on the rest of its batch)"
        )
    if serve["max_batch_tokens"] < serve["max_running"]:
        raise ValueError(
            f"[serve] max_batch_tokens = {serve['max_batch_tokens']} is invalid with max_running = "
            f"{serve['max_running']}: accepted max_batch_tokens >= max_running (each running request decodes "
            "one token per step)"
        )
    wl = spec.workload
    if wl["tokens_per_rank"] is not None:
        raise ValueError(
            f"[workload] tokens_per_rank = {wl['tokens_per_rank']} is invalid for kind serve: accepted none "
            "(the requests' lengths are [serve] input_len and output_len)"
        )
    if wl["train"]:
        raise ValueError("[workload] train = true is invalid for kind serve: accepted false (serving is inference)")
    if wl["skew"] == "trace":
        raise ValueError('[workload] skew = "trace" is invalid for kind serve: accepted a skew of routing')
    if spec.model["recompute"] != "none":
        raise ValueError(
            f'[model] recompute = "{spec.model["recompute"]}" is invalid for kind serve: accepted "none" '
            "(recomputation trades backward time for memory; serving has no backward)"
        )


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    return measure_serve(ctx, spec, interval)


def window_tokens(spec: RunSpec) -> int:
    """The rows the timed window's forwards compute: every prompt token and every output fed back."""
    draws = draw_requests(spec.serve, spec.world_size, spec.workload["seed"])
    return sum(max_context(d.input_len, d.output_len) for d in draws)  # the last output is never fed back


# -------------------------------------------------------------------------------------------
# Parent side


def _ttft_tpot(r: dict) -> tuple[float, float | None]:
    """A request's TTFT = first token − arrival, and TPOT = (E2EL − TTFT) / (output tokens − 1), None
    for a one-token request."""
    ttft = r["first_token_s"] - r["arrival_s"]
    tpot = (r["finish_s"] - r["first_token_s"]) / (r["output_len"] - 1) if r["output_len"] > 1 else None
    return ttft, tpot


def latencies(records: list[dict]) -> dict[str, list[float]]:
    """Per-request latencies from the records (s): TTFT and TPOT (``_ttft_tpot``, TPOT of requests with
    2+ tokens); E2EL = last token − arrival; ITL = the gaps between a request's consecutive tokens,
    pooled over requests; queue = first scheduled − arrival."""
    out = {name: [] for name in LATENCIES}
    for r in records:
        ttft, tpot = _ttft_tpot(r)
        out["ttft_s"].append(ttft)
        out["e2el_s"].append(r["finish_s"] - r["arrival_s"])
        out["queue_time_s"].append(r["scheduled_s"] - r["arrival_s"])
        if tpot is not None:
            out["tpot_s"].append(tpot)
        out["itl_s"].extend(b - a for a, b in itertools.pairwise(r["token_times_s"]))
    return out


def good(r: dict, slo_ttft_s: float | None, slo_tpot_s: float | None) -> bool:
    """The request met every SLO given (TPOT is not judged for a one-token request)."""
    ttft, tpot = _ttft_tpot(r)
    if slo_ttft_s is not None and ttft > slo_ttft_s:
        return False
    return slo_tpot_s is None or tpot is None or tpot <= slo_tpot_s


def _served_check(spec: RunSpec, records: list[dict]) -> dict:
    expected = {d.id: d.output_len for d in draw_requests(spec.serve, spec.world_size, spec.workload["seed"])}
    got = {r["id"]: len(r["token_times_s"]) for r in records}
    return {
        "name": "every_request_served",
        "pass": got == expected,
        "detail": f"{sum(1 for i in expected if got.get(i) == expected[i])} of {len(expected)} requests got all "
        "their output tokens",
    }


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    serve, world = spec.serve, spec.world_size
    records = sorted((r for rank in per_rank for r in rank["requests"]), key=lambda r: r["id"])
    checks = [finite_check(per_rank), _served_check(spec, records)]
    duration = max(rank["window_s"] for rank in per_rank)  # the timed window, first arrival to last token
    if not (math.isfinite(duration) and duration > 0):  # no rate can be formed: the run failed
        checks.append({"name": "timed_window", "pass": False, "detail": f"a timed window of {duration} s"})
        return {}, checks, {"requests": records, "duration_s": duration}
    steps = [s for rank in per_rank for s in rank["steps"]]
    metrics = {}
    for name, samples in latencies(records).items():
        if samples:
            metrics[name] = M.metric(samples, "s", "lower")
    out_tokens = sum(r["output_len"] for r in records)
    metrics["request_throughput"] = M.metric([len(records) / duration], "requests/s", "higher")
    metrics["output_tokens_per_s"] = M.metric([out_tokens / duration], "tokens/s", "higher")
    metrics["output_tokens_per_s_per_gpu"] = M.metric([out_tokens / duration / world], "tokens/s", "higher")
    if serve["slo_ttft_s"] is not None or serve["slo_tpot_s"] is not None:
        met = sum(good(r, serve["slo_ttft_s"], serve["slo_tpot_s"]) for r in records)
        metrics["goodput"] = M.metric([met / duration], "requests/s", "higher")
    raw = per_rank[0]  # the idle rounds' samples are already the max over ranks
    metrics["ttft_over_prefill"] = M.metric(ratios(raw["idle_ttft"], raw["bare_prefill"]), "ratio", "lower")
    metrics["idle_ttft_s"] = M.metric(raw["idle_ttft"], "s", "lower")
    metrics["prefill_time_s"] = M.metric(raw["bare_prefill"], "s", "lower")
    rounds = [max(lengths) for lengths in zip(*(r["batching_rounds"]["static"] for r in per_rank), strict=True)]
    if rounds:  # a round's window ends with its last rank
        fast = [max(lengths) for lengths in zip(*(r["batching_rounds"]["continuous"] for r in per_rank), strict=True)]
        metrics["continuous_over_static"] = M.metric(ratios(rounds, fast), "ratio", "higher")
    worked = [s for s in steps if s["tokens"]]
    if worked:
        overhead = [s["step_s"] / s["forward_s"] - 1 for s in worked]
        metrics["engine_overhead"] = M.metric(overhead, "ratio", "lower")
    metrics["kv_cache_bytes_per_token"] = M.metric([raw["kv_cache_bytes_per_token"]], "B", "lower", exact=True)
    idle, waits = [], []
    for rank in per_rank:
        total = sum(s["iteration_s"] for s in rank["steps"])
        idle.append(sum(s["iteration_s"] for s in rank["steps"] if not s["tokens"]) / total if total else 0.0)
        waits.append(sum(s["iteration_s"] - s["step_s"] for s in rank["steps"]) / total if total else 0.0)
    metrics["rank_idle_fraction"] = M.metric(idle, "fraction", "lower")
    decoding = [s["decode_tokens"] for s in steps if s["decode_tokens"]]
    details = {
        "requests": records,
        "idle_prompt_len": raw["idle_prompt_len"],
        "duration_s": duration,
        "engine": {
            "steps": len(per_rank[0]["steps"]),
            "mean_decode_batch": float(np.mean(decoding)) if decoding else 0.0,
            "mean_batch_tokens": float(np.mean([s["tokens"] for s in worked])) if worked else 0.0,
            "kv_cache_bytes": raw["kv_cache_bytes"],
            "forward_s": sum(s["forward_s"] for s in per_rank[0]["steps"]),
            "step_s": sum(s["step_s"] for s in per_rank[0]["steps"]),
            "iteration_s": sum(s["iteration_s"] for s in per_rank[0]["steps"]),
        },
        "rank_idle_fraction": idle,
        "agree_fraction": waits,  # per rank: the share of its steps' loop spent releasing arrivals and agreeing
        **eplb_details(spec, per_rank),
    }
    metrics |= eplb_metrics(spec, per_rank)
    checks += eplb_checks(per_rank)
    return metrics, checks, details
