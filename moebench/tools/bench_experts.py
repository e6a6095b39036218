"""Which grouped-GEMM backend should the experts use here? Time them side by side.

``python -m moebench.tools.bench_experts [--device cpu|cuda] [--rows N]`` times forward + backward of
``runtime.experts.expert_ffn`` for every backend on the seed layer shape (16 local experts,
D = 512, F = 1024) with uniform and skewed row counts, and prints the median per backend and its
ratio to "loop" measured in the same run. The README quotes its output.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tabulate import tabulate

from moebench.timing import time_fn
from runtime.experts import BACKENDS, _grouped_mm_supported, expert_ffn


def _counts(rows: int, experts: int, skew: str, gen: np.random.Generator) -> list[int]:
    weights = np.ones(experts) if skew == "uniform" else 1.0 / np.arange(1, experts + 1) ** 1.2
    return gen.multinomial(rows, weights / weights.sum()).tolist()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    d, f = 512, 1024
    gen = torch.Generator().manual_seed(0)
    w_in = (torch.randn(args.experts, d, 2 * f, generator=gen) / d**0.5).to(device, dtype).requires_grad_()
    w_down = (torch.randn(args.experts, f, d, generator=gen) / f**0.5).to(device, dtype).requires_grad_()
    x = torch.randn(args.rows, d, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(args.rows, d, generator=gen).to(device, dtype)
    backends = [
        b for b in BACKENDS if b != "grouped_mm" or device.type == "cpu" or _grouped_mm_supported(device, dtype)
    ]
    rows = []
    for skew in ("uniform", "zipf"):
        counts = _counts(args.rows, args.experts, skew, np.random.default_rng(0))
        medians = {}
        for backend in backends:

            def step(backend=backend, counts=counts):
                y = expert_ffn(x, w_in, w_down, counts, "swiglu", backend)
                y.backward(g)

            medians[backend] = time_fn(step, warmup=3, repeats=args.repeats, device=device).median
        for backend, med in medians.items():
            rows.append([skew, backend, med * 1e3, med / medians["loop"]])
    print(f"expert FFN fwd+bwd, swiglu, {args.experts} experts, {args.rows} rows, D={d} F={f}, {args.dtype}, {device}")
    print(tabulate(rows, headers=["rows", "backend", "median (ms)", "vs loop"], floatfmt=("", "", ".2f", ".2f")))


if __name__ == "__main__":
    main()
