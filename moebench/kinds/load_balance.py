"""The load_balance kind: route ``repeats`` fresh batches through the stack and report, per batch,
the worst layer's expert and rank imbalance, load CV, balancedness (vLLM's, over all layers) and
dropped copies; per-layer details."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from moebench import metrics as M
from moebench.measure.common import build_stack, progress, routing_stats, sampler, timed_window_tokens, use_batch
from moebench.measure.impl import check_impl, impl_of, impl_routing
from moebench.measure.timing import steady_round_s
from moebench.workload.tokens import tokens

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "load_balance"
ORDER = 3  # place in listings and "accepted" lists
FEATURES = frozenset({"impl"})  # what a scenario may ask of it (kinds/__init__.py)
COLUMNS = (
    ("imbalance_max_mean", "imbalance (max/mean)", 1, ".3f"),
    ("rank_imbalance_max_mean", "rank imbalance (max/mean)", 1, ".3f"),
    ("load_cv", "load CV", 1, ".3f"),
    ("balancedness", "balancedness", 1, ".3f"),
    ("tokens_dropped", "dropped (copies)", 1, ".0f"),
    ("tokens_dropped_fraction", "dropped (fraction)", 1, ".4f"),
)
METRICS = (
    "imbalance_max_mean",
    "rank_imbalance_max_mean",
    "load_cv",
    "balancedness",
    "tokens_dropped",
    "tokens_dropped_fraction",
)
# The seed deployment plan's load-balancing gate, "expert load variance < 20%", read as CV < 0.2.
DEFAULT_SLOS = {"max_load_cv": 0.2}
window_tokens = timed_window_tokens


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Route ``repeats`` fresh batches through the stack; keep every batch's counts (with ``[model] impl``:
    the implementation's own routing, through its ``route`` hook)."""
    if impl_of(spec) != "runtime":
        with sampler(ctx, interval) as s:
            batches = impl_routing(ctx, spec, spec.scenario["repeats"])
        return {"batches": batches, "telemetry": s.summary()}
    moe = spec.moe_config()
    stack = build_stack(ctx, spec)
    batches, batch_s = [], []
    with sampler(ctx, interval) as s:
        for batch in range(spec.scenario["repeats"]):
            start = time.perf_counter()
            stream = 1_000 * (batch + 1) + ctx.rank
            x_TD = tokens(spec.workload["tokens_per_rank"], moe.hidden_size, spec.workload["seed"], stream)
            use_batch(ctx, spec, stack, batch)
            batches.append(routing_stats(stack, x_TD.to(ctx.device, moe.torch_dtype), spec.record_routing))
            batch_s.append(time.perf_counter() - start)
            if batch == 1:  # the first batch's one-off costs left out
                left = spec.scenario["repeats"] - 2
                progress(ctx, f"routing {left} more batches", steady_round_s(batch_s) * left)
    return {"batches": batches, "telemetry": s.summary()}


validate = check_impl  # [model] impl: one layer, world size 1 (moebench/measure/impl.py)


def _layer_loads(batch: dict, layer: int, world: int) -> tuple[list[int], list[int], int]:
    counts = torch.tensor(batch["counts_WE"][layer])
    kept = torch.tensor(batch["kept_WE"][layer])
    expert_E = counts.sum(0).tolist()
    return expert_E, M.rank_loads(expert_E, batch["expert_to_rank"], world), int(counts.sum() - kept.sum())


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """Per batch: the worst layer's imbalance and CV; dropped copies; plus per-layer details."""
    raw = per_rank[0]
    world, layers = spec.world_size, spec.model["layers"]
    copies = spec.workload["tokens_per_rank"] * world * spec.model["top_k"] * layers
    samples = {name: [] for name in ("imbalance_max_mean", "rank_imbalance_max_mean", "load_cv", "balancedness",
                                     "tokens_dropped")}  # fmt: skip
    expert_totals = [[0] * spec.model["num_experts"] for _ in range(layers)]
    for batch in raw["batches"]:
        stats = [_layer_loads(batch, layer, world) for layer in range(layers)]
        samples["imbalance_max_mean"].append(max(M.imbalance(e) for e, _, _ in stats))
        samples["rank_imbalance_max_mean"].append(max(M.imbalance(r) for _, r, _ in stats))
        samples["load_cv"].append(max(M.load_cv(e) for e, _, _ in stats))
        samples["balancedness"].append(M.balancedness([r for _, r, _ in stats]))
        samples["tokens_dropped"].append(sum(d for _, _, d in stats))
        for layer, (expert_E, _, _) in enumerate(stats):
            expert_totals[layer] = [a + b for a, b in zip(expert_totals[layer], expert_E, strict=True)]
    out = {name: M.metric(v, "ratio", "higher" if name == "balancedness" else "lower", exact=True)
           for name, v in samples.items() if name != "tokens_dropped"}  # fmt: skip
    out["tokens_dropped"] = M.metric(samples["tokens_dropped"], "copies", "lower", exact=True)
    fractions = [d / copies for d in samples["tokens_dropped"]]
    out["tokens_dropped_fraction"] = M.metric(fractions, "fraction", "lower", exact=True)
    return out, [], _details(raw, expert_totals, world)


def _details(raw: dict, expert_totals: list[list[int]], world: int) -> dict:
    """Per layer over all batches: expert and rank loads, imbalance, CV; and across layers."""
    owner = raw["batches"][0]["expert_to_rank"]
    per_layer = []
    for layer, totals in enumerate(expert_totals):
        ranks = M.rank_loads(totals, owner, world)
        per_layer.append(
            {
                "layer": layer,
                "expert_tokens": totals,
                "rank_tokens": ranks,
                "imbalance_max_mean": M.imbalance(totals),
                "rank_imbalance_max_mean": M.imbalance(ranks),
                "load_cv": M.load_cv(totals),
            }
        )
    return {
        "batches": len(raw["batches"]),
        "expert_to_rank": owner,
        "layers": per_layer,
        "across_layers": {
            "imbalance_max_mean": M.across_layers([p["imbalance_max_mean"] for p in per_layer]),
            "load_cv": M.across_layers([p["load_cv"] for p in per_layer]),
        },
    }
