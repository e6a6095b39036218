"""The fault kind's ``expert_loss`` and ``rank_loss``: lose expert copies mid-run, detect the loss
with a per-step health exchange, and go on serving with replicas (failover), rerouting or dropping.

Redundancy. With ``[parallel] redundant_experts = N``, one forward of the run's own tokens
measures each layer's expert loads (the group-wide routed copies); every layer then gets N
replicas by ``runtime/redundancy.py``'s rule (EPLB's choice of experts, least-loaded placement).

Injection, at the start of step ``at_step``:
- ``expert_loss``: the primary copy of logical expert ``expert`` in layer ``layer`` (on the rank
  its placement gives it) is lost: its owner's weights for it become NaN, as memory that is gone,
  so a token sent there after all would show in the output;
- ``rank_loss``: every expert copy rank ``rank`` holds, in every layer, is lost, and the rank is
  masked (DeepEP's shrink mode): from then on it routes no tokens of its own. Its process stays in
  the group, taking part in the collectives with empty splits: a dead process cannot take part in
  a gloo collective, so the kind simulates what a masking runtime leaves of it.

Detection: every step starts with a health exchange, an all-reduce (MAX) of each rank's lost
copies as a [layers, physical experts] bit mask; every rank then applies the same live set
(``MoELayer.set_alive``). The rank that lost a copy reports it itself (as a device reporting its
own memory loss would), so detection cannot miss, and ``detected_after_s``, from the injection to
the exchange's answer on the injecting rank, measures the health exchange. The loss is caught
before the step dispatches a token, so no step is lost.

After: a logical expert with a live copy is served by it (failover: outputs must equal the healthy
run's, the check ``failover_exact``; not for a rank loss with capacity, where the masked rank's
missing tokens shrink the capacity and so change which copies the others keep); one without
follows ``[fault] on_expert_loss`` ("reroute": the next-best available expert; "drop": the copy is
dropped; runtime/redundancy.py).
Reported: ``tokens_rerouted`` (tokens with a choice no live copy served, summed over the layers,
the ranks and the steps after the loss), ``rel_error_vs_healthy`` (max over those steps of
‖y − y_healthy‖ / ‖y_healthy‖ of the stack's output over the unmasked ranks' tokens, the healthy
output being step 0's: the input is the same every step), and the throughput change.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from moebench.measure.common import build_stack, setup
from runtime.redundancy import RedundancyConfig

if TYPE_CHECKING:
    from moebench.spec import RunSpec

TYPES = ("expert_loss", "rank_loss")
EXACT = 1e-6  # failover: the output equals the healthy run's (the same weights; fp32 sums may reorder)


def _no_loss(stack) -> torch.Tensor:
    """An all-zero [layers, physical experts] mask, as wide as the layer with the most copies
    (host: the masks are a few hundred ints)."""
    width = max(len(layer.replicas.logical_of_P) for layer in stack.layers)
    return torch.zeros(len(stack.layers), width, dtype=torch.int32)


def _lost_mask(stack, f: dict, rank: int) -> torch.Tensor:
    """This rank's injected loss as a [layers, physical experts] mask (zeros on the other ranks)."""
    lost_LP = _no_loss(stack)
    for l, layer in enumerate(stack.layers):
        for p in layer.local_experts:
            if (f["type"] == "rank_loss" and rank == f["rank"]) or (
                f["type"] == "expert_loss" and l == f["layer"] and p == f["expert"]
            ):
                lost_LP[l, p] = 1
                local = layer.local_experts.index(p)
                with torch.no_grad():
                    layer.experts.w_in_LDH[local] = float("nan")  # the copy's memory is gone
    return lost_LP


def with_replicas(ctx, spec: RunSpec, stack, x_TD: torch.Tensor):
    """``stack`` when ``[parallel] redundant_experts`` = 0, else a new stack of the same layers with
    that many replicas in every layer, chosen from the loads one forward of the run's tokens on
    ``stack`` measures (group-wide counts: the same on every rank, so the same layout)."""
    redundant = spec.parallel["redundant_experts"]
    if not redundant:
        return stack
    with torch.no_grad():
        _, outputs = stack(x_TD)
    redundancy = [RedundancyConfig(tuple(out.counts_WE.sum(0).tolist()), redundant) for out in outputs]
    return build_stack(ctx, spec, redundancy=redundancy)


def measure_loss(ctx, spec: RunSpec) -> dict:
    """Step the stack with a health exchange per step, and lose copies at ``at_step`` (docstring)."""
    f = spec.fault
    stack, group, x_TD = setup(ctx, spec)
    stack = with_replicas(ctx, spec, stack, x_TD)
    steps = spec.scenario["warmup"] + spec.scenario["repeats"]
    known = _no_loss(stack)
    injected_at, detected, masked = None, None, False
    healthy_TD, wall_S, diff_S, norm_S, lost_S = None, [], [], [], []
    with torch.no_grad():
        for step in range(steps):
            ctx.beat(step, 0)
            wall0 = time.perf_counter()
            lost_LP = torch.zeros_like(known)
            if step == f["at_step"]:
                lost_LP = _lost_mask(stack, f, ctx.rank)
                if lost_LP.any():
                    injected_at = time.monotonic()
            if group is not None:  # the health exchange, on the device (NCCL takes device tensors only)
                on_device = lost_LP.to(x_TD.device)
                dist.all_reduce(on_device, op=dist.ReduceOp.MAX, group=group)
                lost_LP = on_device.cpu()  # sync: every rank applies the same live set before routing
            new = (lost_LP > known).nonzero().tolist()
            if new:
                known = torch.maximum(known, lost_LP)
                for l, layer in enumerate(stack.layers):
                    alive_P = [not bool(known[l, p]) for p in range(len(layer.replicas.logical_of_P))]
                    layer.set_alive(alive_P, f["on_expert_loss"])
                detected = {"at": time.monotonic(), "step": step, "copies": new}
                masked = f["type"] == "rank_loss" and ctx.rank == f["rank"]
            x_in = x_TD[:0] if masked else x_TD
            out_TD, outputs = stack(x_in)
            if out_TD.device.type == "cuda":
                torch.cuda.synchronize(out_TD.device)  # sync: the step's wall time includes its kernels
            wall_S.append(time.perf_counter() - wall0)
            if healthy_TD is None:
                healthy_TD = out_TD
            if detected is not None:
                mine = healthy_TD[: out_TD.shape[0]]
                diff_S.append(float((out_TD.double() - mine.double()).square().sum()))
                norm_S.append(float(mine.double().square().sum()))
                lost_S.append(sum(int(o.lost_tokens) for o in outputs if o.lost_tokens is not None))
    layers = [
        {"logical_of_P": list(layer.replicas.logical_of_P), "owner_P": list(layer.replicas.owner_P)}
        for layer in stack.layers
    ]
    uncovered = any(not bool(layer.replicas.available_E().all()) for layer in stack.layers)
    return {
        "detected": detected,
        "detected_after_s": None if detected is None or injected_at is None else detected["at"] - injected_at,
        "masked": masked,
        "uncovered": uncovered,  # some logical expert was left with no live copy
        "wall_S": wall_S,
        "diff_S": diff_S,
        "norm_S": norm_S,
        "lost_S": lost_S,
        "layers": layers,
        "steps_run": len(wall_S),
        "telemetry": {"available": False, "reason": "not sampled in fault runs"},
    }


def evaluate_loss(spec: RunSpec, per_rank: list[dict], fault: dict) -> tuple[float | None, dict, list[dict]]:
    """(detected_after_s, the fault details filled in, extra checks) from every rank's data."""
    f = spec.fault
    found = per_rank[0]["detected"]
    after = next((r["detected_after_s"] for r in per_rank if r["detected_after_s"] is not None), None)
    if found is None:
        return None, fault, []
    layers = per_rank[0]["layers"]
    copies = found["copies"]  # [layer, physical] pairs the exchange reported
    ranks = sorted({layers[l]["owner_P"][p] for l, p in copies})
    lost_logical = sorted({layers[l]["logical_of_P"][p] for l, p in copies})
    fault |= {"detected": True, "culprit_rank": ranks[0] if len(ranks) == 1 else ranks, "steps_lost": 0}
    if f["type"] == "expert_loss":
        fault |= {"culprit_layer": copies[0][0] if len({l for l, _ in copies}) == 1 else None}
        fault |= {"culprit_expert": lost_logical[0] if len(lost_logical) == 1 else lost_logical}
    diff = np.sum([r["diff_S"] for r in per_rank], axis=0)
    norm = np.sum([r["norm_S"] for r in per_rank], axis=0)
    rel = float(np.max(np.sqrt(diff / norm))) if len(diff) else None
    rerouted = int(np.sum([r["lost_S"] for r in per_rank]))
    uncovered = per_rank[0]["uncovered"]
    how = {"reroute": "rerouted", "drop": "dropped"}[f["on_expert_loss"]]  # what became of uncovered copies
    fault["recovered"] = ("rank masked, " if f["type"] == "rank_loss" else "") + (
        f"replicas + {how}" if uncovered and spec.parallel["redundant_experts"] else how if uncovered else "replicas"
    )
    fault |= {"tokens_rerouted": rerouted, "rel_error_vs_healthy": rel}
    wall = np.array(per_rank[0]["wall_S"])
    at = f["at_step"]
    tokens_before = spec.workload["tokens_per_rank"] * spec.world_size
    tokens_after = tokens_before - spec.workload["tokens_per_rank"] * any(r["masked"] for r in per_rank)
    before, after_t = float(np.median(wall[:at])), float(np.median(wall[at:]))
    fault["throughput_change"] = (tokens_after / after_t) / (tokens_before / before) - 1
    fault["step_time_ratio"] = after_t / before
    checks = []
    # a masked rank sends no tokens, so with capacity the group's N, and so capacity, shrinks: other
    # copies are kept or dropped than in the healthy run, and the outputs may differ with no copy lost
    capacity_moves = f["type"] == "rank_loss" and spec.routing["capacity_factor"] > 0
    if not uncovered and not capacity_moves:
        checks.append(
            {
                "name": "failover_exact",
                "pass": rel is not None and rel <= EXACT,
                "detail": f"output after the loss vs the healthy run: max rel. error {rel:.3g} (accepted <= {EXACT:g})",
            }
        )
    return after, fault, checks
