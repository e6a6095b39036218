"""MegaBlocks' dropless MoE (``megablocks.layers.dmoe.dMoE`` with its grouped-GEMM experts) as
``[model] impl = "python:moebench.adapters.megablocks:dmoe"``: the weight mapping, the ``Arguments`` it is built
with, what it refuses, what it needs, and the module. Needs a CUDA device, megablocks and grouped_gemm;
megablocks is imported only when a module is built (``unavailable`` never imports it).

Read from MegaBlocks' source (databricks/megablocks ``layers/router.py``, ``glu.py``, ``mlp.py``,
``arguments.py``, ``dmoe.py``), not yet run in this project: its router is a bias-free
``Linear(D, E)`` whose softmax scores are top-k'd, then, with ``moe_normalize_expert_weights = p``, divided by
their p-norm (p = 1: renormalised, the weights being positive); each expert's weights are rows
e·F..(e+1)·F−1 of [E·F, D] matrices: GLU computes (act(x·w1ᵀ) ⊙ x·v1ᵀ)·w2, the MLP act(x·w1ᵀ)·w2.

    router.layer.weight [E, D]   = router_ED
    experts.mlp.w1 [E·F, D]      = w_in_EDH[..., :F].transpose(1, 2).reshape(E·F, D)   (gate; gelu: all of w_in)
    experts.mlp.v1 [E·F, D]      = w_in_EDH[..., F:].transpose(1, 2).reshape(E·F, D)   (up; swiglu only)
    experts.mlp.w2 [E·F, D]      = w_down_EFD.reshape(E·F, D)

``Arguments`` (``moe_arguments``): mlp_type "glu" with activation silu (swiglu) or "mlp" with the exact gelu
(MegaBlocks' default activation is the tanh approximation), mlp_impl "grouped", bias and return_bias off,
moe_normalize_expert_weights = 1 when normalize_topk (or Mixtral's order) else None, bf16 (its default is fp16).
Refused (``refusal``): any router variant but Mixtral's order (no sigmoid, groups, score bias or scaling in its
router), capacity (dMoE is dropless), sequence routing, and a dtype other than bfloat16 (grouped_gemm's kernels
check for bfloat16). Its router runs in the module's bfloat16, ours in fp32: a near-tie can route differently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moebench.adapters.common import dropless_token_refusal, installed
from runtime import MoEConfig, MoEWeights


def unavailable(device: str) -> str:
    """Why dMoE cannot run on ``device`` on this host, or "" (never imports megablocks)."""
    if device != "cuda":
        return "needs a CUDA device"
    missing = [name for name in ("megablocks", "grouped_gemm") if not installed(name)]
    if missing:
        return f"needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed"
    return ""


def refusal(cfg: MoEConfig) -> str:
    """Why MegaBlocks' dMoE cannot express ``cfg``'s layer, or "" when it can."""
    if not (cfg.plain_routing or (cfg.topk_before_softmax and cfg.routed_scaling == 1)):
        return (
            "a router variant (scoring, group_limited, score_bias, routed_scaling) is set: accepted the top-k softmax "
            "router (MegaBlocks' LearnedRouter)"
        )
    why = dropless_token_refusal(cfg, "dMoE is")
    if why:
        return why
    if cfg.dtype != "bfloat16":
        return f'dtype = "{cfg.dtype}": accepted "bfloat16" (grouped_gemm\'s kernels take bfloat16 only)'
    return ""


def moe_arguments(cfg: MoEConfig) -> dict:
    """The keyword arguments of ``megablocks.layers.arguments.Arguments`` for ``cfg`` (without ``device``)."""
    swiglu = cfg.activation == "swiglu"
    return {
        "hidden_size": cfg.hidden_size,
        "ffn_hidden_size": cfg.ffn_hidden_size,
        "moe_num_experts": cfg.num_experts,
        "moe_top_k": cfg.top_k,
        "moe_normalize_expert_weights": 1 if (cfg.normalize_topk or cfg.topk_before_softmax) else None,
        "mlp_type": "glu" if swiglu else "mlp",
        "mlp_impl": "grouped",
        "activation_fn": F.silu if swiglu else F.gelu,
        "bias": False,
        "return_bias": False,
        "fp16": False,
        "bf16": True,
    }


def expert_weights(weights: MoEWeights, cfg: MoEConfig) -> dict[str, torch.Tensor]:
    """The experts' parameters in MegaBlocks' [E·F, D] layout: w1, v1 (swiglu only) and w2."""
    e, f, d = cfg.num_experts, cfg.ffn_hidden_size, cfg.hidden_size
    rows = lambda w_EDF: w_EDF.transpose(1, 2).reshape(e * f, d)  # noqa: E731  expert e: rows e·F..(e+1)·F−1
    out = {"w1": rows(weights.w_in_EDH[..., :f])}
    if cfg.activation == "swiglu":
        out["v1"] = rows(weights.w_in_EDH[..., f:])
    out["w2"] = weights.w_down_EFD.reshape(e * f, d)
    return out


class MegaBlocksMoE(torch.nn.Module):
    """MegaBlocks' dMoE behind the contract: [T, D] in (any device), [T, D] out on the input's device."""

    def __init__(self, weights: MoEWeights, cfg: MoEConfig, device: torch.device):
        super().__init__()
        from megablocks.layers import arguments, dmoe
        from megablocks.layers import moe as mb_moe

        self.clear_losses = getattr(mb_moe, "clear_load_balancing_loss", lambda: None)
        self.moe = dmoe.dMoE(arguments.Arguments(**moe_arguments(cfg), device=device)).eval()
        mlp = getattr(self.moe, "experts", self.moe).mlp  # dMoE.experts.mlp (older releases: dMoE.mlp)
        with torch.no_grad():
            self.moe.router.layer.weight.copy_(weights.router_ED)
            for name, tensor in expert_weights(weights, cfg).items():
                getattr(mlp, name).copy_(tensor)
        self.device, self.dtype = device, cfg.torch_dtype

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out = self.moe(x_TD.to(self.device, self.dtype)[:, None, :])  # dMoE takes [sl, bs, hs]
        self.clear_losses()  # releases what older releases save for the load-balancing loss even in eval mode
        out = out[0] if isinstance(out, tuple) else out
        return out.reshape(x_TD.shape).to(x_TD.device)

    def route(self, x_TD: torch.Tensor) -> torch.Tensor:
        """MegaBlocks' router's chosen expert ids [T, K] (its last output)."""
        ids = self.moe.router(x_TD.to(self.device, self.dtype))[-1]
        return ids.reshape(x_TD.shape[0], -1)


def dmoe(weights: list[MoEWeights], cfg: MoEConfig) -> MegaBlocksMoE:
    """The contract's factory: MegaBlocks' dMoE on the one layer's weights, on the current CUDA device."""
    return MegaBlocksMoE(weights[0], cfg, torch.device("cuda"))


dmoe.unavailable = unavailable
dmoe.refusal = refusal
