"""The train kind: the decoder (runtime/model.py) trained for ``[train] steps`` optimizer steps on a
learnable synthetic task, the same in every layout, and compared with the single-device run of the same
global batch; what a step costs (throughput, scaling, time in collectives) and what it holds in memory
(parameters, gradients, optimizer state, activations), against the plan model's prediction.

Rank side: moebench/measure/training.py. Metric definitions, with sources: docs/results.md ("train").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from moebench import metrics as M
from moebench.measure.common import ratios
from moebench.measure.eplb import EPLB_COLUMNS, EPLB_METRICS, eplb_checks, eplb_details, eplb_metrics
from moebench.measure.training import data_bytes, measure_train, seq_len
from moebench.plan.memory import TrainShape, train_memory
from moebench.spec import check_decoder

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "train"
ORDER = 4
FEATURES = frozenset({"decoder", "dp", "eplb", "bias_update"})
COLUMNS = (
    ("loss_initial", "loss@0", 1, ".4g"),
    ("loss_final", "loss@end", 1, ".4g"),
    ("loss_rel_diff_max", "vs 1 device", 1, ".1e"),
    ("tokens_per_s", "tok/s", 1, ".0f"),
    ("scaling_efficiency", "scaling", 1, ".2f"),
    ("comm_time_share", "comm", 1, ".2f"),
    ("activation_bytes", "act (MiB)", 2**-20, ".2f"),
    ("optimizer_bytes", "opt (MiB)", 2**-20, ".2f"),
    ("recompute_time_ratio", "recompute x", 1, ".2f"),  # only in tables of runs with recompute
    *EPLB_COLUMNS,  # only in tables of runs that set [eplb] interval
)
MEMORY = ("param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes")
METRICS = (
    "loss_initial",
    "loss_final",
    "loss_rel_diff_max",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "scaling_efficiency",
    "comm_time_share",
    *MEMORY,
    "peak_memory_bytes",
    "recompute_time_ratio",
    "activation_saving",
    "imbalance_max_mean_initial",
    "imbalance_max_mean_final",
    *EPLB_METRICS,
)
# converges_like_baseline: the largest relative difference from the single-device run, in loss and in
# gradient norm, a layout may show over the run, per dtype. Measured (docs/measurements.md): fp32 layouts
# differ only by the order of floating-point sums (1.8e-7), bf16 by 6.2e-3.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2}
MEMORY_TARGET = {"param_bytes": 0.01, "grad_bytes": 0.01, "optimizer_bytes": 0.01, "activation_bytes": 0.20}
LEARNED = 0.5  # loss_decreased: the final loss is at most this share of the initial one ...
MAX_DATA_BYTES = 8 * 2**30  # host memory the steps' inputs and targets may take on rank 0
JUDGED_FROM = 10  # ... judged in runs of at least this many steps (shorter ones measure cost, not learning)


def validate(spec: RunSpec) -> None:
    """A decoder with attention in fp32 or bf16, tokens per rank in whole sequences, dropless data
    parallelism, the router's own routing, every step's inputs and targets within the host-memory bound."""
    m, wl = spec.model, spec.workload
    check_decoder(spec)
    if m["dtype"] not in TOLERANCE:
        raise ValueError(
            f'[model] dtype = "{m["dtype"]}" is invalid for kind train: accepted "float32" or "bfloat16" (the '
            "parameters train in their own dtype, with no fp32 master copy or loss scaling: in float16 Adam's "
            "eps, 1e-8, is 0 and the run turns to NaN)"
        )
    n = seq_len(spec)
    if wl["tokens_per_rank"] % n:
        raise ValueError(
            f"[train] seq_len = {n} is invalid with tokens_per_rank = {wl['tokens_per_rank']}: accepted a divisor "
            "of tokens_per_rank (each rank trains on whole sequences)"
        )
    if wl["train"]:
        raise ValueError(
            "[workload] train = true is invalid for kind train: accepted false (it is the stack kinds' one-step "
            "flag; kind train always trains)"
        )
    if wl["skew"] != "uniform":
        raise ValueError(
            f'[workload] skew = "{wl["skew"]}" is invalid for kind train: accepted "uniform" (the router learns '
            "its routing; a fixed skew would be a bias it cannot train)"
        )
    need = data_bytes(spec, wl["tokens_per_rank"] * spec.world_size)  # rank 0's, for the single-device run
    if need > MAX_DATA_BYTES:
        raise ValueError(
            f"[train] steps = {spec.train['steps']} is invalid with tokens_per_rank = {wl['tokens_per_rank']} at "
            f"world_size {spec.world_size}: every step's inputs and targets, kept in host memory, would take "
            f"{need / 2**30:.1f} GiB; accepted at most {MAX_DATA_BYTES / 2**30:.0f} GiB (fewer steps or tokens)"
        )
    if spec.parallel["mode"] == "dp" and spec.routing["capacity_factor"] and spec.world_size > 1:
        raise ValueError(
            f"[routing] capacity_factor = {spec.routing['capacity_factor']!r} is invalid with [parallel] mode = "
            '"dp": accepted 0 (each data-parallel rank would drop against its own capacity, other tokens than '
            "the single-device run drops)"
        )


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    return measure_train(ctx, spec, interval)


def window_tokens(spec: RunSpec) -> int:
    """Tokens trained inside the telemetry window: every step's global batch."""
    return spec.workload["tokens_per_rank"] * spec.world_size * spec.train["steps"]


# -------------------------------------------------------------------------------------------
# Parent side


def shape(spec: RunSpec) -> TrainShape:
    """The run's configuration in the plan model's terms."""
    cfg = spec.decoder_config()
    return TrainShape(
        hidden=cfg.hidden,
        ffn_hidden=cfg.moe.ffn_hidden_size,
        experts=cfg.moe.num_experts,
        top_k=cfg.moe.top_k,
        layers=cfg.layers,
        dense_layers=cfg.dense_layers,
        shared_experts=cfg.shared_experts,
        heads=cfg.attention_heads,
        kv_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        vocab=cfg.vocab,
        activation=cfg.moe.activation,
        bytes_per_element=cfg.moe.torch_dtype.itemsize,
        tokens=spec.workload["tokens_per_rank"],
        seq_len=seq_len(spec),
        ep=spec.parallel_config().ep_size,
        spare_slots=spec.parallel["redundant_experts"] if spec.eplb["interval"] else 0,
        recompute=spec.model["recompute"],
        optimizer=spec.train["optimizer"],
        normalize_topk=cfg.moe.normalize_topk,
    )


def _step_times(per_rank: list[dict], warmup: int) -> list[float]:
    """Each step's time, the slowest rank's, after the first ``warmup`` steps (all of them if that is
    every step)."""
    times = [max(steps) for steps in zip(*([r["step_time_s"] for r in rank["curve"]] for rank in per_rank),
                                         strict=True)]  # fmt: skip
    return _after_warmup(times, warmup)


def _after_warmup(times: list[float], warmup: int) -> list[float]:
    return times[warmup:] if len(times) > warmup else times


def _rel_diff(curve: list[dict], baseline: list[dict], key: str = "loss") -> float:
    """max over steps of |run − baseline| / |baseline| of one per-step record (``loss``, ``grad_norm``);
    a step whose baseline value is 0 counts its absolute difference."""
    diffs = [abs(a[key] - b[key]) / (abs(b[key]) or 1.0) for a, b in zip(curve, baseline, strict=True)]
    return float(max(diffs))


def _error(measured: float, predicted: float) -> float:
    """(measured − predicted) / measured; −1 where the model predicts bytes none are measured."""
    if measured:
        return (measured - predicted) / measured
    return 0.0 if predicted == 0 else -1.0


def _memory(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, dict, dict]:
    """Per-category metrics (samples: one per rank), the largest rank's bytes, and the model's error."""
    metrics, measured = {}, {}
    for name in (*MEMORY, "peak_memory_bytes", "expert_param_bytes", "activation_bytes_cuda"):
        values = [rank["memory"][name] for rank in per_rank if name in rank["memory"]]
        if values:
            measured[name] = max(values)
            if name in METRICS:
                metrics[name] = M.metric([float(v) for v in values], "B", "lower", exact=True)
    predicted = train_memory(shape(spec))
    model = {name: {"measured": measured[name], "predicted": predicted[name],
                    "error": _error(measured[name], predicted[name])} for name in MEMORY}  # fmt: skip
    return metrics, measured, model


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    """1. the curve and throughput; 2. learning and parity with the single-device run; 3. memory against
    the model; 4. recomputation against none."""
    world, steps = spec.world_size, spec.train["steps"]
    G = spec.workload["tokens_per_rank"] * world
    curve = per_rank[0]["curve"]  # every rank records the same group-wide numbers; its own step times
    baseline = per_rank[0].get("baseline")
    # 1. The curve (each step's time the slowest rank's) and what a step costs.
    times = _step_times(per_rank, spec.scenario["warmup"])
    details = {"curve": [r | {"step_time_s": t} for r, t in zip(curve, _step_times(per_rank, 0), strict=True)],
               "global_tokens": G, "tokens_per_rank": spec.workload["tokens_per_rank"], "steps": steps,
               "baseline": "self" if baseline is None else "single-device"}  # fmt: skip
    metrics = {
        "loss_initial": M.metric([curve[0]["loss"]], "loss", "lower", exact=True),  # deterministic for a seed
        "loss_final": M.metric([curve[-1]["loss"]], "loss", "lower", exact=True),
        "grad_norm": M.metric([r["grad_norm"] for r in curve], "norm", "lower"),
        "tokens_per_s": M.metric([G / t for t in times], "tokens/s", "higher"),
        "tokens_per_s_per_gpu": M.metric([G / t / world for t in times], "tokens/s", "higher"),
    }
    if "imbalance_max_mean" in curve[0]:  # recorded by every MoE decoder's run (moebench/measure/training.py)
        for name, record in (("initial", curve[0]), ("final", curve[-1])):  # the same global loads on every rank
            metrics[f"imbalance_max_mean_{name}"] = M.metric([record["imbalance_max_mean"]], "ratio", "lower",
                                                            exact=True)  # fmt: skip
    if world > 1:  # one rank exchanges nothing
        metrics["comm_time_share"] = M.metric([rank["comm_time_share"] for rank in per_rank], "fraction", "lower")
    checks = [{"name": "finite_output", "pass": all(rank["finite"] for rank in per_rank),
               "detail": "every step's loss and gradient norm is finite"}]  # fmt: skip
    # 2. Learning, and parity with the single-device run (W = 1: the run is its own, a difference of 0).
    if steps >= JUDGED_FROM:
        checks.append({"name": "loss_decreased", "pass": curve[-1]["loss"] <= LEARNED * curve[0]["loss"],
                       "detail": f"final loss {curve[-1]['loss']:.4g} vs initial {curve[0]['loss']:.4g} (accepted "
                                 f"<= {LEARNED:g} x initial after {steps} steps)"})  # fmt: skip
    else:
        details["loss_decreased"] = f"not judged: {steps} steps (judged from {JUDGED_FROM})"
    if baseline is None:
        metrics["loss_rel_diff_max"] = M.metric([0.0], "ratio", "lower", exact=True)
    else:
        details["baseline_curve"] = baseline
        diff, grad_diff = _rel_diff(curve, baseline), _rel_diff(curve, baseline, "grad_norm")
        details["grad_norm_rel_diff_max"] = grad_diff
        metrics["loss_rel_diff_max"] = M.metric([diff], "ratio", "lower", exact=True)
        single = G / float(np.median(_after_warmup([r["step_time_s"] for r in baseline], spec.scenario["warmup"])))
        metrics["scaling_efficiency"] = M.metric([G / t / (world * single) for t in times], "ratio", "higher")
        # the gradient norm too: Adam's step is blind to a gradient scaled by a constant (an average
        # where a sum belongs), which the loss curve then hardly shows
        tol = TOLERANCE[spec.model["dtype"]]
        checks.append({"name": "converges_like_baseline", "pass": diff <= tol and grad_diff <= tol,
                       "detail": f"largest relative difference from the single-device run over {steps} steps: "
                                 f"loss {diff:.2e}, gradient norm {grad_diff:.2e} (accepted <= {tol:g} for "
                                 f"{spec.model['dtype']})"})  # fmt: skip
    # 3. Memory per rank against the plan model.
    mem_metrics, measured, model = _memory(spec, per_rank)
    metrics |= mem_metrics
    details |= {"memory": measured, "memory_model": model,
                "memory_model_error": {name: entry["error"] for name, entry in model.items()}}  # fmt: skip
    within = all(abs(e["error"]) <= MEMORY_TARGET[n] for n, e in model.items())
    checks.append({"name": "memory_model", "pass": within,
                   "detail": "plan model vs measured bytes per rank (largest rank): " + ", ".join(
                       f"{n} {e['error']:+.2%}" for n, e in model.items())
                   + f"; accepted within {', '.join(f'{n} {t:.0%}' for n, t in MEMORY_TARGET.items())}"})  # fmt: skip
    # 4. Recomputation against none, from the same weights, in the same rounds.
    rec = [rank.get("recompute") for rank in per_rank]
    if rec[0] is not None:
        slow = [max(pair) for pair in zip(*(r["recompute_s"] for r in rec), strict=True)]
        fast = [max(pair) for pair in zip(*(r["none_s"] for r in rec), strict=True)]
        metrics["recompute_time_ratio"] = M.metric(ratios(slow, fast), "ratio", "lower")
        saving = [1 - rank["memory"]["activation_bytes"] / r["activation_bytes_none"]
                  for rank, r in zip(per_rank, rec, strict=True)]  # fmt: skip
        metrics["activation_saving"] = M.metric(saving, "fraction", "higher")
        checks.append({"name": "recompute_grads_equal", "pass": all(r["grads_equal"] for r in rec),
                       "detail": f"recompute = \"{spec.model['recompute']}\" vs \"none\" from the same weights on "
                                 "step 0's batch: every gradient bitwise equal on every rank"})  # fmt: skip
    metrics |= eplb_metrics(spec, per_rank)
    checks += eplb_checks(per_rank)
    details |= eplb_details(spec, per_rank)
    return metrics, checks, details
