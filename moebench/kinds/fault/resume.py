"""The fault kind's crash of a training run that checkpoints, and its resume.

A run with ``[workload] train = true`` and ``[fault] checkpoint_every = n`` trains the stack with
Adam (forward, backward, the router's gradients summed over the group, one optimizer step) and
saves the training state every n steps with ``torch.distributed.checkpoint``
(``runtime/checkpoint.py``). Rank ``rank`` crashes in layer ``layer``'s forward at step
``at_step``; the watchdog stops the run and names it. The kind then relaunches every rank, which
resume from the newest complete checkpoint and train to the end; and, last, runs the same training
uninterrupted, without checkpoints, as the reference. Reported: ``recovered`` ("resumed from step
j"), ``steps_lost`` (the steps redone: at_step − j), ``recovery_s`` (relaunch to the end), and the
check ``resume_bitwise``: every weight and optimizer tensor of the resumed run equals the
uninterrupted run's, bit for bit (fp32 on CPU: the steps are deterministic).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import TYPE_CHECKING

import torch

from moebench.measure.common import setup
from moebench.workload.tokens import tokens

if TYPE_CHECKING:
    from moebench.spec import RunSpec

LR = 1e-3  # Adam's learning rate: small steps of a unit-scale stack


def resumable(spec: RunSpec) -> bool:
    return bool(spec.workload["train"] and spec.fault.get("checkpoint_every"))


def with_pass(spec: RunSpec, mode: str, directory: str | None) -> RunSpec:
    """The spec a launch's ranks get: which pass this is (first, resume, reference) and where checkpoints go."""
    return dataclasses.replace(spec, fault={**spec.fault, "_pass": mode, "_checkpoint_dir": directory})


def _digests(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """SHA-256 of each tensor's bytes (any dtype, any device: compared bit for bit)."""
    raw = {k: v.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for k, v in state.items()}
    return {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in raw.items()}


def measure_train(ctx, spec: RunSpec) -> dict:
    """One pass of the training run on this rank (``spec.fault["_pass"]``: first, resume, reference)."""
    from runtime import checkpoint  # here: torch.distributed.checkpoint costs every rank of every run ~1 s to import

    f = spec.fault
    stack, group, x_TD = setup(ctx, spec)
    g_TD = tokens(x_TD.shape[0], x_TD.shape[1], spec.workload["seed"], 500_000 + ctx.rank).to(x_TD)
    optimizer = torch.optim.Adam(stack.parameters(), lr=LR, foreach=False)
    steps = spec.scenario["warmup"] + spec.scenario["repeats"]
    mode, directory, start = f["_pass"], f["_checkpoint_dir"], 0
    if mode == "resume":
        found = checkpoint.latest(directory)
        if found is not None:
            start = checkpoint.load(found, stack.layers, optimizer, group)
    current = {"step": start}

    def beat(l: int):
        def hook(module, args):
            ctx.beat(current["step"], l)
            if mode == "first" and (current["step"], l) == (f["at_step"], f["layer"]) and ctx.rank == f["rank"]:
                os._exit(17)  # the injected crash, inside layer l's forward

        return hook

    for l, layer in enumerate(stack.layers):
        layer.register_forward_pre_hook(beat(l))
    for step in range(start, steps):
        current["step"] = step
        optimizer.zero_grad(set_to_none=True)
        out_TD, results = stack(x_TD)
        loss = (out_TD.float() * g_TD.float()).sum() + sum(r.router_loss for r in results)
        loss.backward()
        stack.reduce_replicated_grads()
        optimizer.step()
        if directory is not None and (step + 1) % f["checkpoint_every"] == 0:
            checkpoint.save(directory, stack.layers, optimizer, step + 1, group)
    return {
        "pass": mode,
        "resumed_from": start,
        "digests": _digests(checkpoint.state_dict(stack.layers, optimizer, steps)),
        "telemetry": {"available": False, "reason": "not sampled in fault runs"},
    }


def evaluate_resume(spec: RunSpec, per_rank: list[dict], fault: dict) -> tuple[dict, list[dict]]:
    """The fault details of a resumed run, and the check ``resume_bitwise``."""
    run = per_rank[0]
    resumed, reference = run.get("resumed"), run.get("reference")
    if not resumed:
        return fault, []
    start = resumed[0]["resumed_from"]
    fault |= {"recovered": f"resumed from step {start}", "steps_lost": spec.fault["at_step"] - start}
    fault["recovery_s"] = run["recovery_s"]
    mine = {k: v for r in resumed for k, v in r["digests"].items()}
    want = {k: v for r in reference for k, v in r["digests"].items()}
    differ = sorted(k for k in want if mine.get(k) != want[k])
    check = {
        "name": "resume_bitwise",
        "pass": not differ and mine.keys() == want.keys(),
        "detail": f"resumed from step {start}: {len(want) - len(differ)} of {len(want)} tensors bitwise equal "
        "to the uninterrupted run's" + (f"; first differing: {differ[0]}" if differ else ""),
    }
    return fault, [check]
