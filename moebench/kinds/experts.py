"""The experts kind: the grouped expert FFN alone, tokens·top_k rows spread evenly over the experts,
timed in alternating rounds with its floor, the plain per-expert loop of ``F.linear`` calls on the
same rows (``moebench.measure.floors.loop_floor``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moebench import metrics as M
from moebench.measure.common import finite_check, progress_after_warmup, ratios, sampler, timed_window_tokens
from moebench.measure.floors import loop_floor
from moebench.measure.timing import time_interleaved
from moebench.workload.tokens import tokens
from runtime import init_weights
from runtime.experts import expert_ffn, resolve_backend

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "experts"
ORDER = 6  # place in listings and "accepted" lists
FEATURES = frozenset()  # what a scenario may ask of it (kinds/__init__.py)
COLUMNS = (
    ("expert_time_s", "experts p50 (ms)", 1e3, ".3f"),
    ("expert_time_s:p90", "p90 (ms)", 1e3, ".3f"),
    ("expert_tflops", "TFLOP/s", 1, ".4f"),
    ("loop_floor_time_s", "loop floor (ms)", 1e3, ".3f"),
    ("experts_over_loop", "vs loop", 1, ".3f"),
    ("rows_per_expert", "rows/expert", 1, ".0f"),
)
METRICS = ("expert_time_s", "expert_tflops", "loop_floor_time_s", "experts_over_loop", "rows_per_expert")


def window_tokens(spec: RunSpec) -> int:
    """Tokens processed inside the telemetry window: each timed round runs them through the expert
    FFN and through its loop floor, so twice ``timed_window_tokens``."""
    return 2 * timed_window_tokens(spec)


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Time the expert FFN's forward on evenly spread rows, and its loop floor, in alternating rounds."""
    moe = spec.moe_config()
    weights = init_weights(moe, seed=spec.workload["seed"] * 1_000_003)  # layer 0's experts; no router is run
    w_in, w_down = (w.to(ctx.device, moe.torch_dtype) for w in (weights.w_in_EDH, weights.w_down_EFD))
    rows = spec.workload["tokens_per_rank"] * moe.top_k
    counts = [rows // moe.num_experts + (e < rows % moe.num_experts) for e in range(moe.num_experts)]
    x_RD = tokens(rows, moe.hidden_size, spec.workload["seed"], ctx.rank).to(ctx.device, moe.torch_dtype)
    dims = (moe.hidden_size, w_in.shape[2], moe.ffn_hidden_size)  # every row length the GEMMs see
    backend = resolve_backend(moe.expert_backend, ctx.device, moe.torch_dtype, dims)

    def forward():
        with torch.no_grad():
            return expert_ffn(x_RD, w_in, w_down, counts, moe.activation, backend)

    loop = loop_floor(x_RD, w_in, w_down, counts, moe.activation)  # weights transposed here, untimed

    def floor():
        with torch.no_grad():
            return loop()

    fns = {"experts": forward, "loop_floor": floor}
    with sampler(ctx, interval) as s:
        hook = progress_after_warmup(ctx, spec, "the expert FFN against its loop floor")
        warmup, repeats = spec.scenario["warmup"], spec.scenario["repeats"]
        t = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ctx.device, on_warm=hook)
    return {
        "experts": list(t["experts"].samples_s),
        "loop_floor": list(t["loop_floor"].samples_s),
        "finite": bool(torch.isfinite(forward()).all()),
        "telemetry": s.summary(),
    }


def expert_flops(spec: RunSpec) -> float:
    """Forward FLOPs of the experts kind's FFN: 2 · rows · m · D · F (m = 3 for swiglu, else 2)."""
    m = 3 if spec.model["activation"] == "swiglu" else 2
    rows = spec.workload["tokens_per_rank"] * spec.model["top_k"]
    return 2.0 * rows * m * spec.model["hidden"] * spec.model["ffn_hidden"]


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    flops, raw = expert_flops(spec), per_rank[0]
    rows = spec.workload["tokens_per_rank"] * spec.model["top_k"]
    metrics = {
        "expert_time_s": M.metric(raw["experts"], "s", "lower"),
        "expert_tflops": M.metric([flops / t / 1e12 for t in raw["experts"]], "TFLOP/s", "higher"),
        "loop_floor_time_s": M.metric(raw["loop_floor"], "s", "lower"),
        "experts_over_loop": M.metric(ratios(raw["experts"], raw["loop_floor"]), "ratio", "lower"),
        "rows_per_expert": M.metric([rows / spec.model["num_experts"]], "rows", "higher", exact=True),
    }
    return metrics, [finite_check(per_rank)], {"backend": spec.model["expert_backend"]}
