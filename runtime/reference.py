"""The ground truth: a single-process fp64 MoE layer, written without the fast path's code.

It loops over tokens and their chosen experts one at a time with plain fp64 tensor arithmetic
(differentiable, so gradients can be compared too). It shares only the weights dataclass and the
config with the fast path; routing, capacity, the FFNs and the losses are written out again here.

Every comparison against it uses one error metric, ``rel_error``: ‖x − ref‖₂ / ‖ref‖₂ in fp64.

Policy, identical to ``runtime/router.py``: capacity C = ceil(cf · N · K / E) over all N tokens
given; copies are served in token order and the first C per expert are kept; a dropped copy
contributes nothing and the other copies keep their weights; top-k ties go to the lower id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from runtime.config import MoEConfig
from runtime.weights import MoEWeights


@dataclass(frozen=True)
class ReferenceOutput:
    out_ND: torch.Tensor  # fp64 layer output for every token
    aux_loss: torch.Tensor  # E · Σ_e f_e · P_e over all tokens
    z_loss: torch.Tensor  # mean over tokens of logsumexp(logits)²
    counts_E: list[int]  # copies routed to each expert, before dropping
    kept_E: list[int]  # copies each expert processed
    dropped: list[tuple[int, int]]  # (token, expert) copies dropped by capacity


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖₂ / ‖ref‖₂ in fp64. An all-zero ``ref`` gives ‖x‖ (the absolute error: 0 when x is
    zero too); a NaN or inf in either gives inf, so no tolerance passes it."""
    x, ref = x.detach().double(), ref.detach().double()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return float("inf")
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _silu(x):
    return x / (1.0 + torch.exp(-x))


def _expert(x_D, w_in_DH, w_down_FD, activation: str):
    h_H = x_D @ w_in_DH
    if activation == "swiglu":
        f = w_down_FD.shape[0]
        a_F = _silu(h_H[:f]) * h_H[f:]
    else:
        a_F = _gelu(h_H)
    return a_F @ w_down_FD


def reference_moe(x_ND: torch.Tensor, weights: MoEWeights, cfg: MoEConfig) -> ReferenceOutput:
    """Run the layer on N tokens in fp64. Inputs may require grad; outputs are differentiable."""
    x = x_ND.double()
    router = weights.router_ED.double()
    bias = x.new_zeros(cfg.num_experts) if weights.router_bias_E is None else weights.router_bias_E.double()
    w_in, w_down = weights.w_in_EDH.double(), weights.w_down_EFD.double()
    n, e_count, k = x.shape[0], cfg.num_experts, cfg.top_k
    capacity = None if cfg.capacity_factor == 0 else math.ceil(cfg.capacity_factor * n * k / e_count)

    used = [0] * e_count
    counts = [0] * e_count
    dropped = []
    rows, prob_sum, z_sum = [], torch.zeros(e_count, dtype=torch.float64), x.new_zeros(())
    for t in range(n):
        logits = router @ x[t] + bias
        shifted = logits - logits.max()
        probs = torch.exp(shifted) / torch.exp(shifted).sum()
        prob_sum = prob_sum + probs
        z_sum = z_sum + (logits.max() + torch.log(torch.exp(shifted).sum())) ** 2
        values = probs.detach().tolist()
        chosen = sorted(range(e_count), key=lambda e: (-values[e], e))[:k]
        gate = [probs[e] for e in chosen]
        if cfg.normalize_topk:
            total = sum(gate)
            gate = [g / total for g in gate]
        out = x.new_zeros(x.shape[1])
        for e, g in zip(chosen, gate, strict=True):
            counts[e] += 1
            if capacity is not None and used[e] >= capacity:
                dropped.append((t, e))
                continue
            used[e] += 1
            out = out + g * _expert(x[t], w_in[e], w_down[e], cfg.activation)
        rows.append(out)

    out_ND = torch.stack(rows) if rows else x.new_zeros(0, x.shape[1])
    denom = max(n, 1)
    f_E = torch.tensor(counts, dtype=torch.float64) / (denom * k)
    aux = e_count * torch.sum(f_E * prob_sum / denom)
    return ReferenceOutput(out_ND, aux, z_sum / denom, counts, used, dropped)
