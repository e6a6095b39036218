"""Hugging Face transformers' decoder models (moebench/adapters/hf_decoder.py) filled with our decoder's
weights agree with the fp64 ``reference_decoder`` and with our ``MoEDecoder.full`` on one sequence: 24 positions,
2 layers, GQA (4 query heads on 2 KV heads), each family's q/k norm, qwen2_moe's shared experts gated and not,
qwen3_moe's dense first block. Mapping bugs planted into a built model FAIL; what a family cannot express is a
one-line refusal (those tests run without transformers). Kind equivalence with ``impl = "hf:<family>"`` and the
decoder keys reports both decoders' errors and FAILs a disagreeing one at its first differing position.

Tolerance: ``rel_error`` ≤ 1e-6 in float32. Measured (seeds 0–1, the shapes below): at most 2.7e-7 against the
fp64 reference for every family, and at most 2.6e-7 between the HF model and our decoder; the planted
bugs move it to 0.10 (final norm scale left out) to 0.64 (GQA heads interleaved)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from moebench import kinds
from moebench.adapters import hf_decoder
from moebench.kinds import equivalence
from moebench.scenario import ScenarioError, discover, load, load_file
from runtime import DecoderConfig, MoEConfig, MoEDecoder, decoder_weights, rel_error
from runtime.reference import reference_decoder

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-6  # float32 against fp64 (module docstring)
PLANTED = 1e-2  # a planted mapping bug must push the error at least this far (10⁴ × the tolerance)
D, N = 32, 24  # hidden, positions


def _config(family: str, **kw) -> DecoderConfig:
    moe = MoEConfig(D, 24, 4, top_k=2, activation="swiglu", normalize_topk=True)
    base = dict(layers=2, attention_heads=4, kv_heads=2, qk_norm=hf_decoder.QK_NORM[family])
    return DecoderConfig(moe, **{**base, **kw})


CASES = {
    "mixtral-headdim6": ("mixtral", _config("mixtral", head_dim=6)),
    "mixtral-topk-before-softmax": (
        "mixtral",
        dataclasses.replace(
            _config("mixtral"), moe=MoEConfig(D, 24, 4, top_k=2, activation="swiglu", topk_before_softmax=True)
        ),
    ),
    "qwen2_moe-shared-gated": ("qwen2_moe", _config("qwen2_moe", shared_experts=1, shared_expert_gate=True)),
    "qwen2_moe-two-shared-ungated": ("qwen2_moe", _config("qwen2_moe", shared_experts=2)),
    "qwen2_moe-no-shared-dense-first": ("qwen2_moe", _config("qwen2_moe", dense_layers=1)),
    "qwen3_moe-qknorm-head-dense-first-headdim6": ("qwen3_moe", _config("qwen3_moe", dense_layers=1, head_dim=6)),
    "olmoe-qknorm-full": ("olmoe", _config("olmoe")),
}


def _inputs(seed: int) -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(200 + seed))


@torch.no_grad()
def _run(module, x: torch.Tensor) -> torch.Tensor:
    return module(x) if not isinstance(module, MoEDecoder) else module.full(x)


def _built(name: str, seed: int = 0):
    pytest.importorskip("transformers")
    family, cfg = CASES[name]
    weights = decoder_weights(cfg, seed=seed)
    return cfg, weights, hf_decoder.build(family, cfg, weights)


@pytest.mark.parametrize("name", list(CASES))
def test_hf_decoder_matches_fp64_reference_and_our_decoder(name):
    cfg, weights, model = _built(name, seed=1)
    x = _inputs(1)
    out = _run(model, x)
    assert out.shape == (N, D) and out.dtype == torch.float32
    assert rel_error(out, reference_decoder(cfg, weights, x)) <= TOLERANCE
    assert rel_error(out, _run(MoEDecoder(cfg, weights), x)) <= TOLERANCE


# -------------------------------------------------------------------------------------------
# Planted mapping bugs: the built model changed as a wrong mapping would have built it


def _error_after(name: str, plant) -> float:
    cfg, weights, model = _built(name)
    x = _inputs(0)
    assert rel_error(_run(model, x), reference_decoder(cfg, weights, x)) <= TOLERANCE  # untouched: agrees
    with torch.no_grad():
        plant(model.model, cfg)
    return rel_error(_run(model, x), reference_decoder(cfg, weights, x))


def _modulo_query_heads(model, cfg) -> None:
    """Query head h reading KV head h mod G (interleaved) instead of h // (H/G) (repeated): the query heads
    reordered [0, 2, 1, 3] in q_proj's rows and o_proj's columns alike."""
    dh, order = cfg.head_dim, [0, 2, 1, 3]
    rows = [h * dh + i for h in order for i in range(dh)]
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj.weight.copy_(attn.q_proj.weight[rows])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows])


def _no_qk_norm(model, cfg) -> None:
    for layer in model.layers:
        layer.self_attn.q_norm = torch.nn.Identity()
        layer.self_attn.k_norm = torch.nn.Identity()


def _ungated_shared(model, cfg) -> None:
    """The shared expert's output added without its sigmoid gate (gate 0 → ½, down projection doubled)."""
    for layer in model.layers:
        layer.mlp.shared_expert_gate.weight.zero_()
        layer.mlp.shared_expert.down_proj.weight.mul_(2)


def _zeroed_shared(model, cfg) -> None:
    """The shared expert left zeroed, as the MoE-block adapter does (its global weights have none)."""
    for layer in model.layers:
        layer.mlp.shared_expert.down_proj.weight.zero_()


def _no_final_norm_scale(model, cfg) -> None:
    model.norm.weight.fill_(1.0)


PLANTS = {
    "gqa-interleaved-instead-of-repeated": ("mixtral-headdim6", _modulo_query_heads),
    "gqa-interleaved-qwen3": ("qwen3_moe-qknorm-head-dense-first-headdim6", _modulo_query_heads),
    "qk-norm-left-out-head": ("qwen3_moe-qknorm-head-dense-first-headdim6", _no_qk_norm),
    "qk-norm-left-out-full": ("olmoe-qknorm-full", _no_qk_norm),
    "shared-gate-left-out": ("qwen2_moe-shared-gated", _ungated_shared),
    "shared-expert-left-zeroed": ("qwen2_moe-two-shared-ungated", _zeroed_shared),
    "final-norm-scale-left-out": ("olmoe-qknorm-full", _no_final_norm_scale),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_planted_mapping_bug_fails_against_the_reference(plant):
    name, change = PLANTS[plant]
    assert _error_after(name, change) > PLANTED


# -------------------------------------------------------------------------------------------
# What a family cannot express: one line naming the field (no transformers needed)

REFUSALS = {
    "dense first block in mixtral": ("mixtral", _config("mixtral", dense_layers=1), "dense_layers = 1"),
    "shared experts outside qwen2_moe": ("qwen3_moe", _config("qwen3_moe", shared_experts=1), "shared_experts = 1"),
    "qk_norm the family lacks": ("mixtral", _config("mixtral", qk_norm="head"), 'qk_norm = "head": accepted "none"'),
    "per-head norm for olmoe": ("olmoe", _config("olmoe", qk_norm="head"), 'qk_norm = "head": accepted "full"'),
    "vocabulary": ("qwen3_moe", _config("qwen3_moe", vocab=11), "vocab = 11"),
    "olmoe head_dim off hidden / heads": ("olmoe", _config("olmoe", head_dim=6), "head_dim = 6"),
    "gelu experts": (
        "qwen2_moe",
        dataclasses.replace(_config("qwen2_moe"), moe=MoEConfig(D, 24, 4, top_k=2, activation="gelu")),
        'activation = "gelu"',
    ),
    "sigmoid router": (
        "olmoe",
        dataclasses.replace(_config("olmoe"), moe=MoEConfig(D, 24, 4, top_k=2, activation="swiglu", scoring="sigmoid")),
        "a router variant",
    ),
    "bfloat16": (  # HF routes in bf16, ours in fp32: a near-tie token would FAIL a correct model
        "mixtral",
        dataclasses.replace(
            _config("mixtral"),
            moe=MoEConfig(D, 24, 4, top_k=2, activation="swiglu", normalize_topk=True, dtype="bfloat16"),
        ),
        'dtype = "bfloat16": accepted "float32"',
    ),
    "sequence routing": (
        "mixtral",
        dataclasses.replace(
            _config("mixtral"),
            moe=MoEConfig(D, 24, 4, top_k=2, activation="swiglu", normalize_topk=True, granularity="sequence"),
        ),
        'granularity = "sequence"',
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_a_family_cannot_express_is_a_one_line_refusal(case):
    family, cfg, expected = REFUSALS[case]
    why = hf_decoder.refusal(family, cfg)
    assert expected in why and "\n" not in why
    with pytest.raises(ValueError, match=rf"^hf:{family} decoder cannot express this model: "):
        hf_decoder.build(family, cfg, decoder_weights(cfg))


def test_every_family_accepts_its_own_plain_config():
    for family in hf_decoder.FAMILIES:
        assert hf_decoder.refusal(family, _config(family)) == ""


# -------------------------------------------------------------------------------------------
# Kind equivalence with an hf: impl and the decoder keys

SCENARIO = """
[scenario]
name = "decoder"
kind = "equivalence"

[model]
hidden = 32
ffn_hidden = 16
num_experts = 4
top_k = 2
activation = "swiglu"
layers = {layers}
impl = "{impl}"
{decoder}

[routing]
normalize_topk = true

[workload]
tokens_per_rank = 12
"""
QWEN3 = 'attention_heads = 4\nkv_heads = 2\nqk_norm = "head"\ndense_layers = 1'


def _spec(tmp_path, impl="hf:qwen3_moe", decoder=QWEN3, layers=2):
    path = tmp_path / "decoder.toml"
    path.write_text(SCENARIO.format(impl=impl, decoder=decoder, layers=layers))
    return load(path).runs[0]


def test_equivalence_run_reports_the_hf_decoder_and_ours_against_the_reference(tmp_path):
    pytest.importorskip("transformers")
    spec = _spec(tmp_path)
    metrics, checks, details = kinds.evaluate(spec, [equivalence.impl_forward(spec)])
    assert [c["pass"] for c in checks] == [True, True], checks
    assert metrics["rel_error_forward"]["median"] <= TOLERANCE and metrics["rel_error_runtime"]["median"] <= TOLERANCE
    assert details["first_difference"] is None and details["layers"] == 2 and details["qk_norm"] == "head"
    assert spec.resolved()["model"]["qk_norm"] == "head"


def _good_outputs(spec) -> dict:
    """Our decoder's output as both implementations' (no transformers needed): both agree with the reference."""
    cfg, weights, x_ND = equivalence.impl_decoder.inputs(spec)
    out = _run(MoEDecoder(cfg, weights), x_ND)
    return {"out": out.clone(), "runtime_out": out.clone(), "impl": spec.model["impl"]}


def test_a_disagreeing_decoder_fails_naming_its_first_differing_position_without_crashing(tmp_path):
    spec = _spec(tmp_path)
    raw = _good_outputs(spec)
    raw["out"][7] += 0.5  # position 7 (and only it) off
    metrics, checks, details = kinds.evaluate(spec, [raw])
    assert [c["pass"] for c in checks] == [False, True]
    assert "first differs at position 7" in checks[0]["detail"] and details["first_difference"]["position"] == 7
    assert metrics["rel_error_forward"]["median"] > PLANTED and metrics["rel_error_runtime"]["median"] <= TOLERANCE


def test_a_decoder_output_of_the_wrong_shape_fails_with_both_shapes(tmp_path):
    spec = _spec(tmp_path)
    raw = _good_outputs(spec)
    raw["out"] = raw["out"][:-1]
    metrics, checks, _ = kinds.evaluate(spec, [raw])
    assert checks[0]["pass"] is False and "output shape (11, 32), reference (12, 32)" in checks[0]["detail"]
    assert "rel_error_forward" not in metrics and checks[1]["pass"] is True


@pytest.mark.parametrize(
    ("impl", "decoder", "layers", "refused"),
    [
        ("runtime", QWEN3, 2, 'accepted only with impl = "hf:<family>"'),
        ("python:m:f", QWEN3, 2, 'accepted only with impl = "hf:<family>"'),
        ("hf:deepseek_v3", QWEN3, 2, "is invalid with the decoder keys"),
        ("hf:mixtral", QWEN3, 2, 'cannot express this decoder: qk_norm = "head": accepted "none"'),
        ("hf:qwen3_moe", 'qk_norm = "head"', 2, "without attention_heads is invalid"),
        ("hf:qwen3_moe", "", 2, "[model] layers = 2 is invalid with [model] impl"),  # one MoE block: layers 1
        ("hf:qwen3_moe", QWEN3 + '\nrecompute = "layer"', 2, 'recompute = "layer" is invalid'),
    ],
)
def test_decoder_keys_in_equivalence_are_refused_in_one_line_unless_an_hf_decoder_can_take_them(
    tmp_path, impl, decoder, layers, refused
):
    with pytest.raises(ScenarioError) as err:
        _spec(tmp_path, impl, decoder, layers)
    assert "\n" not in str(err.value) and refused in str(err.value)


def test_the_decoder_scenarios_check_every_family_with_its_own_qk_norm():
    runs = [r for path in discover([REPO / "scenarios" / "real-models"]) for sc in load_file(path) for r in sc.runs]
    decoders = {(r.model["impl"], r.decoder_config().qk_norm) for r in runs if r.model.get("attention_heads")}
    assert {impl for impl, _ in decoders} == {f"hf:{f}" for f in hf_decoder.FAMILIES}
    assert all(qk == hf_decoder.QK_NORM[impl[3:]] for impl, qk in decoders)
    shared = [r for r in runs if r.model.get("shared_expert_gate")]
    assert [r.model["impl"] for r in shared] == ["hf:qwen2_moe"]
