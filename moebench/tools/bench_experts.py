"""Which grouped-GEMM backend should the experts use here? Time them side by side, against dense references.

``python -m moebench.tools.bench_experts [--device cpu|cuda] [--dtype float32|bfloat16] [--rows N] [--json PATH]``
times forward + backward of ``runtime.experts.expert_ffn`` for every backend usable here on the seed
layer shape (16 local experts, D = 512, F = 1024, swiglu) with uniform and Zipf-skewed row counts,
and prints the median per backend, its ratio to "loop", and its rate in TFLOP/s against two dense
references timed in the same run, the same way (``moebench.measure.timing``: CUDA events on a GPU):

- **dense FFN**: the same rows through one expert (one GEMM per matmul, no grouping): the same
  FLOPs, so the ceiling of any grouping of these shapes;
- **matmul peak**: one square ``--peak-size``³ matmul in the same dtype (default 8192 on CUDA,
  1024 on CPU), the device's dense GEMM rate as this torch reaches it.

FLOPs count the GEMMs only (``ffn_flops``): forward 2·R·D·H + 2·R·F·D (H = 2F for swiglu, F for
gelu), backward twice that (the input and the weight gradients), so fwd+bwd = 3× forward. The
README quotes its output; ``--json PATH`` also writes the rows the table is rendered from.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tabulate import tabulate

from moebench.measure.timing import time_fn
from runtime.experts import BACKENDS, expert_ffn, resolve_backend

D, F = 512, 1024  # the seed layer shape


def ffn_flops(rows: int, d: int, f: int, activation: str = "swiglu", backward: bool = True) -> int:
    """GEMM FLOPs of ``rows`` rows through a bias-free FFN (``runtime.experts``); ×3 with the backward."""
    h = 2 * f if activation == "swiglu" else f
    forward = 2 * rows * d * h + 2 * rows * f * d
    return 3 * forward if backward else forward


def usable_backends(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> list[str]:
    """Every backend, less grouped_mm on a CUDA device where ``auto`` would not pick it (sm < 90, dtype, alignment)."""
    grouped = device.type == "cpu" or resolve_backend("auto", device, dtype, dims) == "grouped_mm"
    return [b for b in BACKENDS if b != "grouped_mm" or grouped]


def _counts(rows: int, experts: int, skew: str, gen: np.random.Generator) -> list[int]:
    weights = np.ones(experts) if skew == "uniform" else 1.0 / np.arange(1, experts + 1) ** 1.2
    return gen.multinomial(rows, weights / weights.sum()).tolist()


def matmul_peak_tflops(n: int, device: torch.device, dtype: torch.dtype, repeats: int) -> float:
    """TFLOP/s of one [n, n] @ [n, n] matmul (2n³ FLOPs), median of ``repeats`` timed calls."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=gen).to(device, dtype) for _ in range(2))
    seconds = time_fn(lambda: a @ b, warmup=3, repeats=repeats, device=device).median
    return 2 * n**3 / seconds / 1e12


def measure(device: torch.device, dtype: torch.dtype, rows: int, experts: int, repeats: int, peak_size: int) -> dict:
    """Per skew and backend: median seconds, ratio to loop, TFLOP/s and its fraction of both dense references.

    1. seeded weights, input and output gradient; 2. the dense FFN (all rows through expert 0);
    3. the matmul peak; 4. per skew, every usable backend; 5. the fractions.
    """
    gen = torch.Generator().manual_seed(0)
    w_in = (torch.randn(experts, D, 2 * F, generator=gen) / D**0.5).to(device, dtype).requires_grad_()
    w_down = (torch.randn(experts, F, D, generator=gen) / F**0.5).to(device, dtype).requires_grad_()
    x = torch.randn(rows, D, generator=gen).to(device, dtype).requires_grad_()
    g = torch.randn(rows, D, generator=gen).to(device, dtype)
    flops = ffn_flops(rows, D, F)

    def timed(w1, w2, counts, backend) -> float:
        def step():
            expert_ffn(x, w1, w2, counts, "swiglu", backend).backward(g)

        return time_fn(step, warmup=3, repeats=repeats, device=device).median

    dense_s = timed(w_in[:1], w_down[:1], [rows], "loop")
    dense_tflops = flops / dense_s / 1e12
    peak = matmul_peak_tflops(peak_size, device, dtype, repeats) if peak_size > 0 else None
    out = []
    for skew in ("uniform", "zipf"):
        counts = _counts(rows, experts, skew, np.random.default_rng(0))
        medians = {b: timed(w_in, w_down, counts, b) for b in usable_backends(device, dtype, (D, 2 * F, F))}
        for backend, seconds in medians.items():
            tflops = flops / seconds / 1e12
            row = {"rows": skew, "backend": backend, "median_ms": seconds * 1e3, "vs_loop": seconds / medians["loop"]}
            row |= {"tflops": tflops, "of_dense_ffn": tflops / dense_tflops}
            row["of_matmul_peak"] = tflops / peak if peak else None
            out.append(row)
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "experts": experts,
        "rows": rows,
        "hidden": D,
        "ffn_hidden": F,
        "flops_per_step": flops,
        "dense_ffn": {"median_ms": dense_s * 1e3, "tflops": dense_tflops},
        "matmul_peak": {"size": peak_size, "tflops": peak} if peak else None,
        "backends": out,
    }


def render(doc: dict) -> str:
    """The table, rendered from ``measure``'s document."""
    peak = doc["matmul_peak"]
    lines = [
        f"expert FFN fwd+bwd, swiglu, {doc['experts']} experts, {doc['rows']} rows, D={doc['hidden']} "
        f"F={doc['ffn_hidden']}, {doc['dtype']}, {doc['device']} ({doc['device_name']}); "
        f"{doc['flops_per_step'] / 1e9:.2f} GFLOP per step",
        f"dense FFN (the same rows through one expert): {doc['dense_ffn']['median_ms']:.3f} ms, "
        f"{doc['dense_ffn']['tflops']:.2f} TFLOP/s",
        f"matmul peak ({peak['size']}^3, {doc['dtype']}): {peak['tflops']:.2f} TFLOP/s"
        if peak
        else "matmul peak: skipped",
    ]
    rows = [
        [
            r["rows"],
            r["backend"],
            r["median_ms"],
            r["vs_loop"],
            r["tflops"],
            r["of_dense_ffn"] * 100,
            "-" if r["of_matmul_peak"] is None else f"{r['of_matmul_peak'] * 100:.1f}",
        ]
        for r in doc["backends"]
    ]
    headers = ["rows", "backend", "median (ms)", "vs loop", "TFLOP/s", "% of dense FFN", "% of matmul peak"]
    lines.append(tabulate(rows, headers=headers, floatfmt=("", "", ".3f", ".2f", ".2f", ".1f", "")))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--peak-size", type=int, help="side of the square matmul peak (0: skip; default 8192 on CUDA)")
    parser.add_argument("--json", help="also write the rows the table is rendered from to this file")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    peak_size = args.peak_size if args.peak_size is not None else (8192 if device.type == "cuda" else 1024)
    doc = measure(device, dtype, args.rows, args.experts, args.repeats, peak_size)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    print(render(doc))


if __name__ == "__main__":
    main()
