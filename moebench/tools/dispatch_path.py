"""Where does an EP > 1 dispatch (and combine) spend its time beyond the all-to-all? Time the pieces side by side.

    python -m moebench.tools.dispatch_path [--scenario scenarios/regress/regress-a2a.toml] [--repeats 300]

On the scenario's ranks, model and tokens (its first run; world_size > 1), it routes every layer
once, as the dispatch kind does, and then times, under ``no_grad``, all layers back to back, in
alternating rounds (``time_interleaved``, so round i of each is comparable):

  a2a               the raw ``all_to_all_single`` of each layer's exact dispatch splits (the
                    dispatch kind's reference, ``dispatch_over_a2a``)
  exchange          the dispatcher's exchange of a ready send buffer: the same all-to-all through
                    ``runtime/collective.py`` (async launch, wait, a fresh output)
  send + exchange   the gather of the send buffer from the tokens, then the exchange
  dispatch          the whole dispatch: planning the send order and splits, then the above
  combine exchange  the reverse exchange of the dispatched rows
  combine           the whole combine: the reverse exchange, then the weighted sum per token

and prints each one's median and the median over rounds of its round-by-round ratio to ``a2a``,
then the differences of medians that price each step: the wrapper (exchange − a2a), the gather
(send + exchange − exchange), the planning (dispatch − send + exchange) and the weighted sum
(combine − combine exchange). The README quotes its output.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from tabulate import tabulate

from moebench import scenario as scenario_mod
from moebench.launch.spawn import launch
from moebench.measure.common import dispatch_combine_fns, dispatch_jobs, raw_a2a_fn, setup
from moebench.measure.environment import cpu_model
from moebench.measure.timing import time_interleaved

DEFAULT_SCENARIO = "scenarios/regress/regress-a2a.toml"
FUNCTIONS = ("a2a", "exchange", "send + exchange", "dispatch", "combine exchange", "combine")
STEPS = (  # (what a step costs, the function with it, the function without it)
    ("exchange wrapper and output", "exchange", "a2a"),
    ("send gather", "send + exchange", "exchange"),
    ("planning", "dispatch", "send + exchange"),
    ("weighted sum per token", "combine", "combine exchange"),
)


def _functions(jobs: list, group) -> dict:
    """The timed functions (module docstring), each over all layers."""
    sends = [layer.dispatcher.send(h_in, meta) for layer, _, h_in, _, meta in jobs]

    def exchange():
        for (layer, *_, meta), x_PD in zip(jobs, sends, strict=True):
            layer.dispatcher.exchange(x_PD, meta.output_splits, meta.input_splits).wait()

    def send_exchange():
        for layer, _, h_in, _, meta in jobs:
            d = layer.dispatcher
            d.exchange(d.send(h_in, meta), meta.output_splits, meta.input_splits).wait()

    def combine_exchange():
        for layer, _, _, x_RD, meta in jobs:
            (chunk,) = meta.chunks
            y_RD = layer.dispatcher.to_source_major(x_RD, chunk)
            layer.dispatcher.exchange(y_RD, meta.input_splits, meta.output_splits).wait()

    serial = dispatch_combine_fns(jobs)  # the dispatch kind's own
    h_in = jobs[0][2]
    exchanges = [(meta.output_splits, meta.input_splits) for *_, meta in jobs]
    fns = [raw_a2a_fn(exchanges, h_in.shape[1], h_in.dtype, h_in.device, group), exchange, send_exchange]
    fns += [serial["dispatch"], combine_exchange, serial["combine"]]
    return dict(zip(FUNCTIONS, fns, strict=True))


def _rank(ctx, spec, warmup: int, repeats: int) -> dict:
    if ctx.device.type == "cpu" and spec.parallel["threads_per_rank"]:  # as a run of the scenario would
        torch.set_num_threads(spec.parallel["threads_per_rank"])
    stack, group, x_TD = setup(ctx, spec)
    with torch.no_grad():
        fns = _functions(dispatch_jobs(stack, x_TD, spec.moe_config().torch_dtype), group)
        timing = time_interleaved(fns, warmup=warmup, repeats=repeats, device=ctx.device, group=group)
    return {name: list(t.samples_s) for name, t in timing.items()}


def summarise(samples: dict[str, list[float]]) -> dict:
    """Per function: median and median of round ratios to ``a2a``; per step: the median difference."""
    s = {name: np.array(v) for name, v in samples.items()}
    functions = {
        name: {"median_s": float(np.median(v)), "over_a2a": float(np.median(v / s["a2a"]))} for name, v in s.items()
    }
    steps = {step: functions[with_it]["median_s"] - functions[without]["median_s"] for step, with_it, without in STEPS}
    return {"functions": functions, "steps": steps, "samples": len(s["a2a"])}


def measure(path: str = DEFAULT_SCENARIO, repeats: int = 300, warmup: int = 20) -> dict:
    """Launch the scenario's first run's ranks and time the functions there (raises ``ValueError``
    for a scenario that does not fit: one rank, or not loadable)."""
    spec = scenario_mod.load(path).runs[0]
    if spec.world_size < 2:
        raise ValueError(f"{path}: [parallel] world_size = {spec.world_size}: accepted 2 or more (an all-to-all)")
    per_rank = launch(_rank, spec.world_size, spec, warmup, repeats, device=spec.parallel["device"])
    result = summarise(per_rank[0])  # samples are already the max over ranks
    m = spec.model
    shape = f"D {m['hidden']}, {m['num_experts']} experts, top-{m['top_k']}, {m['layers']} layers, {m['dtype']}"
    tokens = spec.workload["tokens_per_rank"]
    return result | {"scenario": path, "shape": f"{shape}, {tokens} tokens per rank", "ranks": spec.world_size}


def render(result: dict) -> str:
    """The tables a person reads: the functions, then what each step costs; then samples and machine."""
    rows = [[name, f["median_s"] * 1e3, f["over_a2a"]] for name, f in result["functions"].items()]
    table = tabulate(rows, headers=["function", "median (ms)", "vs a2a"], floatfmt=("", ".3f", ".3f"))
    a2a_s = result["functions"]["a2a"]["median_s"]
    step_rows = [[step, t * 1e3, t / a2a_s] for step, t in result["steps"].items()]
    steps = tabulate(step_rows, headers=["step", "ms (difference)", "of a2a"], floatfmt=("", ".3f", ".3f"))
    head = f"{result['scenario']}: {result['ranks']} ranks, {result['shape']}; all layers back to back"
    tail = f"{result['samples']} rounds (ratios: median of round-by-round ratios); {cpu_model()}"
    return "\n".join([head, table, "", steps, tail])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", default=DEFAULT_SCENARIO)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    for name, least in (("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            parser.error(f"--{name} = {getattr(args, name)} is invalid: accepted an integer >= {least}")
    try:
        result = measure(args.scenario, args.repeats, args.warmup)
    except (ValueError, OSError) as err:
        print(f"dispatch_path: {err}", file=sys.stderr)
        return 1
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
