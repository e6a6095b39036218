"""A small EP run on whatever this host has: time the layer and check it against fp64.

For each world size: spawn the ranks, time the forward pass of one MoE layer with the seed
deployment plan's layer shape (16 experts, top-1, capacity 1.2, hidden 512, FFN 1024), and run
the equivalence check (output and gradients vs the fp64 reference) on a small batch.
"""

from __future__ import annotations

import torch
from tabulate import tabulate

from moebench.equivalence import TOLERANCE, Case, assemble, compare, run_rank, run_reference
from moebench.launch import is_rank_zero, launch
from moebench.timing import time_fn
from runtime import MoEConfig, MoELayer, ParallelConfig, init_weights

SEED_LAYER = MoEConfig(hidden_size=512, ffn_hidden_size=1024, num_experts=16, top_k=1, capacity_factor=1.2)


def _demo_rank(ctx, moe: MoEConfig, tokens_per_rank: int, warmup: int, repeats: int, check: Case) -> dict:
    group = ctx.group if ctx.world_size > 1 else None
    layer = MoELayer(moe, ParallelConfig(ep_size=ctx.world_size), group=group, device=ctx.device)
    layer.load_global_weights(init_weights(moe, seed=0))
    gen = torch.Generator().manual_seed(1000 + ctx.rank)
    x_TD = torch.randn(tokens_per_rank, moe.hidden_size, generator=gen).to(ctx.device, moe.torch_dtype)
    with torch.no_grad():
        timing = time_fn(lambda: layer(x_TD), warmup=warmup, repeats=repeats, device=ctx.device, group=group)
        dropped = layer(x_TD).tokens_dropped
    return {"timing": timing, "dropped": dropped, "check": run_rank(ctx, check), "backend": ctx.backend}


def run_demo(world_sizes: list[int], tokens_per_rank: int, warmup: int, repeats: int, device: str) -> bool:
    """Print one table row per world size; return True when every equivalence check passed."""
    moe = SEED_LAYER
    check = Case("demo-check", moe, num_tokens=64)
    reference = run_reference(check)
    rows, all_ok = [], True
    for world_size in world_sizes:
        per_rank = launch(_demo_rank, world_size, moe, tokens_per_rank, warmup, repeats, check, device=device)
        timing, first = per_rank[0]["timing"], per_rank[0]
        errors = compare(assemble([r["check"] for r in per_rank]), reference)
        worst = max(errors.values())
        ok = worst <= TOLERANCE[moe.dtype]
        all_ok &= ok
        tokens = tokens_per_rank * world_size
        rows.append(
            [
                world_size,
                first["backend"],
                tokens_per_rank,
                timing.median * 1e3,
                timing.percentile(90) * 1e3,
                tokens / timing.median,
                tokens / timing.median / world_size,
                first["dropped"],
                worst,
                "ok" if ok else "FAIL",
            ]
        )
    headers = [
        "ranks",
        "backend",
        "tokens/rank",
        "fwd p50 (ms)",
        "fwd p90 (ms)",
        "tokens/s",
        "tokens/s/rank",
        "dropped",
        "max rel err vs fp64",
        "check",
    ]
    if not is_rank_zero():
        return all_ok
    print(
        f"MoE layer D={moe.hidden_size} F={moe.ffn_hidden_size} E={moe.num_experts} top_k={moe.top_k} "
        f"capacity={moe.capacity_factor} {moe.dtype}; {repeats} timed forwards after {warmup} warm-up"
    )
    print(tabulate(rows, headers=headers, floatfmt=("", "", "", ".2f", ".2f", ".0f", ".0f", "", ".1e", "")))
    return all_ok
