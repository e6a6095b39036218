"""What a scenario feeds the runtime: seeded weights, router skew, tokens, and a stack of layers.

Shape legend: T = tokens on this rank, D = hidden, E = experts.

Skew is a fixed offset ``b_E`` added to the router logits (``Router.bias_E``), so the whole router
still runs and every token still gets its own routing. The router's logits have unit variance
(``init_weights``), so offsets are in units of the logits' standard deviation:

- ``uniform``: b = 0.
- ``zipf`` (param s, default 1.0): b_e = −s · ln(rank_e), with rank_e = 1..E over a seeded
  permutation: expert popularity is tilted like a Zipf law of exponent s (before the softmax's
  own spread; the measured counts are what the load-balance metrics report).
- ``hot`` (param h, default 3.0): one seeded expert gets +h, the others 0.
- ``single``: one seeded expert gets +30, which no unit-variance logit gap overcomes: every
  token's first choice is that expert. Its param is ignored.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from runtime import MoEConfig, MoELayer, MoEWeights, ParallelConfig, init_weights
from runtime.experts import expert_ffn

SKEWS = ("uniform", "zipf", "hot", "single")
DEFAULT_SKEW_PARAM = {"uniform": 0.0, "zipf": 1.0, "hot": 3.0, "single": 0.0}
SINGLE_EXPERT_OFFSET = 30.0


def _generator(seed: int, stream: int) -> torch.Generator:
    """A generator for one independent random stream of a seeded workload."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def skew_bias(skew: str, param: float | None, num_experts: int, gen: torch.Generator) -> torch.Tensor:
    """The router logit offset ``b_E`` (fp32) that produces ``skew``; see the module docstring."""
    if skew not in SKEWS:
        raise ValueError(f"skew = {skew!r} is invalid: accepted one of {', '.join(SKEWS)}")
    param = DEFAULT_SKEW_PARAM[skew] if param is None else float(param)
    if not math.isfinite(param) or param < 0:
        raise ValueError(f"skew_param = {param!r} is invalid: accepted a finite number >= 0")
    order_E = torch.randperm(num_experts, generator=gen)
    bias_E = torch.zeros(num_experts)
    if skew == "zipf":
        bias_E[order_E] = -param * torch.log(torch.arange(1, num_experts + 1, dtype=torch.float32))
    elif skew == "hot":
        bias_E[order_E[0]] = param
    elif skew == "single":
        bias_E[order_E[0]] = SINGLE_EXPERT_OFFSET
    return bias_E


def layer_weights(moe: MoEConfig, layers: int, seed: int, skew: str, skew_param: float | None) -> list[MoEWeights]:
    """Seeded global weights for each layer of a stack, each with its own skew offset."""
    out = []
    for layer in range(layers):
        w = init_weights(moe, seed=seed * 1_000_003 + layer)
        bias_E = skew_bias(skew, skew_param, moe.num_experts, _generator(seed, 10_000 + layer))
        out.append(MoEWeights(w.router_ED, w.w_in_EDH, w.w_down_EFD, bias_E))
    return out


def tokens(num_tokens: int, hidden: int, seed: int, stream: int) -> torch.Tensor:
    """Random unit-variance tokens [num_tokens, hidden] (never zeros) for one rank and batch."""
    return torch.randn(num_tokens, hidden, generator=_generator(seed, stream))


class MoEStack(nn.Module):
    """A residual stack of MoE layers, one rank's part: x ← x + moe_l(x) for each layer l."""

    def __init__(
        self, moe: MoEConfig, par: ParallelConfig, weights: list[MoEWeights], group, device, dispatcher="auto"
    ):
        super().__init__()
        group = group if par.ep_size > 1 or dispatcher == "all_to_all" else None
        self.layers = nn.ModuleList(
            MoELayer(moe, par, group=group, device=device, dispatcher=dispatcher) for _ in weights
        )
        for layer, w in zip(self.layers, weights, strict=True):
            layer.load_global_weights(w)

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Returns the stack's output and each layer's ``MoEOutput``."""
        outputs = []
        for layer in self.layers:
            result = layer(x_TD)
            x_TD = x_TD + result.out_TD
            outputs.append(result)
        return x_TD, outputs

    def reduce_replicated_grads(self) -> None:
        for layer in self.layers:
            layer.reduce_replicated_grads()


class DenseStack(nn.Module):
    """The dense counterpart of an ``MoEStack``: per layer one FFN of width top_k · ffn_hidden.

    Over T tokens it does the GEMM FLOPs of the MoE layer's experts when no copy is dropped
    (T · top_k rows through an FFN of width ffn_hidden), with the same activation and dtype, and
    none of the routing, permutation or all-to-all. ``step time / dense time`` is the within-run
    ratio ``moe_over_dense``.
    """

    def __init__(self, moe: MoEConfig, layers: int, seed: int, device):
        super().__init__()
        self.activation = moe.activation
        width = moe.top_k * moe.ffn_hidden_size
        width_in = 2 * width if moe.activation == "swiglu" else width
        gen = _generator(seed, 20_000)
        d = moe.hidden_size
        self.w_in = nn.ParameterList(
            torch.randn(1, d, width_in, generator=gen).div_(math.sqrt(d)).to(device, moe.torch_dtype)
            for _ in range(layers)
        )
        self.w_down = nn.ParameterList(
            torch.randn(1, width, d, generator=gen).div_(math.sqrt(width)).to(device, moe.torch_dtype)
            for _ in range(layers)
        )

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for w_in, w_down in zip(self.w_in, self.w_down, strict=True):
            x_TD = x_TD + expert_ffn(x_TD, w_in, w_down, [x_TD.shape[0]], self.activation, "loop")
        return x_TD
