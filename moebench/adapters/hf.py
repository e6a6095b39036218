"""Hugging Face transformers' MoE blocks as ``[model] impl = "hf:<family>"``: each built from a tiny config
made here (no hub download) and filled from our global weights.

The name mapping (one expert e; our w_in for swiglu is [gate | up] along H, transformers 5 fuses the
experts into 3-D parameters stored [out, in]):

    gate.weight [E, D]                 = router_ED
    experts.gate_up_proj [E, 2F, D]    = w_in_EDH.transpose(1, 2)   (rows 0..F-1 gate, F..2F-1 up)
    experts.down_proj [E, D, F]        = w_down_EFD.transpose(1, 2)
    gate.e_score_correction_bias [E]   = score_bias_E (deepseek_v3; zero when score_bias = 0)
    shared expert(s)                   = zero down projection (and zero gate): the block's output is the routed
                                         experts' (the global weights hold no shared expert)

Routing each family expresses (``refusal`` names what it cannot): mixtral renormalises the top-k softmax
(= topk_before_softmax, or normalize_topk); qwen2_moe, qwen3_moe and olmoe take a softmax router with
norm_topk_prob = normalize_topk; deepseek_v3 takes the sigmoid router with group_limited (n_group, topk_group),
score_bias (e_score_correction_bias) and routed_scaling. All families are swiglu, dropless, token-routed and
have no router bias. transformers is imported only inside ``build``.
"""

from __future__ import annotations

import torch

from moebench.adapters.common import dropless_token_refusal
from runtime import MoEConfig, MoEWeights

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def refusal(family: str, cfg: MoEConfig) -> str:
    """Why ``family``'s block cannot express ``cfg``'s layer, or "" when it can (no transformers needed)."""
    if cfg.activation != "swiglu":
        return f'activation = "{cfg.activation}": accepted "swiglu" (every family\'s experts are SwiGLU)'
    why = dropless_token_refusal(cfg, "the blocks are")
    if why:
        return why
    if family == "deepseek_v3":
        if cfg.scoring != "sigmoid" or cfg.topk_before_softmax:
            return 'scoring = "softmax": accepted scoring = "sigmoid" (DeepSeek-V3\'s router)'
        if cfg.group_limited is None and cfg.num_experts < 2:
            return "num_experts = 1: accepted >= 2 (groups score their two best experts)"
        return ""
    if not cfg.plain_routing and not (cfg.topk_before_softmax and cfg.routed_scaling == 1):
        return (
            "a router variant (scoring, group_limited, score_bias, routed_scaling) is set: accepted the top-k "
            f"softmax router for {family} (sigmoid, groups, score bias and scaling: hf:deepseek_v3)"
        )
    if family == "mixtral" and not (cfg.topk_before_softmax or cfg.normalize_topk) and cfg.top_k > 1:
        return "normalize_topk = false: accepted topk_before_softmax or normalize_topk = true (Mixtral renormalises)"
    return ""


def _config(family: str, cfg: MoEConfig):
    """The family's config with our shape and routing (attention fields irrelevant: the block only)."""
    import transformers

    d, f, e, k = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts, cfg.top_k
    norm = cfg.normalize_topk or cfg.topk_before_softmax
    if family == "mixtral":
        return transformers.MixtralConfig(
            hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k
        )
    if family == "deepseek_v3":
        groups = cfg.group_limited or (1, 1)
        return transformers.DeepseekV3Config(
            hidden_size=d,
            moe_intermediate_size=f,
            n_routed_experts=e,
            num_experts_per_tok=k,
            n_shared_experts=1,
            n_group=groups[0],
            topk_group=groups[1],
            norm_topk_prob=cfg.normalize_topk,
            routed_scaling_factor=float(cfg.routed_scaling),
        )
    config_class = {
        "qwen2_moe": transformers.Qwen2MoeConfig,
        "qwen3_moe": transformers.Qwen3MoeConfig,
        "olmoe": transformers.OlmoeConfig,
    }[family]
    extra = {"shared_expert_intermediate_size": f} if family == "qwen2_moe" else {}
    return config_class(
        hidden_size=d, moe_intermediate_size=f, intermediate_size=f, num_experts=e, num_experts_per_tok=k,
        norm_topk_prob=norm, **extra,
    )  # fmt: skip


def _block_class(family: str):
    from transformers.models.deepseek_v3 import modeling_deepseek_v3
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.olmoe import modeling_olmoe
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    return {
        "mixtral": modeling_mixtral.MixtralSparseMoeBlock,
        "qwen2_moe": modeling_qwen2_moe.Qwen2MoeSparseMoeBlock,
        "qwen3_moe": modeling_qwen3_moe.Qwen3MoeSparseMoeBlock,
        "olmoe": modeling_olmoe.OlmoeSparseMoeBlock,
        "deepseek_v3": modeling_deepseek_v3.DeepseekV3MoE,
    }[family]


class HFBlock(torch.nn.Module):
    """A family's MoE block behind the contract: [T, D] in, [T, D] out (the blocks take [B, S, D])."""

    def __init__(self, block: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.block = block.to(dtype)
        self.dtype = dtype

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.block(x_TD.to(self.dtype)[None])[0]

    def route(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The block's own router's choice [T, K]: its ``gate`` returns (logits, weights, top-k ids)."""
        return self.block.gate(x_TD.to(self.dtype))[2]


@torch.no_grad()
def build(family: str, weights: MoEWeights, cfg: MoEConfig) -> HFBlock:
    """``family``'s block with our weights through the module docstring's mapping, in eval mode."""
    config = _config(family, cfg)
    config._experts_implementation = "eager"  # the experts loop written in the family's file
    block = _block_class(family)(config).eval()
    block.gate.weight.copy_(weights.router_ED)
    block.experts.gate_up_proj.copy_(weights.w_in_EDH.transpose(1, 2))
    block.experts.down_proj.copy_(weights.w_down_EFD.transpose(1, 2))
    if family == "deepseek_v3":
        bias = weights.score_bias_E if cfg.score_bias > 0 and weights.score_bias_E is not None else None
        block.gate.e_score_correction_bias.copy_(torch.zeros(cfg.num_experts) if bias is None else bias)
        block.shared_experts.down_proj.weight.zero_()
    if family == "qwen2_moe":
        block.shared_expert.down_proj.weight.zero_()
        block.shared_expert_gate.weight.zero_()
    return HFBlock(block, cfg.torch_dtype)
