"""vLLM's fused MoE (its Triton ``fused_experts`` kernel and its routing functions) as
``[model] impl = "python:moebench.adapters.vllm:fused_moe"``: the weight mapping, the routing plan, what it
refuses, what it needs, and the module. Needs a CUDA device and vllm; vllm is imported only when a module is
built (``unavailable`` never imports it).

The mapping (vLLM's names: N = F, K = D; w1 holds gate and up fused, ``silu_and_mul`` takes
silu(first half) * second half):

    w1 (w13) [E, 2F, D]   = w_in_EDH.transpose(1, 2)     rows 0..F-1 gate, F..2F-1 up
    w2 [E, D, F]          = w_down_EFD.transpose(1, 2)
    router logits [T, E]  = x_TD (fp32) · router_EDᵀ      (our router runs in fp32; vLLM takes the logits)

The routing plan (``routing_plan``): the plain top-k softmax router, and Mixtral's top-k-before-softmax (equal
to the renormalised top-k softmax), go through ``fused_topk`` (renormalize = normalize_topk, or true for
Mixtral's order); any other variant through ``grouped_topk`` with num_expert_group/topk_group =
group_limited (absent: one group of all experts), scoring_func = scoring, renormalize = normalize_topk,
routed_scaling_factor = routed_scaling and e_score_correction_bias = score_bias_E (zeros when score_bias = 0:
without a bias tensor vLLM scores a group by its best expert, with one by the sum of its two best, which is
DeepSeek-V3's rule and ours). Refused (``refusal``): gelu (vLLM's "gelu" activation is gated), capacity
(the kernel is dropless), sequence routing, and a variant router with one expert.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch

from moebench.adapters.common import dropless_token_refusal, installed
from runtime import MoEConfig, MoEWeights


def unavailable(device: str) -> str:
    """Why the kernel cannot run on ``device`` on this host, or "" (never imports vllm)."""
    if device != "cuda":
        return "needs a CUDA device"
    if not installed("vllm"):
        return "needs vllm, which is not installed (pip install vllm)"
    return ""


def refusal(cfg: MoEConfig) -> str:
    """Why vLLM's fused MoE cannot express ``cfg``'s layer, or "" when it can."""
    if cfg.activation != "swiglu":
        return f'activation = "{cfg.activation}": accepted "swiglu" (vLLM\'s fused experts are gated: silu_and_mul)'
    why = dropless_token_refusal(cfg, "the fused kernel is")
    if why:
        return why
    if routing_plan(cfg).function == "grouped_topk" and cfg.num_experts < 2:
        return "num_experts = 1 with a router variant: accepted >= 2 (grouped_topk scores a group by its two best)"
    return ""


@dataclass(frozen=True)
class RoutingPlan:
    """Which vLLM routing function a layer uses and the keyword arguments it gets (besides the hidden states,
    the logits and, for grouped_topk, the bias tensor)."""

    function: str  # "fused_topk" or "grouped_topk"
    kwargs: dict


def routing_plan(cfg: MoEConfig) -> RoutingPlan:
    """The vLLM routing call that computes ``cfg``'s router (the module docstring's plan)."""
    renormalize = cfg.normalize_topk or cfg.topk_before_softmax
    if (cfg.plain_routing or cfg.topk_before_softmax) and cfg.routed_scaling == 1:
        return RoutingPlan("fused_topk", {"topk": cfg.top_k, "renormalize": renormalize})
    groups = cfg.group_limited or (1, 1)
    return RoutingPlan(
        "grouped_topk",
        {
            "topk": cfg.top_k,
            "renormalize": renormalize,
            "num_expert_group": groups[0],
            "topk_group": groups[1],
            "scoring_func": cfg.scoring,
            "routed_scaling_factor": float(cfg.routed_scaling),
        },
    )


def expert_weights(weights: MoEWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(w1 [E, 2F, D], w2 [E, D, F]), contiguous, in vLLM's layout (the module docstring's mapping)."""
    return weights.w_in_EDH.transpose(1, 2).contiguous(), weights.w_down_EFD.transpose(1, 2).contiguous()


def choice_bias(weights: MoEWeights, cfg: MoEConfig) -> torch.Tensor:
    """e_score_correction_bias [E] (fp32): score_bias_E, or zeros (grouped_topk then scores groups as ours)."""
    if cfg.score_bias > 0 and weights.score_bias_E is not None:
        return weights.score_bias_E.float().clone()
    return torch.zeros(cfg.num_experts)


def _api():
    """(fused_experts, fused_topk, grouped_topk) from the installed vllm: the routing functions moved from
    fused_moe/fused_moe.py to fused_moe/router/ in 2025; both places are tried. A release whose grouped_topk
    lacks scoring_func and e_score_correction_bias (before DeepSeek-V3 support) fails on a variant router."""
    package = "vllm.model_executor.layers.fused_moe"
    fused = importlib.import_module(package)
    found = []
    for name, places in (
        ("fused_topk", (f"{package}.router.fused_topk_router", f"{package}.fused_moe", package)),
        ("grouped_topk", (f"{package}.router.grouped_topk_router", f"{package}.fused_moe")),
    ):
        for place in places:
            try:
                function = getattr(importlib.import_module(place), name, None)
            except ImportError:
                function = None
            if function is not None:
                found.append(function)
                break
        else:
            raise ImportError(f"vllm {getattr(importlib.import_module('vllm'), '__version__', '?')} has no {name}")
    return fused.fused_experts, *found


def _takes(function, name: str) -> bool:
    """Whether ``function`` has a parameter ``name`` (True when its signature cannot be read)."""
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return True


class VllmFusedMoE(torch.nn.Module):
    """vLLM's fused MoE behind the contract: [T, D] in (any device), [T, D] out on the input's device."""

    def __init__(self, weights: MoEWeights, cfg: MoEConfig, device: torch.device):
        super().__init__()
        self.fused_experts, self.fused_topk, self.grouped_topk = _api()
        self.plan, self.dtype = routing_plan(cfg), cfg.torch_dtype
        w1, w2 = expert_weights(weights)
        self.register_buffer("router_ED", weights.router_ED.float().to(device))
        self.register_buffer("w1", w1.to(device, self.dtype))
        self.register_buffer("w2", w2.to(device, self.dtype))
        self.register_buffer("bias_E", choice_bias(weights, cfg).to(device))
        # older grouped_topk (before routed_scaling_factor moved into it): the scaling is applied here
        kwargs, self.scale_after = dict(self.plan.kwargs), 1.0
        if self.plan.function == "grouped_topk" and not _takes(self.grouped_topk, "routed_scaling_factor"):
            self.scale_after = kwargs.pop("routed_scaling_factor")
        self.kwargs = kwargs

    def _route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x in the experts' dtype, weights [T, K], ids [T, K]): the logits in fp32 from the input as given."""
        x = x_TD.to(self.w1.device)
        logits_TE = x.float() @ self.router_ED.T
        x = x.to(self.dtype).contiguous()
        if self.plan.function == "fused_topk":
            weights_TK, ids_TK = self.fused_topk(x, logits_TE, **self.kwargs)[:2]  # (+ token_expert_indices)
            return x, weights_TK, ids_TK
        weights_TK, ids_TK = self.grouped_topk(x, logits_TE, e_score_correction_bias=self.bias_E, **self.kwargs)
        return x, weights_TK * self.scale_after, ids_TK

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x, weights_TK, ids_TK = self._route(x_TD)
        return self.fused_experts(x, self.w1, self.w2, weights_TK, ids_TK).to(x_TD.device)

    def route(self, x_TD: torch.Tensor) -> torch.Tensor:
        """vLLM's chosen expert ids [T, K]."""
        return self._route(x_TD)[2]


def fused_moe(weights: list[MoEWeights], cfg: MoEConfig) -> VllmFusedMoE:
    """The contract's factory: vLLM's fused MoE on the one layer's weights, on the current CUDA device."""
    return VllmFusedMoE(weights[0], cfg, torch.device("cuda"))


fused_moe.unavailable = unavailable
fused_moe.refusal = refusal
