"""Plans for published models: the plan model's parameter counts for real architectures (shared experts,
first dense layers, MLA, biases, sinks, q/k norms) against hand counts and against the figures each
model's authors published, and planted formula bugs that those figures catch."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_plan import write_plan

from moebench.cli import main
from moebench.plan import model as Mo
from moebench.plan.findings import findings
from moebench.plan.spec import load_plan

MODELS = Path(__file__).resolve().parent.parent / "scenarios" / "plans" / "models"

# file: (total, active, which active figure the source counts, the source). "active_params" counts the
# input embedding table whole; "active_params_without_embedding" leaves it out (keeping the LM head).
PUBLISHED = {
    "mixtral-8x7b.toml": (46.7e9, 12.9e9, "active_params", "https://mistral.ai/news/mixtral-of-experts/"),
    "deepseek-v3.toml": (
        671e9, 36.6e9, "active_params_without_embedding",
        "https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/README_WEIGHTS.md (36.6B incl. 0.9B output head)",
    ),
    "qwen3-235b-a22b.toml": (235e9, 22e9, "active_params", "https://huggingface.co/Qwen/Qwen3-235B-A22B"),
    "gpt-oss-120b.toml": (
        116.83e9, 5.13e9, "active_params_without_embedding", "arXiv 2508.10925 (gpt-oss model card), Table 1",
    ),
    "olmoe-1b-7b.toml": (6.9e9, 1.3e9, "active_params", "arXiv 2409.02060 (OLMoE), Table 1"),
}  # fmt: skip
TOLERANCE = 0.01
# OLMoE's "1.3B" active is rounded to two digits: the architecture gives 1.282B (−1.4 %), inside the
# rounding (1.25 to 1.35B) but not within 1 %. No counting convention closes the gap (without the input
# embedding it is 1.18B): the figure is checked against its own precision instead, ±0.05B.
ROUNDED = {("olmoe-1b-7b.toml", "active"): 0.05e9}


def _counts(path: Path) -> dict[str, float]:
    p = load_plan(str(path))
    figures = {
        "active_params": Mo.active_params(p),
        "active_params_without_embedding": Mo.active_params_without_embedding(p),
    }
    return {"total": Mo.total_params(p), **figures}


def _misses(name: str, counts: dict[str, float]) -> list[str]:
    """The published figures of ``name`` its counts miss (empty: all matched)."""
    total, active, convention, _ = PUBLISHED[name]
    out = []
    for what, published, computed in (("total", total, counts["total"]), ("active", active, counts[convention])):
        slack = ROUNDED.get((name, what), TOLERANCE * published)
        if abs(computed - published) > slack:
            out.append(f"{name} {what}: computed {computed:.4g}, published {published:.4g}")
    return out


def test_every_model_file_has_published_figures():
    assert sorted(path.name for path in MODELS.glob("*.toml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_plan_matches_the_published_parameter_counts_within_one_percent(name):
    assert _misses(name, _counts(MODELS / name)) == []


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_model_plan_loads_without_error_findings_and_declares_the_published_total(name):
    p = load_plan(str(MODELS / name))
    assert p.model.params == PUBLISHED[name][0]
    assert [f.code for f in findings(Mo.estimate(p)) if f.severity == "error"] == []


def _all_misses() -> list[str]:
    return [miss for name in PUBLISHED for miss in _misses(name, _counts(MODELS / name))]


def test_forgetting_the_shared_experts_misses_deepseek_v3(monkeypatch):
    monkeypatch.setattr(Mo, "shared_params", lambda p: 0)
    assert _all_misses() == ["deepseek-v3.toml active: computed 3.407e+10, published 3.66e+10"]


def test_forgetting_mla_down_projections_misses_deepseek_v3(monkeypatch):
    attention = Mo.attention_params

    def without_down_projections(p):
        m = p.model
        down = m.hidden * m.q_lora_rank + m.hidden * (m.kv_lora_rank + m.qk_rope_head_dim)
        return attention(p) - (down if m.attention == "mla" else 0)

    monkeypatch.setattr(Mo, "attention_params", without_down_projections)
    assert [miss.split(":")[0] for miss in _all_misses()] == ["deepseek-v3.toml active"]


def test_counting_dense_first_layers_as_moe_layers_misses_deepseek_v3(monkeypatch):
    monkeypatch.setattr(Mo, "dense_layer_params", Mo.layer_params)
    assert [miss.split(":")[0] for miss in _all_misses()] == ["deepseek-v3.toml total", "deepseek-v3.toml active"]


def test_counting_the_input_embedding_as_active_misses_gpt_oss(monkeypatch):
    monkeypatch.setattr(Mo, "active_params_without_embedding", Mo.active_params)
    assert [miss.split(":")[0] for miss in _all_misses()] == ["deepseek-v3.toml active", "gpt-oss-120b.toml active"]


def test_tied_embeddings_miss_qwen3_active(monkeypatch):
    monkeypatch.setattr(Mo, "embedding_params", lambda p: p.model.vocab * p.model.hidden)
    assert "qwen3-235b-a22b.toml active" in [miss.split(":")[0] for miss in _all_misses()]


# -------------------------------------------------------------------------------------------
# The new keys, counted by hand on test_plan's toy (L 2, d 4, h = kv 2, dh 2, F 8, E 4, k 2, V 10, gelu)


def test_shared_experts_and_dense_first_layers_match_the_hand_count(toy):
    p = toy(model__shared_experts=1, model__shared_ffn_hidden=6, model__first_k_dense=1, model__dense_ffn_hidden=16)
    assert Mo.shared_params(p) == 2 * 4 * 6 and Mo.dense_ffn_params(p) == 2 * 4 * 16
    assert Mo.layer_params(p) == 344 + 48 and Mo.dense_layer_params(p) == 64 + 128 + 8
    assert Mo.total_params(p) == 392 + 200 + 80 + 4
    assert Mo.active_params(p) == 676 - 1 * (4 - 2) * 64  # one MoE layer, two of four experts idle
    assert Mo.active_params_without_embedding(p) == 548 - 10 * 4
    assert Mo.matmul_flops_per_token(p) == 2 * (2 * 64 + (16 + 2 * 64 + 48) + 128)
    assert toy(model__shared_experts=2).model.shared_ffn_hidden == 8  # 0: ffn_hidden


def test_mla_matches_the_hand_count(toy):
    mla = dict(model__attention="mla", model__head_dim=None, model__q_lora_rank=3, model__kv_lora_rank=2,
               model__qk_nope_head_dim=2, model__qk_rope_head_dim=1, model__v_head_dim=3)  # fmt: skip
    p = toy(**mla)
    # query 4·3 + 3·2·(2+1) = 30; kv down 4·(2+1) = 12, up 2·2·(2+3) = 20; out 2·3·4 = 24; norms rq + rkv = 5
    assert (Mo.attention_params(p), Mo.attention_vector_params(p), p.model.head_dim) == (86, 5, 3)
    assert Mo.attention_params(toy(**(mla | {"model__q_lora_rank": None}))) == 4 * 2 * 3 + 12 + 20 + 24
    assert Mo.score_flops(p, 10) == 2 * 2 * 2 * (3 + 3) * 10  # 2·L·h·(dn + dr + dv)·c
    # one layer's attention: prefill decompresses the latent, 2·h·(dn + dr + dv)·c; decode reads it absorbed,
    # 2·h·(2·rkv + dr)·c (a planted per-head decode count reads 240 here)
    assert Mo.attention_flops(p, 10, "prefill") == 2 * 2 * (3 + 3) * 10
    assert Mo.attention_flops(p, 10, "decode") == 2 * 2 * (2 * 2 + 1) * 10
    assert Mo.attention_flops(toy(), 10, "decode") == Mo.attention_flops(toy(), 10, "prefill") == 2 * 2 * 4 * 10
    wide = toy(**mla, parallel__ep=2, parallel__tp=2)
    assert Mo.kv_values_per_token(wide) == 2 + 1  # the latent and the RoPE key, whole on each TP rank
    assert Mo.memory_per_gpu(wide).kv_cache == 2 * 10 * 2 * 3 * 2  # seqs · (S+O) · L · (rkv + dr) · b


def test_biases_sinks_and_norms_match_the_hand_count(toy):
    p = toy(model__attention_bias="qkvo", model__attention_sinks=True, model__qk_norm="head",
            model__router_bias=True, model__expert_bias=True, model__scoring="sigmoid")  # fmt: skip
    assert Mo.attention_vector_params(p) == (4 + 2 * 4 + 4) + 2 + 2 * 2  # biases, sinks, q/k norms
    assert Mo.router_params(p) == 16 + 4 and Mo.expert_bias_params(p) == 8 + 4
    assert Mo.total_params(p) == 2 * (344 + 22 + 4 + 4 * 12) + 80 + 4
    assert Mo.active_params(p) == 920 - 2 * (4 - 2) * (64 + 12)
    assert Mo.matmul_flops_per_token(p) == Mo.matmul_flops_per_token(toy())  # vectors add no matmul FLOPs
    assert Mo.attention_vector_params(toy(model__qk_norm="full", model__attention_bias="qkv")) == 8 + 12


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model__attention": "mla", "model__head_dim": None}, '[model] kv_lora_rank is missing with attention ='),
        ({"model__kv_lora_rank": 4}, '[model] kv_lora_rank = 4 is invalid with attention = "gqa"'),
        ({"model__attention": "mla", "model__kv_lora_rank": 2, "model__qk_nope_head_dim": 2,
          "model__qk_rope_head_dim": 1, "model__v_head_dim": 2}, "[model] head_dim = 2 is invalid"),
        ({"model__head_dim": None}, '[model] head_dim is missing with attention = "gqa"'),
        ({"model__first_k_dense": 1}, "[model] dense_ffn_hidden is missing with first_k_dense = 1"),
        ({"model__first_k_dense": 2, "model__dense_ffn_hidden": 8}, "[model] first_k_dense = 2 is invalid"),
        ({"model__qk_norm": "yes"}, '[model] qk_norm = "yes" is invalid: accepted one of "none", "head", "full"'),
    ],
)  # fmt: skip
def test_bad_architecture_keys_are_one_line_exit_2(tmp_path, capsys, overrides, message):
    path = write_plan(tmp_path, **overrides)
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and str(path) in err and "\n" not in err


@pytest.fixture
def toy(tmp_path):
    def make(**overrides):
        return load_plan(str(write_plan(tmp_path, **overrides)))

    return make
