"""The fp64 reference decoder (``runtime.reference.reference_decoder``) and the decoder agree, the
reference disagrees with subtly wrong decoders, and the serving engine's outputs match it token by token.

Tolerance: ``rel_error`` ≤ 1e-6 for float32. Measured at these shapes (gelu and swiglu, top-1 and
top-2, normalized top-k, GQA 4 query heads on 2 or 1 KV heads, one dense block, one shared expert,
vocab 0 and 37, 9 tokens, seeds 0–2): at most 2.8e-7 on the output hidden states and on the logits; with
the q/k norm ("head" at head_dim 8, "full" with one KV head; seeds 0–2) at most 4.3e-7.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime import DecoderConfig, Engine, MoEConfig, MoEDecoder, Request, decoder_weights, rel_error
from runtime.reference import reference_decoder, reference_logits

TOLERANCE = 1e-6  # float32 against fp64; measured ≤ 2.8e-7 (module docstring)
PLANTED = 1e-2  # a planted bug must push the error at least this far (10⁴ × the tolerance)
D, N = 16, 9  # hidden, sequence length


def _config(activation="gelu", top_k=2, vocab=0, kv_heads=2, normalize=False, **kw) -> DecoderConfig:
    moe = MoEConfig(D, 12, 4, top_k=top_k, activation=activation, normalize_topk=normalize)
    base = dict(layers=3, attention_heads=4, kv_heads=kv_heads, dense_layers=1, shared_experts=1, vocab=vocab)
    return DecoderConfig(moe, **{**base, **kw})


def _inputs(cfg: DecoderConfig, seed: int, n: int = N) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randint(0, cfg.vocab, (n,), generator=gen) if cfg.vocab else torch.randn(n, D, generator=gen)


@torch.no_grad()
def _full(cfg: DecoderConfig, weights, x: torch.Tensor) -> torch.Tensor:
    return MoEDecoder(cfg, weights).full(x)


CONFIGS = {
    "gelu-top1-gqa": _config("gelu", 1),
    "gelu-top2-gqa": _config("gelu", 2),
    "swiglu-top1-gqa": _config("swiglu", 1),
    "swiglu-top2-normalized-mqa": _config("swiglu", 2, kv_heads=1, normalize=True),
    "gelu-top2-vocab": _config("gelu", 2, vocab=37),
    "swiglu-top2-vocab-headdim8": _config("swiglu", 2, vocab=37, head_dim=8),
    "gelu-top2-all-moe-no-shared": _config("gelu", 2, dense_layers=0, shared_experts=0),
    "swiglu-top2-shared-gated": _config("swiglu", 2, shared_expert_gate=True),  # Qwen2-MoE's shared gate
    "deepseek-v3-router-shared-gated": dataclasses.replace(  # sigmoid, groups, choice bias, scaling
        _config("swiglu", 2, shared_expert_gate=True),
        moe=MoEConfig(
            D,
            12,
            4,
            top_k=2,
            activation="swiglu",
            normalize_topk=True,
            scoring="sigmoid",
            group_limited=(2, 1),
            score_bias=0.1,
            routed_scaling=2.5,
        ),
    ),
    "mixtral-router-topk-before-softmax": dataclasses.replace(
        _config("swiglu", 2), moe=MoEConfig(D, 12, 4, top_k=2, activation="swiglu", topk_before_softmax=True)
    ),
    "swiglu-top2-qknorm-head-headdim8": _config("swiglu", 2, head_dim=8, qk_norm="head"),  # Qwen3's q/k norm
    "swiglu-top2-qknorm-full-mqa": _config("swiglu", 2, kv_heads=1, qk_norm="full"),  # OLMoE's q/k norm
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_full_matches_fp64_reference(name, seed):
    cfg = CONFIGS[name]
    weights, x = decoder_weights(cfg, seed=seed), _inputs(cfg, seed)
    out = _full(cfg, weights, x)
    ref = reference_decoder(cfg, weights, x)
    assert ref.dtype == torch.float64 and ref.shape == (N, D)
    assert rel_error(out, ref) <= TOLERANCE
    if cfg.vocab:
        with torch.no_grad():
            logits = MoEDecoder(cfg, weights).logits(out)
        assert rel_error(logits, reference_logits(cfg, weights, x)) <= TOLERANCE


# -------------------------------------------------------------------------------------------
# Planted bugs: the reference computed as a subtly wrong decoder would compute, against the untouched
# decoder. Each plant is an exact rewrite of the bug as other weights or another config.

CFG = _config("swiglu", 2, head_dim=8)  # 4 query heads on 2 KV heads: a wrong head mapping is visible


def _permute_head_columns(w_DX: torch.Tensor, heads: int, perm: list[int]) -> torch.Tensor:
    """Within each head's Dh columns, column j becomes the old column perm[j]."""
    dh = len(perm)
    return w_DX.reshape(w_DX.shape[0], heads, dh)[:, :, perm].reshape(w_DX.shape)


def _with_blocks(weights, **changes_per_block):
    blocks = tuple(dataclasses.replace(b, **{k: f(b) for k, f in changes_per_block.items()}) for b in weights.blocks)
    return dataclasses.replace(weights, blocks=blocks)


def test_reference_untouched_agrees_so_plants_below_are_meaningful():
    weights, x = decoder_weights(CFG, seed=3), _inputs(CFG, 3)
    assert rel_error(_full(CFG, weights, x), reference_decoder(CFG, weights, x)) <= TOLERANCE


def test_reference_catches_interleaved_rope_pairing():
    """A decoder pairing (2i, 2i+1) instead of (i, i + Dh/2) is, exactly, the right one with each head's
    q and k columns permuted [0, 2, 4, ..., 1, 3, 5, ...] (without RoPE that common permutation would
    leave every q·k, so the output, unchanged)."""
    weights, x = decoder_weights(CFG, seed=3), _inputs(CFG, 3)
    dh = CFG.head_dim
    perm = list(range(0, dh, 2)) + list(range(1, dh, 2))
    interleaved = _with_blocks(
        weights,
        wq_DQ=lambda b: _permute_head_columns(b.wq_DQ, CFG.attention_heads, perm),
        wk_DK=lambda b: _permute_head_columns(b.wk_DK, CFG.kv_heads, perm),
    )
    assert rel_error(_full(CFG, weights, x), reference_decoder(CFG, interleaved, x)) > PLANTED


def test_reference_catches_rope_frequency_exponent_off_by_two():
    """θ^(−i/Dh) instead of θ^(−2i/Dh) is the right formula with θ replaced by √θ."""
    weights, x = decoder_weights(CFG, seed=3), _inputs(CFG, 3)
    wrong = dataclasses.replace(CFG, rope_theta=CFG.rope_theta**0.5)
    assert rel_error(_full(CFG, weights, x), reference_decoder(wrong, weights, x)) > PLANTED


def test_reference_catches_modulo_gqa_head_mapping():
    """Query head h reading KV head h mod G (instead of h // (H/G)) is, exactly, the right mapping with
    the query heads reordered (wq's head columns and wo's head rows alike) so that positions g·H/G ...
    hold the heads ≡ g mod G; reordering heads alone changes nothing but which KV head each reads."""
    weights, x = decoder_weights(CFG, seed=3), _inputs(CFG, 3)
    heads, groups, dh = CFG.attention_heads, CFG.kv_heads, CFG.head_dim
    order = [h for g in range(groups) for h in range(heads) if h % groups == g]  # [0, 2, 1, 3]
    cols = [h * dh + i for h in order for i in range(dh)]
    modulo = _with_blocks(weights, wq_DQ=lambda b: b.wq_DQ[:, cols], wo_QD=lambda b: b.wo_QD[cols])
    assert rel_error(_full(CFG, weights, x), reference_decoder(CFG, modulo, x)) > PLANTED
    # the same reorder within each KV group is a true symmetry: both sides agree
    within = [1, 0, 3, 2]
    cols = [h * dh + i for h in within for i in range(dh)]
    same = _with_blocks(weights, wq_DQ=lambda b: b.wq_DQ[:, cols], wo_QD=lambda b: b.wo_QD[cols])
    assert rel_error(_full(CFG, weights, x), reference_decoder(CFG, same, x)) <= TOLERANCE


def test_reference_is_causal_and_sees_the_past():
    """Changing the last input leaves every earlier output row of the reference unchanged (a missing
    causal mask would change them), while changing the first input changes the last row."""
    weights, x = decoder_weights(CFG, seed=3), _inputs(CFG, 3)
    ref = reference_decoder(CFG, weights, x)
    last = x.clone()
    last[-1] = torch.randn(D, generator=torch.Generator().manual_seed(9))
    changed = reference_decoder(CFG, weights, last)
    torch.testing.assert_close(changed[:-1], ref[:-1], rtol=1e-12, atol=1e-12)
    assert rel_error(changed[-1], ref[-1]) > PLANTED
    first = x.clone()
    first[0] = last[-1]
    assert rel_error(reference_decoder(CFG, weights, first)[-1], ref[-1]) > 1e-4


# -------------------------------------------------------------------------------------------
# The engine: chunked prefill and decode with the KV cache, against the reference of each full sequence


def _serve(cfg: DecoderConfig, weights, prompts: list[torch.Tensor], output_lens: list[int]) -> list[Request]:
    engine = Engine(MoEDecoder(cfg, weights), max_running=2, max_batch_tokens=4, max_len=16, keep_outputs=True)
    requests = [Request(i, p, o) for i, (p, o) in enumerate(zip(prompts, output_lens, strict=True))]
    for r in requests:
        engine.add(r)
    for _ in range(64):
        if not engine.has_work():
            break
        engine.step()
    assert not engine.has_work() and all(r.done for r in requests)
    return requests


def test_engine_hidden_outputs_match_reference_of_fed_back_sequence():
    """vocab 0: output g is the hidden state at position input_len + g − 1 of the sequence prompt +
    outputs[:−1] (each output fed back as the next input). Prompts of 6 and 3 under a 4-token budget:
    chunked prefill, then decode steps batched together."""
    cfg = _config("swiglu", 2, head_dim=8)
    weights = decoder_weights(cfg, seed=5)
    prompts = [_inputs(cfg, 5, 6), _inputs(cfg, 6, 3)]
    for r in _serve(cfg, weights, prompts, [4, 5]):
        sequence = torch.cat([r.prompt, torch.stack(r.outputs[:-1])])
        ref = reference_decoder(cfg, weights, sequence)
        n = r.input_len
        assert rel_error(torch.stack(r.outputs), ref[n - 1 :]) <= TOLERANCE


def test_engine_greedy_tokens_match_reference_argmax():
    """vocab > 0: output g is the argmax of the reference logits at position input_len + g − 1 of
    prompt + outputs[:−1]. The engine's token must be the reference's argmax up to 1e-5 of the logits'
    scale (a near-tie in fp64 may go either way in fp32); each position's margin is checked so that a
    wrong token cannot hide behind it."""
    cfg = _config("gelu", 2, vocab=37, head_dim=8)
    weights = decoder_weights(cfg, seed=7)
    prompts = [_inputs(cfg, 7, 5), _inputs(cfg, 8, 2)]
    for r in _serve(cfg, weights, prompts, [5, 4]):
        sequence = torch.cat([r.prompt, torch.tensor(r.outputs[:-1], dtype=torch.long)])
        logits = reference_logits(cfg, weights, sequence)[r.input_len - 1 :]
        chosen = logits[torch.arange(len(r.outputs)), torch.tensor(r.outputs)]
        slack = 1e-5 * logits.abs().max()
        assert (chosen >= logits.max(dim=-1).values - slack).all(), (r.id, r.outputs, logits.argmax(-1).tolist())


# -------------------------------------------------------------------------------------------
# The q/k norm (qk_norm): its weights leave every other draw alone, and a misplaced or misshaped norm is caught


def test_qk_norm_weights_leave_every_other_weight_of_the_seed_unchanged():
    """The q/k scales are drawn after everything else: the same seed gives the same attention, FFN, expert and
    final-norm weights for "none", "head" and "full" (committed baselines depend on it)."""
    plain = decoder_weights(CFG, seed=3)
    for mode, width in (("head", CFG.head_dim), ("full", None)):
        normed = decoder_weights(dataclasses.replace(CFG, qk_norm=mode), seed=3)
        torch.testing.assert_close(normed.final_norm_D, plain.final_norm_D, rtol=0, atol=0)
        for a, b in zip(normed.blocks, plain.blocks, strict=True):
            for field in ("attn_norm_D", "wq_DQ", "wk_DK", "wv_DK", "wo_QD", "ffn_norm_D"):
                torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=0, atol=0)
            if b.moe is not None:
                torch.testing.assert_close(a.moe.w_in_EDH, b.moe.w_in_EDH, rtol=0, atol=0)
            assert b.q_norm is None and b.k_norm is None
            q_width = width or CFG.attention_heads * CFG.head_dim
            k_width = width or CFG.kv_heads * CFG.head_dim
            assert a.q_norm.shape == (q_width,) and a.k_norm.shape == (k_width,)


QK_HEAD = dataclasses.replace(CFG, qk_norm="head")


def test_reference_catches_per_head_qk_norm_done_over_all_heads():
    """A decoder norming all of q (and k) at once where each head should be normed alone is, exactly, the
    "full" config with the head scale repeated over the heads."""
    weights, x = decoder_weights(QK_HEAD, seed=3), _inputs(QK_HEAD, 3)
    full = _with_blocks(
        weights,
        q_norm=lambda b: b.q_norm.repeat(QK_HEAD.attention_heads),
        k_norm=lambda b: b.k_norm.repeat(QK_HEAD.kv_heads),
    )
    wrong = dataclasses.replace(QK_HEAD, qk_norm="full")
    assert rel_error(_full(QK_HEAD, weights, x), reference_decoder(wrong, full, x)) > PLANTED


def test_reference_catches_qk_norm_left_out():
    weights, x = decoder_weights(QK_HEAD, seed=3), _inputs(QK_HEAD, 3)
    assert rel_error(_full(QK_HEAD, weights, x), reference_decoder(CFG, weights, x)) > PLANTED


@pytest.mark.parametrize("mode", ["head", "full"])
def test_reference_catches_qk_norm_applied_after_rope(mode, monkeypatch):
    """RoPE turns pairs (i, i + Dh/2), so it keeps each head's (and all of q's) RMS: a norm moved after it
    differs only through its scale's entries of a pair differing; the decoder must still see it."""
    import runtime.reference as reference

    cfg = dataclasses.replace(CFG, qk_norm=mode)
    weights, x = decoder_weights(cfg, seed=3), _inputs(cfg, 3)
    right = reference_decoder(cfg, weights, x)
    assert rel_error(_full(cfg, weights, x), right) <= TOLERANCE

    original = reference._queries_keys

    def rope_then_norm(c, w, x_ND):
        plain = dataclasses.replace(c, qk_norm="none")
        q_NHd, k_NGd = original(plain, w, x_ND)  # projected and rotated, no norm
        if mode == "head":
            return reference._rms_norm(q_NHd, w.q_norm, c.norm_eps), reference._rms_norm(k_NGd, w.k_norm, c.norm_eps)
        n = x_ND.shape[0]
        q = reference._rms_norm(q_NHd.reshape(n, -1), w.q_norm, c.norm_eps).reshape(q_NHd.shape)
        return q, reference._rms_norm(k_NGd.reshape(n, -1), w.k_norm, c.norm_eps).reshape(k_NGd.shape)

    monkeypatch.setattr(reference, "_queries_keys", rope_then_norm)
    assert rel_error(_full(cfg, weights, x), reference_decoder(cfg, weights, x)) > PLANTED  # measured 3.3e-2, 6.4e-2
