"""How much does the telemetry sampler slow the work it watches? Interleaved on/off blocks.

``python -m moebench.tools.bench_telemetry [--interval 0.1] [--blocks 10] [--steps 20]`` times a CPU-bound
step (a loop of 512×512 @ 512×1024 fp32 matmuls, ~15 ms) per step, in blocks alternately with a
``Sampler`` running and without it (ABBA order, so drift cancels), at ``--interval`` and at 0.001 s
(to amplify the cost), and prints the median step time with and without and the overhead. The
docs quote its output; ``--json PATH`` also writes the rows the table is rendered from.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from tabulate import tabulate

from moebench.measure.telemetry import Sampler
from moebench.measure.timing import time_fn

AMPLIFIED_INTERVAL_S = 0.001


def make_step(device: torch.device, target_s: float = 0.015):
    """A step of ``reps`` matmuls [512, 512] @ [512, 1024], with ``reps`` chosen so one step takes ~target_s."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(512, 512, generator=gen).to(device), torch.randn(512, 1024, generator=gen).to(device)
    one = time_fn(lambda: a @ b, warmup=3, repeats=10, device=device).median
    reps = max(1, round(target_s / one))

    def step() -> None:
        for _ in range(reps):
            a @ b

    return step, reps


def measure(step, device: torch.device, interval_s: float, blocks: int, steps: int) -> dict:
    """Per-step seconds with the sampler on and off, in ``blocks`` ABBA-ordered pairs of ``steps`` steps.

    1. each block pair runs on-then-off or off-then-on, alternating; 2. each block warms up one step;
    3. the overhead is the ratio of the pooled medians; the paired-block ratios show the noise.
    """
    on, off, pair_ratios, samples_per_s = [], [], [], []
    for block in range(blocks):
        medians = {}
        for sampling in (True, False) if block % 2 == 0 else (False, True):
            if sampling:
                t0 = time.perf_counter()
                with Sampler(device, interval_s=interval_s) as sampler:
                    timing = time_fn(step, warmup=1, repeats=steps, device=device)
                samples_per_s.append(sampler.summary()["samples"] / (time.perf_counter() - t0))
            else:
                timing = time_fn(step, warmup=1, repeats=steps, device=device)
            (on if sampling else off).extend(timing.samples_s)
            medians[sampling] = timing.median
        pair_ratios.append(medians[True] / medians[False])
    median_on, median_off = float(np.median(on)), float(np.median(off))
    return {
        "interval_s": interval_s,
        "median_off_ms": median_off * 1e3,
        "median_on_ms": median_on * 1e3,
        "overhead_pct": (median_on / median_off - 1) * 1e2,
        "pair_p25_pct": float(np.percentile(pair_ratios, 25) - 1) * 1e2,
        "pair_p75_pct": float(np.percentile(pair_ratios, 75) - 1) * 1e2,
        "samples_per_s": float(np.mean(samples_per_s)),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1, help="sampler interval in seconds")
    parser.add_argument("--blocks", type=int, default=10, help="on/off block pairs per interval")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per block")
    parser.add_argument("--device", default="cpu", help="device the step runs on and the sampler watches")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the result rows to this JSON file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    step, reps = make_step(device)
    intervals = [args.interval] if args.interval == AMPLIFIED_INTERVAL_S else [args.interval, AMPLIFIED_INTERVAL_S]
    rows = [measure(step, device, i, args.blocks, args.steps) for i in intervals]
    load = (load_before, os.getloadavg()[0])  # other processes on the host make the step noisier
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": str(device), "reps": reps, "threads": torch.get_num_threads(), "load": load, "rows": rows},
                f,
                indent=2,
            )
    print(
        f"telemetry sampler overhead: step = {reps} × [512,512]@[512,1024] fp32 on {device}, "
        f"{torch.get_num_threads()} torch threads, {args.blocks} ABBA block pairs × {args.steps} steps, "
        f"1-min load average {load[0]:.2f} → {load[1]:.2f} on {os.cpu_count()} CPUs"
    )
    headers = [
        "interval (s)",
        "off (ms)",
        "on (ms)",
        "overhead (%)",
        "pairs p25 (%)",
        "pairs p75 (%)",
        "samples/s (incl. edges)",
    ]
    table = [[r[k] for k in r] for r in rows]
    print(tabulate(table, headers=headers, floatfmt=("g", ".2f", ".2f", "+.2f", "+.2f", "+.2f", ".0f")))


if __name__ == "__main__":
    main()
