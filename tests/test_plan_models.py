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
from moebench.plan.spec import human, load_plan

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
# OLMoE publishes its active count only to two digits: "1.3B" (the paper's Table 1), "1.2B" (the model card's
# first revision, https://huggingface.co/allenai/OLMoE-1B-7B-0924/commit/ed327d854e37dff51c17b5676badbf220bdf163b)
# and "1B" (the card now); no exact count was found. The architecture gives 1.282B with the input embedding
# (1.3B to two digits, −1.4 % of 1.3B) and 1.180B without it (1.2B: the card's first figure). 1 % of a
# two-digit figure is finer than the figure itself, so the bound is the source's own precision: ±0.05B,
# half a unit of its last digit. Nothing in the count is changed to reach 1.3B.
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


def test_olmoe_active_count_rounds_to_each_published_two_digit_figure():
    counts = _counts(MODELS / "olmoe-1b-7b.toml")
    # to the two digits OLMoE publishes: 1.3B with the input embedding (the paper), 1.2B without (the first card)
    assert round(counts["active_params"] / 1e8) == 13 and round(counts["active_params_without_embedding"] / 1e8) == 12
    assert round(counts["total"] / 1e8) == 69  # 6.9B
    # by hand, each layer: attention 4·d² = 16777216, q/k norms 2·d = 4096, k·3·d·F = 8·6291456, router d·E = 131072,
    # norms 2·d = 4096; 16 layers, then embedding and LM head 2·V·d = 206045184 and the final norm d = 2048
    layer = 16777216 + 4096 + 8 * 6291456 + 131072 + 4096
    assert counts["active_params"] == 16 * layer + 206045184 + 2048 == 1_282_017_280  # 1.4 % under 1.3B
    # a count 1 % off either way would round alike, so the 1 % check cannot be made against "1.3B": the slack
    # is half its last digit, and a count off by more than that fails
    assert _misses("olmoe-1b-7b.toml", {**counts, "active_params": 1.2499e9}) == [
        "olmoe-1b-7b.toml active: computed 1.25e+09, published 1.3e+09"
    ]


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


MLA = dict(model__attention="mla", model__head_dim=None, model__q_lora_rank=3, model__kv_lora_rank=2,
           model__qk_nope_head_dim=2, model__qk_rope_head_dim=1, model__v_head_dim=3)  # fmt: skip


def test_mla_matches_the_hand_count(toy):
    mla = MLA
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
        (MLA | {"model__attention_bias": "qkv"}, '[model] attention_bias = "qkv" is invalid with attention = "mla": '
         'accepted "none" (MLA norms its query and key/value latents'),
        (MLA | {"model__qk_norm": "head"}, '[model] qk_norm = "head" is invalid with attention = "mla": accepted'),
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


# -------------------------------------------------------------------------------------------
# Per-GPU bytes with biases, dense first layers in the time model (toy as above)


def test_memory_per_gpu_holds_the_biases_worked_by_hand(toy):
    biased = dict(model__expert_bias=True, model__router_bias=True, model__attention_bias="qkvo")
    p = toy(**biased, parallel__ep=2, parallel__tp=2)
    # each expert on a GPU: m·d·F/TP = 64/2 = 32, its input bias (m − 1)·F/TP = 8/2 = 4 and output bias d = 4
    assert Mo.expert_params_per_gpu(p) == 32 + 4 + 4
    mem = Mo.memory_per_gpu(p)
    assert mem.weights_experts == 2 * 2 * 40 * 2  # L · E/EP · 40 · b (without the biases: 256)
    # L · (attn/TP 32 + its q/k/v biases (h·dh + 2·kv·dh)/TP = 12/2 and o bias d = 4 + norms 2·d = 8 + router
    # d·E + E = 20) · b: the q/k/v biases are sharded with their heads, the o bias is whole
    assert mem.weights_dense == 2 * (32 + 6 + 4 + 8 + 20) * 2
    plain = Mo.memory_per_gpu(toy(parallel__ep=2, parallel__tp=2))
    assert (plain.weights_experts, plain.weights_dense) == (2 * 2 * 32 * 2, 2 * (32 + 8 + 16) * 2)
    # decode reads each of the 2 local experts' biases too (2 tokens · k 2 = 4 rows ≥ 2 experts): 2 · 8 · b more
    with_bias = Mo.decode(toy(model__expert_bias=True, parallel__ep=2, parallel__tp=2)).layer.bytes
    assert with_bias - Mo.decode(toy(parallel__ep=2, parallel__tp=2)).layer.bytes == 2 * 8 * 2


def test_dense_first_layers_are_timed_as_a_dense_ffn_without_routing_or_all_to_all(toy):
    p = toy(model__first_k_dense=1, model__dense_ffn_hidden=16, parallel__ep=2)  # 2 sequences per data rank
    pre = Mo.prefill(p)
    # 16 prompt tokens at 500 FLOP/s. dense layer: 16·2·(attn 64 + m·d·Fd 128) = 6144, scores 16·2·h·(dh + dv)·S/2
    # = 1024, no router, no all-to-all; MoE layer: 16·2·(64 + d·E 16) = 2560, 1024, experts 32 rows · 2·64 = 4096,
    # and two all-to-alls of 0.5 + 128/64 s
    assert pre.dense_layer.flops == 6144 + 1024 and pre.dense_layer.a2a.total == 0
    assert pre.dense_layer.total == pytest.approx(7168 / 500)
    assert pre.layer.total == pytest.approx(7680 / 500 + 2 * 2.5)
    # TTFT: one stage of one dense and one MoE layer (timed as two MoE layers: 40.72 s), then the LM head 2·2·V·d
    assert pre.total == pytest.approx(7168 / 500 + 7680 / 500 + 5 + 2 * 2 * 10 * 4 / 500)
    dec = Mo.decode(p)  # 2 tokens at context S + O/2 = 9: 2·2·192 + 2·2·2·4·9
    assert dec.dense_layer.flops == 768 + 288 and dec.dense_layer.a2a.total == 0
    assert dec.stage == pytest.approx(dec.layer.total + dec.dense_layer.total + Mo.lm_head_time(p, 2))
    assert Mo.prefill(toy(parallel__ep=2)).dense_layer is None


def test_the_busiest_pipeline_stage_sets_the_time_with_dense_first_layers(toy):
    # PP 2: stage 0 holds the dense layer, stage 1 the MoE layer; the slower of the two sets the stage time
    narrow = toy(model__first_k_dense=1, model__dense_ffn_hidden=16, parallel__ep=2, parallel__pp=2)
    pre = Mo.prefill(narrow)
    assert pre.layer.total > pre.dense_layer.total and pre.stage == pytest.approx(pre.layer.total + pre.send.total)
    wide = toy(model__first_k_dense=1, model__dense_ffn_hidden=256, parallel__ep=2, parallel__pp=2)
    pre = Mo.prefill(wide)  # a dense FFN of 2·4·256 = 2048 weights: now the dense stage is the slower
    assert pre.dense_layer.total > pre.layer.total
    assert pre.stage == pytest.approx(pre.dense_layer.total + pre.send.total)


def test_deepseek_v3_dense_layers_add_no_all_to_all_to_its_ttft():
    p = load_plan(str(MODELS / "deepseek-v3.toml"))
    pre = Mo.prefill(p)
    assert pre.dense_layer.a2a.total == 0 < pre.layer.a2a.total
    # 61 layers on one stage: 58 MoE and 3 dense ones, not 61 MoE layers
    assert pre.stage == pytest.approx(58 * pre.layer.total + 3 * pre.dense_layer.total)
    assert pre.stage < 61 * pre.layer.total


# -------------------------------------------------------------------------------------------
# A serve run's decoder as a plan: its dense layers, shared experts and scoring carry over


def test_a_serve_runs_dense_layers_shared_experts_and_scoring_carry_into_its_plan(tmp_path):
    from test_calibrate_serve import serve_run

    from moebench.plan import serve_runs as SR

    base = load_plan(str(write_plan(tmp_path)))
    run = serve_run(world=2, layers=3, dense_layers=1, shared_experts=2)
    run["config"]["routing"]["scoring"] = "sigmoid"
    p = SR.plan_for_serve_run(base, run, "decode")
    m = p.model
    # the decoder: a dense FFN of width top_k·F = 2·512 in its first block, a shared FFN of width n·F = 2·512
    assert (m.first_k_dense, m.dense_ffn_hidden, m.shared_experts, m.shared_ffn_hidden) == (1, 1024, 2, 512)
    assert (m.scoring, m.attention, m.attention_bias, m.qk_norm, m.expert_bias, m.router_bias) == (
        "sigmoid", "gqa", "none", "none", False, False)  # fmt: skip
    assert Mo.shared_params(p) == 2 * 256 * (2 * 512)  # m·d·(n·F), the decoder's shared FFN
    dec = Mo.decode(p)
    assert dec.dense_layer.a2a.total == 0 < dec.layer.a2a.total
    assert (
        SR.predicted(base, run, "decode")
        == dec.total
        == pytest.approx(
            2 * dec.layer.total + dec.dense_layer.total + dec.send.total + Mo.lm_head_time(p, p.workload.batch // 2)
        )
    )
    all_dense = SR.plan_for_serve_run(base, serve_run(world=2, layers=2, dense_layers=2), "prefill")
    assert all_dense.model.moe_layers == 0 and Mo.prefill(all_dense).stage == pytest.approx(
        2 * Mo.prefill(all_dense).dense_layer.total
    )
    normed = serve_run(world=2, layers=3)
    normed["config"]["model"]["qk_norm"] = "full"  # the decoder's q/k norm: (H + G)·Dh scales per layer
    full = SR.plan_for_serve_run(base, normed, "decode")
    plain = SR.plan_for_serve_run(base, serve_run(world=2, layers=3), "decode")
    assert full.model.qk_norm == "full" and plain.model.qk_norm == "none"
    m = full.model
    assert Mo.attention_vector_params(full) - Mo.attention_vector_params(plain) == (m.heads + m.kv_heads) * m.head_dim
    with pytest.raises(ValueError, match=r"run\.config\.model\.dense_layers = 3 is invalid: accepted an integer "
                                         r"from 0 to layers = 2"):  # fmt: skip
        SR.plan_for_serve_run(base, serve_run(layers=2, dense_layers=3), "prefill")


# -------------------------------------------------------------------------------------------
# What `moebench plan` prints for each model


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_moebench_plan_prints_parameters_memory_per_gpu_and_flops_per_token(name, capsys):
    path = MODELS / name
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    e = Mo.estimate(load_plan(str(path)))
    for key in ("params", "active_params", "active_params_without_embedding", "memory_per_gpu", "flops_per_token"):
        row = next(line for line in out.splitlines() if line.split()[:1] == [key])
        assert row.split(None, 1)[1].startswith(human(e[key], e.figures[key].unit)), row
