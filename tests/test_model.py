"""The decoder (runtime/model.py) on one rank: decoding with the KV cache (token by token, chunked
prefill, several sequences in one forward) equals a full causal forward of the same sequence within
‖a − b‖/‖b‖ ≤ 1e-5 in fp32 at every step, over vocabularies, GQA, dense blocks, shared experts and both
activations; the KV cache's size; the config's and the batch's refusals."""

from __future__ import annotations

import pytest
import torch

from runtime import DecoderConfig, MoEConfig
from runtime.model import Batch, KVCache, MoEDecoder, Segment, decoder_weights
from tests.serve_cases import rel_error

TOLERANCE = 1e-5  # the bound for decode vs full forward in fp32 (measured: at most 8e-7)


def _moe(activation: str = "swiglu", **kw) -> MoEConfig:
    return MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=4, top_k=2, activation=activation, **kw)


CONFIGS = {
    "gelu-gqa-dense-first": dict(moe=_moe("gelu"), layers=3, attention_heads=4, kv_heads=2, dense_layers=1),
    "swiglu-vocab-mqa-shared": dict(moe=_moe(), layers=2, attention_heads=4, kv_heads=1, shared_experts=2, vocab=23),
    "gelu-vocab-dense-shared-headdim6": dict(
        moe=_moe("gelu"),
        layers=3,
        attention_heads=4,
        kv_heads=2,
        head_dim=6,
        dense_layers=1,
        shared_experts=1,
        vocab=23,
    ),
    "swiglu-mha-all-dense": dict(moe=_moe(), layers=2, attention_heads=2, kv_heads=2, dense_layers=2),
    # the KV cache holds keys after the q/k norm and RoPE: decode must read them so
    "swiglu-gqa-qknorm-head": dict(moe=_moe(), layers=2, attention_heads=4, kv_heads=2, qk_norm="head"),
    "gelu-gqa-qknorm-full-vocab": dict(
        moe=_moe("gelu"), layers=2, attention_heads=4, kv_heads=2, qk_norm="full", vocab=23
    ),
}


def _model(name: str) -> MoEDecoder:
    cfg = DecoderConfig(**CONFIGS[name])
    return MoEDecoder(cfg, decoder_weights(cfg, seed=4))


def _sequence(cfg: DecoderConfig, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if cfg.vocab:
        return torch.randint(0, cfg.vocab, (n,), generator=gen)
    return torch.randn(n, cfg.hidden, generator=gen)


def _forward(model: MoEDecoder, inputs, segments: list[Segment], cache: KVCache | None) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs, Batch(segments, model.device, model.cfg), cache)[0]


def _full(model: MoEDecoder, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.full(inputs)


@pytest.mark.parametrize("name", CONFIGS)
def test_decode_token_by_token_matches_full_forward_at_every_step(name):
    model = _model(name)
    seq = _sequence(model.cfg, 10)
    cache = KVCache(model.cfg, slots=3, max_len=12)
    prefill = _forward(model, seq[:4], [Segment(0, 4, slot=2)], cache)
    assert rel_error(prefill, _full(model, seq[:4])) <= TOLERANCE
    for t in range(4, 10):  # position t, its keys joining slot 2's cached context
        out_1D = _forward(model, seq[t : t + 1], [Segment(t, 1, slot=2)], cache)
        ref_D = _full(model, seq[: t + 1])[-1]
        assert rel_error(out_1D[0], ref_D) <= TOLERANCE, f"step at position {t}"


@pytest.mark.parametrize("name", CONFIGS)
def test_chunked_prefill_then_decode_matches_full_forward(name):
    model = _model(name)
    seq = _sequence(model.cfg, 12, seed=1)
    full = _full(model, seq)
    cache = KVCache(model.cfg, slots=2, max_len=12)
    # chunks of 3, 1 (a one-token chunk at start > 0 goes the decode path) and 5, then two decode steps
    for a, b in ((0, 3), (3, 4), (4, 9), (9, 10), (10, 11), (11, 12)):
        out = _forward(model, seq[a:b], [Segment(a, b - a, slot=1)], cache)
        assert rel_error(out, full[a:b]) <= TOLERANCE, f"rows {a}:{b}"


def test_full_forward_is_causal():
    """A row of the full forward does not see later tokens: a prefix's rows are those of the whole."""
    model = _model("gelu-gqa-dense-first")
    seq = _sequence(model.cfg, 9)
    changed = seq.clone()
    changed[6:] += 1.0
    assert rel_error(_full(model, changed)[:6], _full(model, seq)[:6]) <= TOLERANCE
    assert rel_error(_full(model, changed)[6:], _full(model, seq)[6:]) > 1e-2  # later rows do see them


@pytest.mark.parametrize("name", ["gelu-gqa-dense-first", "swiglu-vocab-mqa-shared"])
def test_mixed_forward_of_several_sequences_matches_each_alone(name):
    """One forward packing a prefill chunk, decode tokens of slots at different context lengths and a
    whole new prompt: each row equals its own sequence's full forward (the padded decode context of
    the shorter sequence is masked, the slots do not mix)."""
    model = _model(name)
    seqs = [_sequence(model.cfg, n, seed=s) for s, n in enumerate((7, 4, 6, 5))]
    fulls = [_full(model, s) for s in seqs]
    cache = KVCache(model.cfg, slots=4, max_len=8)
    _forward(model, seqs[0][:6], [Segment(0, 6, slot=0)], cache)
    _forward(model, seqs[1][:3], [Segment(0, 3, slot=3)], cache)
    _forward(model, seqs[2][:2], [Segment(0, 2, slot=1)], cache)
    # slot 0 decodes position 6, slot 3 position 3, slot 1 prefills 2:6, slot 2 takes a whole prompt
    segments = [Segment(6, 1, 0), Segment(3, 1, 3), Segment(2, 4, 1), Segment(0, 5, 2)]
    inputs = torch.cat([seqs[0][6:7], seqs[1][3:4], seqs[2][2:6], seqs[3]])
    out = _forward(model, inputs, segments, cache)
    assert rel_error(out[0], fulls[0][6]) <= TOLERANCE
    assert rel_error(out[1], fulls[1][3]) <= TOLERANCE
    assert rel_error(out[2:6], fulls[2][2:6]) <= TOLERANCE
    assert rel_error(out[6:11], fulls[3]) <= TOLERANCE


def test_uncached_batch_of_whole_sequences_matches_each_alone():
    model = _model("swiglu-vocab-mqa-shared")
    a, b = _sequence(model.cfg, 5, seed=2), _sequence(model.cfg, 3, seed=3)
    out = _forward(model, torch.cat([a, b]), [Segment(0, 5), Segment(0, 3)], None)
    assert rel_error(out[:5], _full(model, a)) <= TOLERANCE
    assert rel_error(out[5:], _full(model, b)) <= TOLERANCE


def test_stale_keys_of_a_reused_slot_are_not_read():
    """A slot that held a longer sequence serves a shorter one: only its own positions are attended."""
    model = _model("gelu-gqa-dense-first")
    long_seq, short = _sequence(model.cfg, 10, seed=5), _sequence(model.cfg, 4, seed=6)
    cache = KVCache(model.cfg, slots=1, max_len=10)
    _forward(model, long_seq, [Segment(0, 10, slot=0)], cache)
    _forward(model, short[:2], [Segment(0, 2, slot=0)], cache)
    out = _forward(model, short[2:3], [Segment(2, 1, slot=0)], cache)  # decode path: gathers the slot
    assert rel_error(out[0], _full(model, short[:3])[-1]) <= TOLERANCE
    out = _forward(model, short[3:4], [Segment(3, 1, slot=0)], cache)
    assert rel_error(out[0], _full(model, short)[-1]) <= TOLERANCE


@pytest.mark.parametrize(("dtype", "itemsize"), [("float32", 4), ("bfloat16", 2)])
def test_kv_cache_bytes_are_keys_and_values_of_every_layer_and_kv_head(dtype, itemsize):
    cfg = DecoderConfig(_moe(dtype=dtype), layers=3, attention_heads=4, kv_heads=2, head_dim=6)
    per_token = 2 * 3 * 2 * 6 * itemsize  # K and V × layers × kv_heads × head_dim × itemsize
    assert cfg.kv_cache_bytes_per_token() == per_token
    cache = KVCache(cfg, slots=5, max_len=7)
    assert cache.nbytes == 5 * 7 * per_token
    assert cache.k.dtype == cache.v.dtype == getattr(torch, dtype)


def test_head_dim_defaults_to_hidden_over_heads():
    assert DecoderConfig(_moe(), attention_heads=4, kv_heads=2).head_dim == 4
    assert DecoderConfig(_moe(), attention_heads=4, kv_heads=2, head_dim=6).head_dim == 6


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        (dict(attention_heads=4, kv_heads=3), "kv_heads"),  # not a divisor of the heads
        (dict(attention_heads=4, kv_heads=0), "kv_heads"),
        (dict(attention_heads=2, head_dim=5), "head_dim"),  # odd: RoPE rotates pairs
        (dict(attention_heads=16), "head_dim"),  # the default 16 // 16 = 1, odd
        (dict(attention_heads=3), "head_dim"),  # hidden 16 not a multiple of 3, no head_dim given
        (dict(layers=2, dense_layers=3), "dense_layers"),
        (dict(layers=0), "layers"),
        (dict(shared_experts=-1), "shared_experts"),
        (dict(vocab=1.5), "vocab"),
        (dict(qk_norm="layer"), "qk_norm"),
    ],
)
def test_decoder_config_refuses_impossible_shapes_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"^DecoderConfig\.{field} = .* is invalid: accepted "):
        DecoderConfig(_moe(), **kw)


@pytest.mark.parametrize("name", ["gelu-gqa-dense-first", "swiglu-vocab-mqa-shared"])
def test_empty_batch_returns_zero_rows_of_hidden(name):
    model = _model(name)
    empty = torch.zeros(0, dtype=torch.long) if model.cfg.vocab else torch.zeros(0, model.cfg.hidden)
    assert _full(model, empty).shape == (0, model.cfg.hidden)
    out = _forward(model, empty, [], KVCache(model.cfg, slots=1, max_len=4))
    assert out.shape == (0, model.cfg.hidden)


def test_segment_without_slot_must_start_at_zero():
    cfg = DecoderConfig(**CONFIGS["gelu-gqa-dense-first"])
    with pytest.raises(ValueError, match="without a cache slot must start at 0"):
        Batch([Segment(0, 2), Segment(3, 2)], torch.device("cpu"), cfg)
    with pytest.raises(ValueError, match="either every segment has a cache slot or none"):
        Batch([Segment(0, 2, slot=0), Segment(0, 2)], torch.device("cpu"), cfg)


def test_cached_batch_without_a_cache_is_refused():
    model = _model("gelu-gqa-dense-first")
    with pytest.raises(ValueError, match="no cache was given"):
        _forward(model, _sequence(model.cfg, 2), [Segment(0, 2, slot=0)], None)


def test_weights_must_match_the_config():
    cfg = DecoderConfig(**CONFIGS["gelu-gqa-dense-first"])
    other = DecoderConfig(**{**CONFIGS["gelu-gqa-dense-first"], "layers": 2})
    with pytest.raises(ValueError, match="accepted layers"):
        MoEDecoder(cfg, decoder_weights(other))
    with pytest.raises(ValueError, match="needs embedding weights exactly when vocab > 0"):
        MoEDecoder(DecoderConfig(**{**CONFIGS["gelu-gqa-dense-first"], "vocab": 5}), decoder_weights(cfg))
    with pytest.raises(ValueError, match=r"one per MoE block \(2\)"):
        decoder_weights(cfg, moe=[])
