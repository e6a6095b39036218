"""The train kind's rank side: a student decoder learns a fixed teacher's outputs for ``[train] steps``
optimizer steps, the same global batch per step in every layout; then what the run costs.

Data. Step s's global batch is G = tokens_per_rank × W tokens drawn from a generator seeded by
(seed, s): hidden states [G, D] (vocab 0) or token ids [G] (vocab > 0). Rank r trains on rows
[r·T, (r+1)·T) of it, in sequences of ``seq_len`` tokens; the targets are a teacher's outputs on them (its
hidden states, MSE; or its greedy next tokens, cross-entropy), the teacher being the same decoder with
other seeded weights and no capacity limit, held whole on every rank and dropped before training. Inputs
and targets are made on the host before the first step, and copied to the device before each step's timer
starts.

Per rank, in order:
 1. the activation bytes one forward and its loss (the task's and the router's) save for backward
    (``SavedTensors``; CUDA: also the allocator's
    peak over that forward); after the curve, parameter, gradient and optimizer-state bytes, and on CUDA
    the allocator's peak over the training steps;
 2. with ``recompute`` other than "none": the same decoder without recomputation, from the same weights:
    the gradients of both on step 0's batch (compared bit for bit), their activation bytes, and
    ``warmup`` + ``repeats`` alternating rounds of forward + backward + reduction on each;
 3. the training curve: every step's loss, router losses, gradient norm, drops, expert load imbalance
    (max over MoE blocks of max/mean of the step's global per-expert loads) and time;
 4. (W > 1) a few more steps under the profiler: the time spent in collectives (all-to-alls, all-reduces);
 5. rank 0 only (W > 1): the single-device baseline, the same student trained on the whole global batch
    in this process, while the other ranks wait.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from moebench.measure.common import progress, sampler
from moebench.measure.eplb import Rebalancer, eplb_placements
from moebench.measure.memory import SavedTensors, optimizer_state_bytes, tensor_bytes
from moebench.measure.timing import time_interleaved
from moebench.metrics import imbalance
from runtime.model import Batch, MoEDecoder, Segment, decoder_weights
from runtime.training import Trainer

if TYPE_CHECKING:
    from moebench.spec import RunSpec

TEACHER_SEED = 7_919  # added to [workload] seed: the teacher's weights differ from the student's
PROFILED_STEPS = 3  # steps after the curve timed under the profiler for ``comm_time_share``


def seq_len(spec: RunSpec) -> int:
    return spec.train["seq_len"] or spec.workload["tokens_per_rank"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: the step's kernels end before its timer stops


def global_batch(spec: RunSpec, step: int, world: int) -> torch.Tensor:
    """Step ``step``'s global batch on the host: [G, D] hidden states, or [G] token ids (vocab > 0)."""
    cfg, wl = spec.decoder_config(), spec.workload
    g = torch.Generator().manual_seed(wl["seed"] * 1_000_003 + step)
    rows = wl["tokens_per_rank"] * world
    if cfg.vocab:
        return torch.randint(cfg.vocab, (rows,), generator=g)
    return torch.randn(rows, cfg.hidden, generator=g)


def _batch(spec: RunSpec, tokens: int, device) -> Batch:
    n = seq_len(spec)
    return Batch([Segment(0, n)] * (tokens // n), device, spec.decoder_config())


def data_bytes(spec: RunSpec, tokens: int) -> int:
    """Host bytes of every step's inputs and targets for ``tokens`` rows (``make_data``)."""
    cfg = spec.decoder_config()
    per_token = 16 if cfg.vocab else cfg.hidden * (4 + cfg.moe.torch_dtype.itemsize)  # ids int64; states fp32, dtype
    return spec.train["steps"] * tokens * per_token


def make_data(spec: RunSpec, world: int, rows: slice, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) of every step for ``rows`` of the global batch, on the host (the teacher on ``device``).
    The teacher is dropless, so a target does not depend on which other rows its forward holds."""
    cfg = spec.decoder_config()
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=0.0))
    teacher = MoEDecoder(cfg, decoder_weights(cfg, spec.workload["seed"] + TEACHER_SEED), device=device)
    batch = _batch(spec, rows.stop - rows.start, device)
    data = []
    with torch.no_grad():
        for step in range(spec.train["steps"]):
            x = global_batch(spec, step, world)[rows]
            h_TD = teacher(x.to(device), batch)[0]
            y = teacher.logits(h_TD).argmax(-1) if cfg.vocab else h_TD
            data.append((x, y.cpu()))
    return data


def student(ctx, spec: RunSpec, recompute: str, group) -> MoEDecoder:
    """This rank's student (seeded weights) in the run's layout: EP over ``group``, or (ep_size 1) every
    expert here, the gradients and router losses of the data-parallel ``group`` (None: one rank)."""
    cfg, par = spec.decoder_config(), spec.parallel_config()
    weights = decoder_weights(cfg, spec.workload["seed"])
    if par.ep_size > 1:
        placements = eplb_placements(spec, cfg.layers - cfg.dense_layers)
        return MoEDecoder(cfg, weights, par, group, ctx.device, recompute=recompute, placements=placements)
    return MoEDecoder(cfg, weights, par, None, ctx.device, recompute=recompute, dp_group=group)


def _curve(trainer: Trainer, data, batch: Batch, global_tokens: int, device, rebalancer=None) -> list[dict]:
    """One optimizer step per batch of ``data``; with a ``Rebalancer``, a due re-placement before a step and
    the step's loads recorded after it (both outside the step's time; the optimizer's state moves with the
    experts)."""
    curve = []
    for step, (x, y) in enumerate(data):
        x, y = x.to(device), y.to(device)
        if rebalancer is not None:
            rebalancer.before_step(optimizer=trainer.optimizer)
        _sync(device)
        start = time.perf_counter()
        rec = trainer.step(x, batch, y, global_tokens)
        _sync(device)
        curve.append({"step": step, "loss": rec.loss, "aux_loss": rec.aux_loss, "z_loss": rec.z_loss,
                      "grad_norm": rec.grad_norm, "step_time_s": time.perf_counter() - start,
                      "tokens_dropped": rec.tokens_dropped})  # fmt: skip
        if rec.loads_LE:  # the loads the step's router bias update (if any) moved from
            curve[-1]["imbalance_max_mean"] = max(imbalance(loads_E) for loads_E in rec.loads_LE)
        if rebalancer is not None:
            rebalancer.after_step(rec.loads_LE, rec.received_LW)
    return curve


def _activations(trainer: Trainer, x: torch.Tensor, batch: Batch, y: torch.Tensor, global_tokens: int, device) -> dict:
    """Bytes one forward and its loss (the task's and the router's) save for backward; the graph is dropped
    unused."""
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    with SavedTensors(trainer.model.parameters()) as saved:
        h_TD, routed = trainer.model(x, batch)
        kept = trainer.loss_share(h_TD, y, global_tokens) + sum(r.router_loss for r in routed)
    out = {"activation_bytes": saved.bytes}
    if cuda:
        out["activation_bytes_cuda"] = torch.cuda.max_memory_allocated(device) - before
    del kept
    return out


def _comm_share(trainer: Trainer, data, batch: Batch, global_tokens: int, device) -> float:
    """Time in collectives over step time, ``PROFILED_STEPS`` steps under the profiler: the union of the
    collectives' intervals (gloo's on CPU, start to completion; NCCL's kernels on CUDA). On CPU the
    autograd profiler without kineto records gloo's events and starts in milliseconds (kineto's first
    start takes about a second a process); on CUDA kineto records the kernels."""
    cuda = device.type == "cuda"
    x, y = data[0][0].to(device), data[0][1].to(device)
    if cuda:
        prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    else:
        prof = torch.autograd.profiler.profile(use_kineto=False)
    with _quiet_stderr(), prof:
        _sync(device)
        start = time.perf_counter()
        for _ in range(PROFILED_STEPS):
            trainer.step(x, batch, y, global_tokens)
        _sync(device)
        wall_s = time.perf_counter() - start
    events = prof.events() if cuda else prof.function_events
    spans = [(e.time_range.start, e.time_range.end) for e in events  # µs
             if (cuda and "nccl" in e.name.lower() and e.device_type == DeviceType.CUDA)
             or (not cuda and e.name.startswith("gloo:"))]  # fmt: skip
    covered, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            covered += b - max(a, end)
            end = b
    return covered / 1e6 / wall_s if wall_s > 0 else 0.0


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs each start and stop on file descriptor 2 (not settable from Python):
    send it to /dev/null meanwhile. Python's own errors are raised after it is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _recompute_rounds(ctx, spec: RunSpec, trainer: Trainer, group, x, y, batch, global_tokens) -> dict:
    """The run's recomputation against none, from the same weights: gradients bit for bit, activation
    bytes, and alternating timed rounds of forward + backward + gradient reduction."""
    plain_model = student(ctx, spec, "none", group)
    plain = Trainer(plain_model, spec.train["optimizer"], spec.train["lr"], group)
    grads = {}
    for name, t in (("plain", plain), ("recompute", trainer)):
        t.forward_backward(x, batch, y, global_tokens)
        t.model.reduce_grads()
        grads[name] = [p.grad.clone() for p in t.model.parameters()]
    # sync: each torch.equal reads its answer on the host (once, before any timing)
    equal = all(torch.equal(a, b) for a, b in zip(grads["plain"], grads["recompute"], strict=True))
    flag = torch.tensor([int(equal)], device=ctx.device)
    if group is not None:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    plain_bytes = _activations(plain, x, batch, y, global_tokens, ctx.device)["activation_bytes"]

    def run(t: Trainer):
        def fn():
            t.forward_backward(x, batch, y, global_tokens)
            t.model.reduce_grads()

        return fn

    timed = time_interleaved({"none": run(plain), "recompute": run(trainer)}, warmup=spec.scenario["warmup"],
                             repeats=spec.scenario["repeats"], device=ctx.device, group=group)  # fmt: skip
    for t in (plain, trainer):
        t.optimizer.zero_grad(set_to_none=True)
    return {"grads_equal": bool(flag.item()), "activation_bytes_none": plain_bytes,  # sync: a host flag
            "recompute_s": list(timed["recompute"].samples_s), "none_s": list(timed["none"].samples_s)}  # fmt: skip


def _baseline(spec: RunSpec, world: int, device) -> list[dict]:
    """The single-device run: the same student, all of every step's global batch, in this process."""
    cfg = spec.decoder_config()
    model = MoEDecoder(cfg, decoder_weights(cfg, spec.workload["seed"]), device=device,
                       recompute=spec.model["recompute"])  # fmt: skip
    trainer = Trainer(model, spec.train["optimizer"], spec.train["lr"])
    tokens = spec.workload["tokens_per_rank"] * world
    data = make_data(spec, world, slice(0, tokens), device)
    return _curve(trainer, data, _batch(spec, tokens, device), tokens, device)


def measure_train(ctx, spec: RunSpec, interval: float | None) -> dict:
    world = ctx.world_size
    group = ctx.group if world > 1 else None
    T = spec.workload["tokens_per_rank"]
    G = T * world
    data = make_data(spec, world, slice(ctx.rank * T, (ctx.rank + 1) * T), ctx.device)
    model = student(ctx, spec, spec.model["recompute"], group)
    trainer = Trainer(model, spec.train["optimizer"], spec.train["lr"], group)
    batch = _batch(spec, T, ctx.device)
    x0, y0 = data[0][0].to(ctx.device), data[0][1].to(ctx.device)
    out = {"memory": _activations(trainer, x0, batch, y0, G, ctx.device)}
    if spec.model["recompute"] != "none":
        out["recompute"] = _recompute_rounds(ctx, spec, trainer, group, x0, y0, batch, G)
    steps = spec.train["steps"]
    rebalancer = static = None
    if spec.eplb["interval"]:  # the same steps from the same start under the static placement, for eplb_speedup
        static = _static_pass(ctx, spec, group, data, batch, G)  # its student is freed when it returns
        rebalancer = Rebalancer(ctx, spec, model.moe_layers, group, eplb=True)
        rebalancer.rehearse()  # the first timed move pays no one-time costs (no optimizer state yet to move)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)  # after the static pass: this student's peak only
    progress(ctx, f"training {steps} steps", 0.0)
    with sampler(ctx, interval) as s:
        curve = _curve(trainer, data, batch, G, ctx.device, rebalancer)
    if rebalancer is not None:
        out["eplb"] = {"static": static, "eplb": rebalancer.record([c["step_time_s"] for c in curve])}
    if ctx.device.type == "cuda":
        out["memory"]["peak_memory_bytes"] = torch.cuda.max_memory_allocated(ctx.device)
    out["memory"] |= {
        "param_bytes": tensor_bytes(model.parameters()),
        "grad_bytes": tensor_bytes(p.grad for p in model.parameters() if p.grad is not None),
        "optimizer_bytes": optimizer_state_bytes(trainer.optimizer),
        "expert_param_bytes": tensor_bytes(model.expert_parameters()),
    }
    out |= {"curve": curve, "telemetry": s.summary(), "finite": all(map(_finite, curve))}
    if world > 1:  # one rank exchanges nothing: no collective to time (and the profiler's start-up saved)
        out["comm_time_share"] = _comm_share(trainer, data, batch, G, ctx.device)
        del data, model, trainer  # before the baseline's: it holds every expert and the whole batch
        try:
            out["baseline"] = _baseline(spec, world, ctx.device) if ctx.rank == 0 else None
        finally:  # even when rank 0's baseline fails: the others are released, and rank 0's error is raised
            dist.barrier(ctx.group)  # sync: the other ranks wait for rank 0's baseline before the run ends
    return out


def _static_pass(ctx, spec: RunSpec, group, data, batch: Batch, global_tokens: int) -> dict:
    """A fresh student trained on ``data`` under the static placement: its step times and balancedness."""
    model = student(ctx, spec, spec.model["recompute"], group)
    trainer = Trainer(model, spec.train["optimizer"], spec.train["lr"], group)
    rebalancer = Rebalancer(ctx, spec, model.moe_layers, group, eplb=False)
    curve = _curve(trainer, data, batch, global_tokens, ctx.device, rebalancer)
    return rebalancer.record([c["step_time_s"] for c in curve])


def _finite(record: dict) -> bool:
    return all(torch.isfinite(torch.tensor(record[k])).item() for k in ("loss", "grad_norm"))
