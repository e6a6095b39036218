"""Multi-step training of the decoder (runtime/model.py), one rank's part.

Shape legend: T = this rank's tokens, G = the global batch's tokens (over every rank), D = hidden, V = vocab.

The objective is the mean loss over the global batch. Each rank computes its *share*: the sum of its
tokens' losses over G (and, for the MSE, over D), plus each MoE block's router-loss share (the layer's
load-balancing and z losses are already shares of the group's batch). The shares sum to the global
objective, so gradients sum too: ``MoEDecoder.reduce_grads`` sums the replicated parameters over the EP
group (the routed experts' gradients are complete on their owner), or everything over the data-parallel
group. A run at any world size then takes the steps a single device would take on the same global batch,
up to the order of floating-point sums.

Pure EP (the EP group is every rank) or pure data parallelism (ep_size = 1, a ``dp_group``); a mixed
layout would also need the experts' gradients summed over their expert-data-parallel group.

DeepSeek-V3's online bias update (``MoEConfig.score_bias_update`` > 0; runtime/router.py ``score_bias_step``):
after each optimizer step every MoE block's router moves its choice bias from that step's global per-expert
loads (``StepRecord.loads_LE``). The loads are global on every rank (EP: the layer's exchanged counts; data
parallelism: summed in the step's statistics all-reduce), so every rank makes the same update and the bias,
a buffer outside the optimizer, stays identical on every rank with no collective of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from runtime.model import Batch, MoEDecoder

OPTIMIZERS = ("adamw", "adam", "sgd")
LOSSES = ("mse", "cross_entropy")


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW (weight decay 0.01, its default), Adam, or plain SGD (no momentum: no state)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer = {name!r} is invalid: accepted one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step, over the whole group: the global batch's mean loss (before the step), the
    router losses summed over MoE blocks, the gradient's global L2 norm, the token copies dropped."""

    loss: float
    aux_loss: float
    z_loss: float
    grad_norm: float
    tokens_dropped: int
    loads_LE: tuple = ()  # per MoE block, copies routed to each expert over the group's global batch (host)
    received_LW: tuple = ()  # per MoE block, copies each rank's experts received (host; EP only)


class Trainer:
    """Steps a ``MoEDecoder`` with an optimizer. ``group``: the ranks that each hold a slice of the global
    batch (the EP group, or the data-parallel group; None: one rank holds all of it)."""

    def __init__(self, model: MoEDecoder, optimizer: str, lr: float, group=None):
        if model.ep_group is not None and model.ep_group is not group:
            raise ValueError("Trainer group must be the model's EP group under expert parallelism (pure EP)")
        if model.dp_group is not None and model.dp_group is not group:
            raise ValueError("Trainer group must be the model's dp_group under data parallelism (pure DP)")
        self.model, self.group = model, group
        self.optimizer = make_optimizer(optimizer, model.parameters(), lr)
        self.loss_kind = "cross_entropy" if model.cfg.vocab else "mse"

    def loss_share(self, h_TD: torch.Tensor, targets: torch.Tensor, global_tokens: int) -> torch.Tensor:
        """This rank's share of the global mean loss: MSE against target states [T, D], or next-token
        cross-entropy against target ids [T] (vocab > 0). Computed in fp32."""
        if self.loss_kind == "mse":
            return (h_TD.float() - targets.float()).square().sum() / (global_tokens * h_TD.shape[-1])
        logits_TV = self.model.logits(h_TD).float()
        return F.cross_entropy(logits_TV, targets, reduction="sum") / global_tokens

    def forward_backward(self, inputs: torch.Tensor, batch: Batch, targets: torch.Tensor, global_tokens: int):
        """Gradients of this rank's share (not yet reduced); the share's parts for the step record."""
        self.optimizer.zero_grad(set_to_none=True)
        h_TD, routed = self.model(inputs, batch)
        loss = self.loss_share(h_TD, targets, global_tokens)
        router = sum((r.router_loss for r in routed), torch.zeros((), device=h_TD.device))
        (loss + router).backward()
        return loss, routed

    def step(self, inputs: torch.Tensor, batch: Batch, targets: torch.Tensor, global_tokens: int) -> StepRecord:
        """Forward, backward, the gradient reduction, one optimizer step, then the routers' bias update
        (``score_bias_update``). One small all-reduce of the step's statistics (under data parallelism with
        each rank's per-expert loads), read on the host (sync: once per step)."""
        model = self.model
        loss, routed = self.forward_backward(inputs, batch, targets, global_tokens)
        model.reduce_grads()
        dev = loss.device
        sharded = model.expert_parameters() if model.ep_group is not None else []  # distinct on every rank
        replicated = model.replicated_parameters() if model.ep_group is not None else list(model.parameters())
        blocks = [b for b in model.blocks if b.moe is not None]
        dropped = sum(int((r.counts_WE - r.kept_WE)[b.moe.rank].sum()) for r, b in zip(routed, blocks, strict=True))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        stats = torch.stack([
            loss.detach().double(),
            sum((r.aux_loss.detach().double() for r in routed), zero),
            sum((r.z_loss.detach().double() for r in routed), zero),
            torch.tensor(float(dropped), dtype=torch.float64, device=dev),  # counts_WE is on the host already
            model.expert_grad_square_sum(zero) if sharded else zero,
        ])  # fmt: skip
        loads_LE = torch.stack([r.counts_WE.sum(0) for r in routed]) if routed else torch.zeros(0, 0)  # host
        if model.dp_group is not None:  # each rank routed its own slice: the global loads ride the same all-reduce
            stats = torch.cat([stats, loads_LE.to(dev, torch.float64).reshape(-1)])
        if self.group is not None:
            dist.all_reduce(stats, group=self.group)
        local = _square_sum(replicated, zero)  # equal on every rank after the reduction
        values = torch.cat([stats, local[None]]).tolist()  # sync: host numbers
        total, aux, z, drops, sharded_sq = values[:5]
        if model.dp_group is not None:  # counts below 2**53 are exact in fp64
            loads_LE = torch.tensor([round(v) for v in values[5:-1]], dtype=torch.long).reshape(loads_LE.shape)
        self.optimizer.step()
        for layer, loads_E in zip(model.moe_layers, loads_LE, strict=True):  # the same global loads on every rank
            layer.router.update_score_bias(loads_E)
        loads = tuple(tuple(row) for row in loads_LE.tolist())  # host counts: no sync
        received = tuple(tuple(r.received_W.tolist()) for r in routed)
        return StepRecord(total, aux, z, (sharded_sq + values[-1]) ** 0.5, round(drops), loads, received)


def _square_sum(params, zero: torch.Tensor) -> torch.Tensor:
    """Σ grad² over ``params`` in fp64 (0 without gradients)."""
    return sum((p.grad.detach().double().square().sum() for p in params if p.grad is not None), zero)


__all__ = ["LOSSES", "OPTIMIZERS", "StepRecord", "Trainer", "make_optimizer"]
