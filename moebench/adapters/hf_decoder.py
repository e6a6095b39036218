"""Hugging Face transformers' decoder MODELS (``MixtralModel``, ``Qwen2MoeModel``, ``Qwen3MoeModel``,
``OlmoeModel``) built from our ``runtime.DecoderConfig`` and filled from our ``runtime.DecoderWeights``, so the
same sequence can go through theirs, our ``MoEDecoder`` and the fp64 ``reference_decoder``.

Each model is built from a config made here (no hub download): L layers, H query heads on G KV heads, head_dim,
rope_parameters {"rope_type": "default", "rope_theta"} (rotate-half RoPE, as ours), rms_norm_eps = norm_eps,
eager attention, transformers' eager experts loop, no sliding window. It is fed ``inputs_embeds`` [1, N, D] and
its ``last_hidden_state`` (after the final norm) is what ``MoEDecoder.full`` returns. The name mapping, layer l
(nn.Linear stores [out, in]: each is our [in, out] tensor transposed):

    layers.l.input_layernorm.weight              = attn_norm_D
    layers.l.self_attn.{q,k,v}_proj.weight       = w{q,k,v}_D*ᵀ       (q,k,v biases zero: qwen2_moe has them)
    layers.l.self_attn.o_proj.weight             = wo_QDᵀ
    layers.l.self_attn.{q,k}_norm.weight         = q_norm, k_norm     (qwen3_moe: "head"; olmoe: "full")
    layers.l.post_attention_layernorm.weight     = ffn_norm_D
    layers.l.mlp.gate.weight                     = moe.router_ED
    layers.l.mlp.experts.gate_up_proj            = moe.w_in_EDH.transpose(1, 2)   [E, 2F, D]: gate rows, then up
    layers.l.mlp.experts.down_proj               = moe.w_down_EFD.transpose(1, 2) [E, D, F]
    layers.l.mlp.shared_expert.{gate,up}_proj    = shared.w_in_DH[:, :nF]ᵀ, [:, nF:]ᵀ   (qwen2_moe, width n·F)
    layers.l.mlp.shared_expert.down_proj         = shared.w_down_FDᵀ
    layers.l.mlp.shared_expert_gate.weight       = shared_gate_D [1, D]
    layers.l.mlp.{gate,up,down}_proj (a dense block: qwen2_moe, qwen3_moe ``mlp_only_layers``, width top_k·F)
                                                 = dense.w_in_DH and dense.w_down_FD as the shared expert's
    norm.weight                                  = final_norm_D

qwen2_moe always gates its shared expert by sigmoid(x · w_gate): without ``shared_expert_gate`` the gate is zero
and the down projection doubled (sigmoid(0) = 1/2, exact in floating point); without shared experts the shared
expert's down projection and gate are zero (its output is 0). ``refusal`` names what a family cannot express.
transformers is imported only inside ``build``.
"""

from __future__ import annotations

import torch

from moebench.adapters import hf
from runtime import DecoderConfig, DecoderWeights

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
QK_NORM = {"mixtral": "none", "qwen2_moe": "none", "qwen3_moe": "head", "olmoe": "full"}
_MODEL = {"mixtral": "MixtralModel", "qwen2_moe": "Qwen2MoeModel", "qwen3_moe": "Qwen3MoeModel", "olmoe": "OlmoeModel"}
_CONFIG = {"mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig",
           "olmoe": "OlmoeConfig"}  # fmt: skip
_DENSE = ("qwen2_moe", "qwen3_moe")  # families with dense blocks (mlp_only_layers)


def refusal(family: str, cfg: DecoderConfig) -> str:
    """Why ``family``'s decoder cannot express ``cfg``, or "" when it can (no transformers needed)."""
    if family not in FAMILIES:
        return f"unknown decoder family {family!r}: accepted one of {', '.join(FAMILIES)}"
    block = hf.refusal(family, cfg.moe)
    if block:
        return block
    if cfg.moe.dtype != "float32":
        return (
            f'dtype = "{cfg.moe.dtype}": accepted "float32" (the family\'s decoder routes in its own dtype, ours in '
            "float32: over several layers a token near a routing tie takes other experts, a FAIL that is no bug)"
        )
    if cfg.qk_norm != QK_NORM[family]:
        return f'qk_norm = "{cfg.qk_norm}": accepted "{QK_NORM[family]}" for {family}'
    if cfg.vocab:
        return f"vocab = {cfg.vocab}: accepted 0 (the model is fed hidden states, inputs_embeds)"
    if cfg.dense_layers and family not in _DENSE:
        return f"dense_layers = {cfg.dense_layers}: accepted 0 for {family} (dense blocks: qwen2_moe, qwen3_moe)"
    if cfg.shared_experts and family != "qwen2_moe":
        return f"shared_experts = {cfg.shared_experts}: accepted 0 for {family} (shared experts: qwen2_moe)"
    if family == "olmoe" and cfg.head_dim * cfg.attention_heads != cfg.hidden:
        return f"head_dim = {cfg.head_dim}: accepted hidden / attention_heads for olmoe (its q_norm is hidden wide)"
    return ""


def _config(family: str, cfg: DecoderConfig):
    """The family's config with our shape (module docstring), eager attention and experts."""
    import transformers

    m, f = cfg.moe, cfg.moe.ffn_hidden_size  # hf.refusal: a softmax router, topk_before_softmax = renormalised
    common = dict(
        hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.attention_heads,
        num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, num_experts_per_tok=m.top_k,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)}, vocab_size=1,
        max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )  # fmt: skip
    if family == "mixtral":
        extra = dict(intermediate_size=f, num_local_experts=m.num_experts)
    elif family == "olmoe":  # its experts are intermediate_size wide
        extra = dict(
            intermediate_size=f, num_experts=m.num_experts, norm_topk_prob=m.normalize_topk or m.topk_before_softmax
        )
    else:
        extra = dict(
            intermediate_size=m.top_k * f, moe_intermediate_size=f, num_experts=m.num_experts,
            norm_topk_prob=m.normalize_topk or m.topk_before_softmax,
        )  # fmt: skip
    if family in _DENSE:
        extra["mlp_only_layers"] = list(range(cfg.dense_layers))
    if family == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = max(cfg.shared_experts, 1) * f
    config = getattr(transformers, _CONFIG[family])(**common, **extra)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


class HFDecoder(torch.nn.Module):
    """A family's decoder model behind one call: hidden states [N, D] of one sequence in, [N, D] out."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x_ND.to(self.dtype)[None], use_cache=False).last_hidden_state[0]


def _fill_ffn(mlp: torch.nn.Module, w_in_DH: torch.Tensor, w_down_FD: torch.Tensor) -> None:
    """A SwiGLU MLP's gate_proj, up_proj, down_proj from our [gate | up] input and down projections."""
    width = w_down_FD.shape[0]
    mlp.gate_proj.weight.copy_(w_in_DH[:, :width].T)
    mlp.up_proj.weight.copy_(w_in_DH[:, width:].T)
    mlp.down_proj.weight.copy_(w_down_FD.T)


@torch.no_grad()
def build(family: str, cfg: DecoderConfig, weights: DecoderWeights) -> HFDecoder:
    """``family``'s decoder model filled with ``weights`` through the module docstring's mapping, in eval mode.
    ``ValueError`` (one line) where ``refusal`` objects."""
    why = refusal(family, cfg)
    if why:
        raise ValueError(f"hf:{family} decoder cannot express this model: {why}")
    import transformers

    model = getattr(transformers, _MODEL[family])(_config(family, cfg)).eval()
    for layer, w in zip(model.layers, weights.blocks, strict=True):
        attn = layer.self_attn
        layer.input_layernorm.weight.copy_(w.attn_norm_D)
        layer.post_attention_layernorm.weight.copy_(w.ffn_norm_D)
        for proj, w_DX in ((attn.q_proj, w.wq_DQ), (attn.k_proj, w.wk_DK), (attn.v_proj, w.wv_DK)):
            proj.weight.copy_(w_DX.T)
            if proj.bias is not None:
                proj.bias.zero_()
        attn.o_proj.weight.copy_(w.wo_QD.T)
        if cfg.qk_norm != "none":
            attn.q_norm.weight.copy_(w.q_norm)
            attn.k_norm.weight.copy_(w.k_norm)
        mlp = layer.mlp
        if w.moe is None:
            _fill_ffn(mlp, w.dense.w_in_DH, w.dense.w_down_FD)
            continue
        mlp.gate.weight.copy_(w.moe.router_ED)
        mlp.experts.gate_up_proj.copy_(w.moe.w_in_EDH.transpose(1, 2))
        mlp.experts.down_proj.copy_(w.moe.w_down_EFD.transpose(1, 2))
        if family == "qwen2_moe":
            _fill_shared(mlp, w, cfg)
    model.norm.weight.copy_(weights.final_norm_D)
    return HFDecoder(model, cfg.moe.torch_dtype)


def _fill_shared(mlp: torch.nn.Module, w, cfg: DecoderConfig) -> None:
    """qwen2_moe's shared expert and its always-on sigmoid gate (module docstring)."""
    if w.shared is None:
        mlp.shared_expert.down_proj.weight.zero_()
        mlp.shared_expert_gate.weight.zero_()
        return
    _fill_ffn(mlp.shared_expert, w.shared.w_in_DH, w.shared.w_down_FD)
    if cfg.shared_expert_gate:
        mlp.shared_expert_gate.weight.copy_(w.shared_gate_D[None])
    else:  # sigmoid(0) · 2 = 1
        mlp.shared_expert_gate.weight.zero_()
        mlp.shared_expert.down_proj.weight.mul_(2)
