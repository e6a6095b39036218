"""Where does the EP = 1 layer's forward spend its time beyond its expert GEMMs? Time the pieces side by side.

    python -m moebench.tools.serial_path [--tokens 4096] [--repeats 15] [--threads 1] [--profile 3]

At the seed layer shape (D 512, F 1024, E 16, top-2 swiglu, EP 1, fp32, CPU) it times, forward and
under ``no_grad``, in alternating rounds (``time_interleaved``, so round i of each is comparable):

  layer     ``MoELayer`` forward: route, dispatch, expert FFN, combine
  gemms     its expert GEMMs alone: on the rows and per-expert counts the layer dispatches, per
            expert ``x_e @ w_in_e`` and an [n, F] input ``@ w_down_e``; no activation, no copies
  experts   the layer's expert FFN alone (``layer.experts``) on those rows
  block     a widely used loop-over-experts MoE block of the same function and weights (Hugging
            Face Mixtral's pattern, ``moebench.measure.floors.mixtral_block``)
  loop      the plain per-expert loop of ``F.linear`` calls on the dispatched rows (the experts
            kind's floor, ``moebench.measure.floors.loop_floor``)

and prints each one's median and the median over rounds of its round-by-round ratio to ``gemms``
(and, for the layer, to ``block``). Before timing it checks, once, that the block's output equals
the layer's within 1e-5 relative, so the comparison is of the same function. The README quotes its
output. ``--profile N`` instead runs N layer forwards under ``torch.profiler`` and prints the
operators by self CPU time per forward: where the time beyond the GEMMs (``aten::mm``) goes.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
import torch.nn.functional as F
from tabulate import tabulate

from moebench.measure.environment import cpu_model
from moebench.measure.floors import loop_floor, mixtral_block
from moebench.measure.timing import time_interleaved
from moebench.workload.tokens import tokens
from runtime import MoEConfig, MoELayer, init_weights
from runtime.reference import rel_error

SAME_FUNCTION_RTOL = 1e-5  # ‖block − layer‖ / ‖layer‖ in fp32: the same function, summed in another order
DESCRIPTIONS = {
    "layer": "MoELayer forward",
    "gemms": "its expert GEMMs alone",
    "experts": "its expert FFN alone",
    "block": "loop-over-experts block (Mixtral)",
    "loop": "per-expert F.linear loop",
}


def _gemms_fn(x_RD: torch.Tensor, layer: MoELayer, counts: list[int]):
    """Only the two GEMMs per expert on the dispatched rows; the [n, F] input of the second is the
    real activation, computed once, untimed."""
    w_in_LDH, w_down_LFD = layer.experts.w_in_LDH.detach(), layer.experts.w_down_LFD.detach()
    with torch.no_grad():
        h_RH = torch.cat([x @ w for x, w in zip(torch.split(x_RD, counts), w_in_LDH.unbind(0), strict=True)])
        if layer.moe.activation == "swiglu":
            gate_RF, up_RF = h_RH.chunk(2, dim=-1)
            a_RF = F.silu(gate_RF) * up_RF
        else:
            a_RF = F.gelu(h_RH)
    work = list(zip(torch.split(x_RD, counts), torch.split(a_RF, counts), w_in_LDH, w_down_LFD, strict=True))

    def gemms():
        for x_ND, a_NF, w_in_DH, w_down_FD in work:
            x_ND @ w_in_DH
            a_NF @ w_down_FD

    return gemms


def measure(
    hidden: int = 512,
    ffn: int = 1024,
    experts: int = 16,
    top_k: int = 2,
    activation: str = "swiglu",
    num_tokens: int = 4096,
    repeats: int = 15,
    warmup: int = 3,
    seed: int = 0,
) -> dict:
    """Time the five functions at one shape on the CPU, with the threads torch has now.

    1. Build the EP = 1 layer from seeded weights and route seeded tokens once, untimed: the
       dispatched rows and per-expert counts the GEMMs, the expert FFN and the loop run on.
    2. Check that the block and the layer compute the same function (raises ``RuntimeError`` if not).
    3. Time the five in alternating rounds; per function: median, and median of round ratios.
    """
    moe = MoEConfig(hidden, ffn, experts, top_k=top_k, activation=activation, dtype="float32")
    layer = MoELayer(moe)
    layer.load_global_weights(init_weights(moe, seed=seed))
    x_TD = tokens(num_tokens, hidden, seed, stream=1)  # stream 0 of seed 0 is init_weights(seed=0)'s generator
    w_in, w_down = layer.experts.w_in_LDH, layer.experts.w_down_LFD
    with torch.no_grad():
        plan = layer.plan(x_TD)
        x_RD, meta = layer.dispatcher.dispatch(x_TD, *plan.dispatch_args)
        counts = meta.tokens_per_expert
        block = mixtral_block(layer.router.weight_ED, w_in, w_down, activation, top_k, moe.normalize_topk)
        error = rel_error(block(x_TD), layer(x_TD).out_TD)
    if not error <= SAME_FUNCTION_RTOL:  # NaN fails too
        raise RuntimeError(
            f"the loop-over-experts block is not the layer's function: relative error {error:.3e} > "
            f"{SAME_FUNCTION_RTOL:g}; its timings would compare different work"
        )
    loop = loop_floor(x_RD, w_in, w_down, counts, activation)
    fns = {
        "layer": lambda: layer(x_TD),
        "gemms": _gemms_fn(x_RD, layer, counts),
        "experts": lambda: layer.experts(x_RD, counts),
        "block": lambda: block(x_TD),
        "loop": loop,
    }
    with torch.no_grad():
        timing = time_interleaved(fns, warmup=warmup, repeats=repeats, device=torch.device("cpu"))
    samples = {name: np.array(t.samples_s) for name, t in timing.items()}
    functions = {}
    for name, s in samples.items():
        functions[name] = {
            "description": DESCRIPTIONS[name],
            "median_s": float(np.median(s)),
            "over_gemms": float(np.median(s / samples["gemms"])),
        }
    functions["layer"]["over_block"] = float(np.median(samples["layer"] / samples["block"]))
    return {
        "shape": {"hidden": hidden, "ffn": ffn, "experts": experts, "top_k": top_k, "activation": activation},
        "tokens": num_tokens,
        "counts": list(counts),
        "same_function_error": error,
        "samples": repeats,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "functions": functions,
    }


def profile_layer(
    forwards: int, num_tokens: int = 4096, rows: int = 15, hidden: int = 512, ffn: int = 1024, experts: int = 16
) -> str:
    """The layer's forward (the seed shape, as ``measure`` builds it) under ``torch.profiler``:
    the top operators by self CPU time, in ms per forward."""
    moe = MoEConfig(hidden, ffn, experts, top_k=2, activation="swiglu", dtype="float32")
    layer = MoELayer(moe)
    layer.load_global_weights(init_weights(moe, seed=0))
    x_TD = tokens(num_tokens, moe.hidden_size, 0, stream=1)
    with torch.no_grad():
        layer(x_TD)  # warm-up, unprofiled
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(forwards):
                layer(x_TD)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in events)
    table = [
        [e.key, e.self_cpu_time_total / 1e3 / forwards, e.self_cpu_time_total / total_us, e.count // forwards]
        for e in events[:rows]
    ]
    head = f"EP 1 forward under torch.profiler, {num_tokens} tokens, {forwards} forwards; per forward:"
    body = tabulate(table, headers=["operator or range", "self ms", "share", "calls"], floatfmt=("", ".2f", ".3f"))
    return "\n".join([head, body, f"{cpu_model()}, {torch.get_num_threads()} thread(s)"])


def render(result: dict) -> str:
    """The table a person reads: per function, median and ratios, then the sample count and machine."""
    rows = [
        [name, f["description"], f["median_s"] * 1e3, f["over_gemms"], f.get("over_block")]
        for name, f in result["functions"].items()
    ]
    shape = result["shape"]
    head = (
        f"EP 1 forward, no_grad, D={shape['hidden']} F={shape['ffn']} E={shape['experts']} "
        f"top-{shape['top_k']} {shape['activation']}, {result['tokens']} tokens, float32, cpu"
    )
    table = tabulate(
        rows,
        headers=["", "function", "median (ms)", "vs gemms", "vs block"],
        floatfmt=("", "", ".2f", ".3f", ".3f"),
        missingval="-",
    )
    same = f"block vs layer output: relative error {result['same_function_error']:.2e} (<= {SAME_FUNCTION_RTOL:g})"
    machine = f"{result['samples']} rounds (ratios: median of round-by-round ratios); {result['cpu']}, "
    machine += f"{result['threads']} thread{'s' * (result['threads'] != 1)}"
    return "\n".join([head, same, table, machine])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N forwards instead of timing")
    args = parser.parse_args(argv)
    for name, least in (("tokens", 1), ("repeats", 1), ("warmup", 0), ("threads", 1), ("profile", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} = {getattr(args, name)} is invalid: accepted an integer >= {least}")
    torch.set_num_threads(args.threads)
    if args.profile:
        print(profile_layer(args.profile, args.tokens))
        return 0
    try:
        result = measure(num_tokens=args.tokens, repeats=args.repeats, warmup=args.warmup)
    except RuntimeError as err:
        print(f"serial_path: {err}", file=sys.stderr)
        return 1
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
