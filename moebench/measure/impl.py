"""``[model] impl`` on the ranks: the rules a run with another implementation keeps, its weights, and its
timing against the runtime's layer (throughput, latency) and routing counts (load_balance).

An implementation (moebench/adapters/, docs/adapters.md) runs one layer at world size 1 on
``init_weights``' tensors without the skew calibration's router offset (no Hugging Face router has a bias);
the runtime's layer it is timed against gets the same weights and tokens.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from moebench import adapters
from moebench import metrics as M
from moebench.measure.common import finite_check, progress_after_warmup, ratios, sampler
from moebench.measure.timing import time_interleaved
from moebench.spec import check_decoder
from moebench.workload.tokens import layer_weights, tokens
from runtime import MoEWeights
from runtime.stack import MoEStack

if TYPE_CHECKING:
    from moebench.spec import RunSpec

IMPL_COLUMNS = (("impl_over_runtime", "impl/runtime", 1, ".2f"),)  # only in tables of runs that set impl
IMPL_METRICS = ("impl_over_runtime",)


def impl_of(spec: RunSpec) -> str:
    """The run's ``[model] impl`` ("runtime" when the spec predates the key)."""
    return spec.model.get("impl", adapters.RUNTIME)


def check_impl(spec: RunSpec) -> None:
    """With ``impl``: one layer (any number for a whole decoder: kind equivalence with the decoder keys), world
    size 1, a uniform skew, a forward-only single step, none of overlap, offload, EPLB or alerts (they belong to
    the runtime's layer), and an implementation that can express the layer (or decoder); ``ValueError`` (one
    line) otherwise."""
    impl = impl_of(spec)
    if impl == adapters.RUNTIME:
        return
    wl = spec.workload
    decoder = spec.model.get("attention_heads") is not None  # a whole decoder (kind equivalence): any layers
    for key, value, accepted in (
        ("[parallel] world_size", spec.world_size, 1),
        ("[model] layers", 1 if decoder else spec.model["layers"], 1),
        ("[workload] skew", wl["skew"], "uniform"),
        ("[workload] train", wl["train"], False),
        ("[workload] steps", wl.get("steps", 1), 1),
        ("[parallel] overlap_chunks", spec.parallel.get("overlap_chunks"), None),
        ("[offload] cache_slots", spec.offload.get("cache_slots"), None),
        ("[eplb] interval", spec.eplb.get("interval", 0), 0),
        ("[alerts]", bool(spec.alerts), False),
    ):
        if value != accepted:
            raise ValueError(
                f"{key} = {value!r} is invalid with [model] impl = {impl!r}: accepted {accepted!r} (an implementation "
                "runs one forward-only layer on one rank, on the seeded weights without a skew's router offset)"
            )
    if decoder:
        check_decoder(spec)
        adapters.check_decoder(impl, spec.decoder_config())
    else:
        adapters.check(impl, spec.moe_config())


def impl_weights(spec: RunSpec) -> list[MoEWeights]:
    """The one layer's seeded weights without the skew calibration's router offset."""
    wl = spec.workload
    plain = layer_weights(spec.moe_config(), 1, wl["seed"], wl["skew"], wl["skew_param"])
    return [dataclasses.replace(w, router_bias_E=None) for w in plain]


def impl_timed(ctx, spec: RunSpec, interval: float | None) -> dict:
    """throughput and latency with ``impl``: the implementation's forward and the runtime's layer on the same
    tokens and weights, timed in alternating rounds (``time_interleaved``: round i of each is comparable)."""
    moe = spec.moe_config()
    weights = impl_weights(spec)
    module = adapters.build(impl_of(spec), weights, moe).to(ctx.device)
    stack = MoEStack(moe, spec.parallel_config(), weights, ctx.group, ctx.device)
    x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], ctx.rank)
    x_TD = x_TD.to(ctx.device, moe.torch_dtype)

    @torch.no_grad()
    def impl_forward():
        return module(x_TD)

    @torch.no_grad()
    def runtime_forward():
        return stack(x_TD)[0]

    hook = progress_after_warmup(ctx, spec, f"{impl_of(spec)} against the runtime's layer")
    with sampler(ctx, interval) as s:
        timing = time_interleaved(
            {"impl": impl_forward, "runtime": runtime_forward},
            warmup=spec.scenario["warmup"],
            repeats=spec.scenario["repeats"],
            device=ctx.device,
            on_warm=hook,
        )
    return {
        "impl": impl_of(spec),
        "step": list(timing["impl"].samples_s),
        "runtime_step": list(timing["runtime"].samples_s),
        "finite": bool(torch.isfinite(impl_forward()).all()),
        "telemetry": s.summary(),
    }


def impl_results(spec: RunSpec, per_rank: list[dict], throughput: bool) -> tuple[dict, list[dict], dict]:
    """The implementation's step time (and tokens/s for throughput) and ``impl_over_runtime``: its step over
    the runtime layer's, round by round."""
    raw, total = per_rank[0], spec.workload["tokens_per_rank"]
    metrics = {
        "step_time_s": M.metric(raw["step"], "s", "lower"),
        "impl_over_runtime": M.metric(ratios(raw["step"], raw["runtime_step"]), "ratio", "lower"),
    }
    if throughput:
        metrics["tokens_per_s"] = M.metric([total / t for t in raw["step"]], "tokens/s", "higher")
        metrics["tokens_per_s_per_gpu"] = metrics["tokens_per_s"]  # world size 1
    return metrics, [finite_check(per_rank)], {"layers": 1, "impl": raw["impl"]}


def impl_routing(ctx, spec: RunSpec, batches: int) -> list[dict]:
    """load_balance with ``impl``: each batch's copies per expert from the implementation's ``route`` hook,
    in ``routing_stats``' layout (one layer, one rank; dropless: kept = routed)."""
    moe = spec.moe_config()
    module = adapters.build(impl_of(spec), impl_weights(spec), moe).to(ctx.device)
    out = []
    for batch in range(batches):
        x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], 1_000 * (batch + 1))
        counts_E = adapters.routing_counts(module, x_TD.to(ctx.device, moe.torch_dtype), moe.num_experts)
        out.append({"counts_WE": [[counts_E]], "kept_WE": [[counts_E]], "expert_to_rank": [0] * moe.num_experts})
    return out
