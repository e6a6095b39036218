"""The global weights of one MoE layer: what every rank slices its experts from, and what the
fp64 reference computes with.

Shape legend: E = experts, D = hidden, F = FFN hidden, H = F (gelu) or 2F (swiglu).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import MoEConfig


@dataclass(frozen=True)
class MoEWeights:
    router_ED: torch.Tensor  # gate: logits = x · router_EDᵀ
    w_in_EDH: torch.Tensor  # per-expert input projection (swiglu: [gate | up] along H)
    w_down_EFD: torch.Tensor  # per-expert output projection
    router_bias_E: torch.Tensor | None = None  # fixed logit offset (routing skew); None = zero
    score_bias_E: torch.Tensor | None = None  # choice-only score bias (MoEConfig.score_bias); None = zero


def init_weights(cfg: MoEConfig, seed: int = 0) -> MoEWeights:
    """Seeded fp32 weights on the CPU with unit-variance activations (std 1/√fan_in); with
    ``cfg.score_bias`` > 0 the choice bias score_bias · N(0, 1), drawn last (the other tensors do not change)."""
    gen = torch.Generator().manual_seed(seed)
    d, f, e = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    h = 2 * f if cfg.activation == "swiglu" else f
    router_ED = torch.randn(e, d, generator=gen) / d**0.5  # unit-variance logits
    w_in_EDH = torch.randn(e, d, h, generator=gen) / d**0.5
    w_down_EFD = torch.randn(e, f, d, generator=gen) / f**0.5
    bias_E = cfg.score_bias * torch.randn(e, generator=gen) if cfg.score_bias > 0 else None
    return MoEWeights(router_ED, w_in_EDH, w_down_EFD, score_bias_E=bias_E)
