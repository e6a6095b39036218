"""How closely a calibrated stack's measured expert shares follow its skew, layer by layer.

    python -m moebench.tools.skew_check --experts 16 --hidden 64 --top-k 1 --layers 3 --skew zipf --param 1.0

Routes ``--copies`` fresh token copies (not the calibration's tokens) through an EP = 1 stack and
prints, per layer: max/mean share (against the bound 1 + 4·√(E/copies) equal shares give), the
log-log slope of the rank-ordered shares, and the largest relative error against the target.
The figures in scenarios/README.md and the issue-10 notes come from this tool.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from moebench.workload.tokens import layer_targets, layer_weights, tokens
from runtime import MoEConfig, ParallelConfig
from runtime.stack import MoEStack


def shares(moe: MoEConfig, layers: int, skew: str, param: float | None, copies: int, seed: int = 0) -> np.ndarray:
    """Per layer, the share of copies each expert gets on fresh tokens."""
    stack = MoEStack(moe, ParallelConfig(), layer_weights(moe, layers, seed, skew, param), None, "cpu")
    with torch.no_grad():
        _, results = stack(tokens(copies // moe.top_k, moe.hidden_size, seed, stream=777))
    counts = np.array([r.counts_WE.sum(0).numpy() for r in results], dtype=np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--skew", default="uniform")
    parser.add_argument("--param", type=float)
    parser.add_argument("--copies", type=int, default=65_536)
    args = parser.parse_args()
    moe = MoEConfig(args.hidden, args.ffn, args.experts, top_k=args.top_k)
    measured = shares(moe, args.layers, args.skew, args.param, args.copies)
    targets = layer_targets(moe, args.layers, 0, args.skew, args.param)
    bound = 1 + 4 * np.sqrt(args.experts / args.copies)
    shape = f"E = {args.experts}, K = {args.top_k}, D = {args.hidden}"
    print(f"{args.skew} {args.param}, {shape}; uniform bound {bound:.4f}")
    for layer, (got, want) in enumerate(zip(measured, targets, strict=True)):
        ranked = np.sort(got)[::-1]
        slope = np.polyfit(np.log(np.arange(1, len(ranked) + 1)), np.log(np.maximum(ranked, 1e-12)), 1)[0]
        worst = np.max(np.abs(got[want > 0] / want[want > 0] - 1))
        print(f"layer {layer}: max/mean {got.max() * len(got):.4f}  slope {slope:.3f}  max rel error {worst:.4f}")


if __name__ == "__main__":
    main()
