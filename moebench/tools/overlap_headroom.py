"""How much idle CPU is there for overlap to fill? Per-rank busy cores during the step.

``python -m moebench.tools.overlap_headroom [--ranks 2] [--chunks 4] [--steps 15]`` runs the
overlap scenario's layer (D 1024, F 64, 8 experts, top-2 swiglu, 2,048 tokens per rank, one
compute thread per gloo rank) and, for the serial step (C = 1), the pipelined one (C = --chunks)
and both with every all-to-all replaced by a local copy, reports per rank the step's wall time
and the process's CPU time over it (user + system, every thread: the compute thread and gloo's)
as busy cores. Overlap hides communication only in time a rank would otherwise sit idle: a serial
step that already keeps ranks × busy ≈ the host's cores leaves nothing to fill, whatever C is.

``--trace DIR/rank0.json`` instead reads a trace of ``moebench run --trace`` and sums, over its
profiled steps: the steps, the ``gloo:all_to_all`` ranges (on gloo's threads), how much of them
ran under an ``experts[i]`` range of the main thread, the ``*.wait`` ranges (exposed waiting) and
the ``experts[i]`` ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tabulate import tabulate

from moebench.launch.spawn import launch


def _rank(ctx, chunks: int, steps: int, tokens: int) -> dict:
    from runtime import MoEConfig, MoELayer, ParallelConfig, init_weights

    torch.set_num_threads(1)
    moe = MoEConfig(1024, 64, 8, 2, activation="swiglu", capacity_factor=1.25)
    layer = MoELayer(moe, ParallelConfig(ep_size=ctx.world_size), ctx.group, ctx.device, dispatcher="all_to_all")
    layer.load_global_weights(init_weights(moe, seed=1))
    x_TD = torch.randn(tokens, moe.hidden_size, generator=torch.Generator().manual_seed(ctx.rank))
    out: dict = {}
    with torch.no_grad():
        for _ in range(2):  # two alternating passes over the four modes
            for transport in ("collective", "local_copy"):
                for c in (1, chunks):
                    layer.set_schedule(overlap_chunks=c, transport=transport)
                    for _ in range(3):
                        layer(x_TD)
                    dist.barrier(group=ctx.group)
                    wall0, cpu0 = time.perf_counter(), os.times()
                    for _ in range(steps):
                        layer(x_TD)
                    dist.barrier(group=ctx.group)
                    wall, cpu1 = time.perf_counter() - wall0, os.times()
                    busy = (cpu1.user - cpu0.user + cpu1.system - cpu0.system) / wall
                    out.setdefault((transport, c), []).append((wall / steps, busy))
    return out


def trace_summary(path: str) -> dict[str, float]:
    """Milliseconds summed over a trace's profiled steps (see the module docstring)."""
    events = [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X"]

    def named(test) -> list[dict]:
        return [e for e in events if test(e["name"])]

    a2a, experts = named(lambda n: n.startswith("gloo:all_to_all")), named(lambda n: n.startswith("experts["))

    def overlap(a: dict, b: dict) -> float:
        return max(0.0, min(a["ts"] + a["dur"], b["ts"] + b["dur"]) - max(a["ts"], b["ts"]))

    ms = {
        "steps": sum(e["dur"] for e in named(lambda n: n.startswith("step["))),
        "all-to-all": sum(e["dur"] for e in a2a),
        "all-to-all under experts": sum(overlap(a, x) for a in a2a for x in experts),
        "waits": sum(e["dur"] for e in named(lambda n: n.endswith(".wait"))),
        "experts": sum(e["dur"] for e in experts),
    }
    return {k: v / 1e3 for k, v in ms.items()}  # trace times are in µs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", metavar="FILE", help="summarise these traces instead of timing")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--chunks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    args = parser.parse_args(argv)
    if args.trace:
        rows = [[path, *trace_summary(path).values()] for path in args.trace]
        print(tabulate(rows, headers=["trace", *(f"{k} (ms)" for k in trace_summary(args.trace[0]))], floatfmt=".1f"))
        return 0
    per_rank = launch(_rank, args.ranks, args.chunks, args.steps, args.tokens, device="cpu", backend="gloo")
    rows = []
    for key in per_rank[0]:
        transport, c = key
        steps = [t for r in per_rank for t, _ in r[key]]
        busy = [b for r in per_rank for _, b in r[key]]
        label = "all-to-all" if transport == "collective" else "local copy"
        rows.append([f"C = {c}", label, sorted(steps)[len(steps) // 2] * 1e3, sum(busy) / len(busy)])
    print(f"{args.ranks} gloo ranks, 1 compute thread each, on {os.cpu_count()} cores; {args.steps} steps x 2 passes")
    print(tabulate(rows, headers=["chunks", "exchange", "step median (ms)", "busy cores per rank"], floatfmt=".2f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
