"""The ground truth: a single-process fp64 MoE layer, written without the fast path's code.

It loops over tokens and their chosen experts one at a time with plain fp64 tensor arithmetic
(differentiable, so gradients can be compared too). It shares only the weights dataclass and the
config with the fast path; routing, capacity, the FFNs and the losses are written out again here.

Every comparison against it uses one error metric, ``rel_error``: ‖x − ref‖₂ / ‖ref‖₂ in fp64.

Policy, identical to ``runtime/router.py``: capacity C = ceil(cf · N · K / E) over all N tokens
given; copies are served in token order and the first C per expert are kept; a dropped copy
contributes nothing and the other copies keep their weights; top-k ties go to the lower id.

Router variants (scoring, topk_before_softmax, group_limited, score_bias, routed_scaling: MoEConfig), written
from their definitions in ``_choose`` over Python lists of fp64 values (the rule in ``runtime/router.py``'s
docstring): sigmoid scores, normalised for the losses; Mixtral's top-k on the logits then a softmax over
them; groups scored by their two best choice scores; a bias on the choice score only; the weights × the
routed scaling. Ties go to the lower group and the lower expert, as everywhere.

Sequence routing (``cfg.granularity = "sequence"``), written from its definition: each sequence's
mean hidden state is routed once, every token of the sequence goes to those experts with those
weights, and the sequence's router row enters the losses once per token (``runtime/router.py``).

``reference_decoder`` is the same ground truth for the whole decoder (runtime/model.py): one sequence
in fp64, attention written out per head with an explicit causal mask and softmax, RoPE from its
definition, the routed experts through ``reference_moe`` (dropless). It reads only the decoder's
config and weights dataclasses, none of its code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from runtime.config import MoEConfig
from runtime.weights import MoEWeights

if TYPE_CHECKING:  # the decoder's dataclasses only: the reference never calls the fast path's code
    from runtime.model import BlockWeights, DecoderConfig, DecoderWeights, FFNWeights


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


def _spans(n: int, cfg: MoEConfig, lengths: list[int] | None) -> list[tuple[int, int]]:
    """(first token, tokens) of each routed unit: every token alone, or each sequence."""
    if cfg.granularity == "token":
        if lengths is not None:
            raise ValueError("reference_moe: lengths with granularity 'token': accepted granularity 'sequence'")
        return [(t, 1) for t in range(n)]
    if lengths is None:
        size = cfg.seq_len or n
        if n % max(size, 1):
            raise ValueError(f"reference_moe: seq_len {size} does not divide {n} tokens")
        lengths = [size] * (n // size) if n else []
    if sum(lengths) != n or any(length < 1 for length in lengths):
        raise ValueError(f"reference_moe: lengths {lengths} are not a split of {n} tokens")
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    return list(zip(starts, lengths, strict=True))


def _softmax(v: torch.Tensor) -> torch.Tensor:
    shifted = v - v.max()
    return torch.exp(shifted) / torch.exp(shifted).sum()


def _choose(logits: torch.Tensor, cfg: MoEConfig, score_bias: list[float]) -> tuple[torch.Tensor, list[int], list]:
    """One unit's routing from its logits [E]: the losses' row (probabilities), the K chosen experts in
    descending choice score (ties to the lower id), and their combine weights (differentiable)."""
    e_count, k = cfg.num_experts, cfg.top_k
    if cfg.topk_before_softmax:  # Mixtral: the K largest logits, a softmax over those K only
        values = logits.detach().tolist()
        chosen = sorted(range(e_count), key=lambda e: (-values[e], e))[:k]
        gate = list(_softmax(torch.stack([logits[e] for e in chosen])))
        return _softmax(logits), chosen, [g * cfg.routed_scaling for g in gate]
    if cfg.scoring == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
        probs = scores / scores.sum()
    else:
        scores = probs = _softmax(logits)
    values = [s + b for s, b in zip(scores.detach().tolist(), score_bias, strict=True)]  # the choice score
    candidates = list(range(e_count))
    if cfg.group_limited is not None:
        n_groups, top_groups = cfg.group_limited
        size = e_count // n_groups
        members = [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]
        group_score = [sum(sorted((values[e] for e in m), reverse=True)[:2]) for m in members]
        kept = sorted(range(n_groups), key=lambda g: (-group_score[g], g))[:top_groups]
        candidates = sorted(e for g in kept for e in members[g])
    chosen = sorted(candidates, key=lambda e: (-values[e], e))[:k]
    gate = [scores[e] for e in chosen]  # the unbiased scores
    if cfg.normalize_topk:
        total = sum(gate)
        gate = [g / total for g in gate]
    return probs, chosen, [g * cfg.routed_scaling for g in gate]


def reference_moe(
    x_ND: torch.Tensor,
    weights: MoEWeights,
    cfg: MoEConfig,
    lengths: list[int] | None = None,
    prompt_len: int | None = None,
) -> ReferenceOutput:
    """Run the layer on N tokens in fp64. Inputs may require grad; outputs are differentiable.
    With granularity "sequence", ``lengths`` split the N tokens into sequences in order (None: by
    ``cfg.seq_len``, or one sequence), and the router sees the mean of each sequence's first
    ``prompt_len`` tokens (None: all of them; serve's rule: the prompt's)."""
    x = x_ND.double()
    router = weights.router_ED.double()
    bias = x.new_zeros(cfg.num_experts) if weights.router_bias_E is None else weights.router_bias_E.double()
    no_bias = cfg.score_bias == 0 or weights.score_bias_E is None
    score_bias = [0.0] * cfg.num_experts if no_bias else weights.score_bias_E.double().tolist()
    w_in, w_down = weights.w_in_EDH.double(), weights.w_down_EFD.double()
    n, e_count, k = x.shape[0], cfg.num_experts, cfg.top_k
    capacity = None if cfg.capacity_factor == 0 else math.ceil(cfg.capacity_factor * n * k / e_count)

    used = [0] * e_count
    counts = [0] * e_count
    dropped = []
    rows, prob_sum, z_sum = [], torch.zeros(e_count, dtype=torch.float64), x.new_zeros(())
    for start, length in _spans(n, cfg, lengths):
        seen_len = length if prompt_len is None else min(prompt_len, length)
        seen = x[start : start + seen_len].sum(dim=0) / seen_len  # what the router sees: the token, or the mean
        logits = router @ seen + bias
        shifted = logits - logits.max()
        probs, chosen, gate = _choose(logits, cfg, score_bias)
        prob_sum = prob_sum + length * probs  # the unit's row counts once per token
        z_sum = z_sum + length * (logits.max() + torch.log(torch.exp(shifted).sum())) ** 2
        for t in range(start, start + length):
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


# -------------------------------------------------------------------------------------------
# The whole decoder, one sequence at a time (shapes: N positions, D hidden, H query heads, G KV
# heads, Dh head dim, V vocab)


def _rms_norm(x_ND: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """x / √(mean(x²) + eps) · scale, each row on its own."""
    return x_ND / torch.sqrt((x_ND * x_ND).mean(dim=-1, keepdim=True) + eps) * scale_D.double()


def _dense_ffn(x_ND: torch.Tensor, w: FFNWeights, activation: str) -> torch.Tensor:
    """gelu(x·W_in)·W_down, or silu(x·W_in[:, :F]) ⊙ (x·W_in[:, F:])·W_down for swiglu."""
    w_down_FD = w.w_down_FD.double()
    h_NH = x_ND @ w.w_in_DH.double()
    if activation == "swiglu":
        f = w_down_FD.shape[0]
        return (_silu(h_NH[:, :f]) * h_NH[:, f:]) @ w_down_FD
    return _gelu(h_NH) @ w_down_FD


def _rope(x_NHd: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE from its definition: at position p, the pair (i, i + Dh/2) is turned by the
    angle p · θ^(−2i/Dh)."""
    n, _, dh = x_NHd.shape
    half = dh // 2
    out = torch.empty_like(x_NHd)
    for p in range(n):
        for i in range(half):
            angle = p * theta ** (-2.0 * i / dh)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x_NHd[p, :, i], x_NHd[p, :, i + half]
            out[p, :, i] = a * c - b * s
            out[p, :, i + half] = a * s + b * c
    return out


def _queries_keys(cfg: DecoderConfig, w: BlockWeights, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries [N, H, Dh] and keys [N, G, Dh]: projected, RMS-normed as ``qk_norm`` says ("full": each
    row of all H·Dh (G·Dh) values; "head": each head's Dh values), then rotated."""
    n, dh = x_ND.shape[0], cfg.head_dim
    out = []
    for w_DX, scale, heads in ((w.wq_DQ, w.q_norm, cfg.attention_heads), (w.wk_DK, w.k_norm, cfg.kv_heads)):
        y_NX = x_ND @ w_DX.double()
        if cfg.qk_norm == "full":
            y_NX = _rms_norm(y_NX, scale, cfg.norm_eps)
        y_Nhd = y_NX.reshape(n, heads, dh)
        if cfg.qk_norm == "head":
            y_Nhd = torch.stack([_rms_norm(y_Nhd[:, h], scale, cfg.norm_eps) for h in range(heads)], dim=1)
        out.append(_rope(y_Nhd, cfg.rope_theta))
    return out[0], out[1]


def _attention(cfg: DecoderConfig, w: BlockWeights, x_ND: torch.Tensor) -> torch.Tensor:
    """Causal grouped-query self-attention over the whole sequence, one query head at a time."""
    n, heads, groups, dh = x_ND.shape[0], cfg.attention_heads, cfg.kv_heads, cfg.head_dim
    q_NHd, k_NGd = _queries_keys(cfg, w, x_ND)
    v_NGd = (x_ND @ w.wv_DK.double()).reshape(n, groups, dh)
    future_NN = torch.ones(n, n, dtype=torch.bool).triu(diagonal=1)  # key j > query i
    heads_out = []
    for h in range(heads):
        g = h // (heads // groups)  # H/G consecutive query heads share KV head g
        scores_NN = (q_NHd[:, h] @ k_NGd[:, g].T) / math.sqrt(dh)
        scores_NN = scores_NN.masked_fill(future_NN, float("-inf"))
        e_NN = torch.exp(scores_NN - scores_NN.max(dim=-1, keepdim=True).values)
        heads_out.append((e_NN / e_NN.sum(dim=-1, keepdim=True)) @ v_NGd[:, g])
    return torch.cat(heads_out, dim=-1) @ w.wo_QD.double()  # heads concatenated head-major: [N, H·Dh]


def reference_decoder(
    cfg: DecoderConfig, weights: DecoderWeights, inputs: torch.Tensor, prompt_len: int | None = None
) -> torch.Tensor:
    """One whole sequence through the decoder in fp64 on the CPU: the output hidden states [N, D]
    after the final RMSNorm (what ``MoEDecoder.full`` returns). ``inputs``: hidden states [N, D]
    (vocab 0) or token ids [N] (vocab > 0). Block l: h = x + attn(norm(x)); x' = h + ffn(norm(h)),
    the FFN dense in the first ``dense_layers`` blocks, else the routed experts (dropless, whatever
    the config's capacity_factor: the decoder serves dropless) plus the shared experts if any (their
    output × sigmoid(x · w_gate) with ``shared_expert_gate``). With sequence routing the whole input is
    one sequence, routed on the mean of its first ``prompt_len`` positions (None: all; a served
    request's rule: its prompt's)."""
    x_ND = weights.embed_VD.double()[inputs.cpu().long()] if cfg.vocab else inputs.cpu().double()
    dropless = replace(cfg.moe, capacity_factor=0.0)
    act, eps = cfg.moe.activation, cfg.norm_eps
    for w in weights.blocks:
        h_ND = x_ND + _attention(cfg, w, _rms_norm(x_ND, w.attn_norm_D, eps))
        n_ND = _rms_norm(h_ND, w.ffn_norm_D, eps)
        if w.moe is None:
            y_ND = _dense_ffn(n_ND, w.dense, act)
        else:
            y_ND = reference_moe(n_ND, w.moe, dropless, prompt_len=prompt_len).out_ND
            if w.shared is not None:
                shared_ND = _dense_ffn(n_ND, w.shared, act)
                if cfg.shared_expert_gate:  # Qwen2-MoE: × sigmoid(x · w_gate) per position
                    shared_ND = shared_ND / (1.0 + torch.exp(-(n_ND @ w.shared_gate_D.double())))[:, None]
                y_ND = y_ND + shared_ND
        x_ND = h_ND + y_ND
    return _rms_norm(x_ND, weights.final_norm_D, eps)


def reference_logits(cfg: DecoderConfig, weights: DecoderWeights, inputs: torch.Tensor) -> torch.Tensor:
    """The LM head over ``reference_decoder``'s output (vocab > 0): logits [N, V] in fp64; position
    i's greedy token is the argmax of row i."""
    if not cfg.vocab:
        raise ValueError("reference_logits: the decoder has no vocabulary (vocab = 0): accepted vocab > 0")
    return reference_decoder(cfg, weights, inputs) @ weights.head_VD.double().T
