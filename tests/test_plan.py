"""The deployment-plan validator: formulas against hand-worked examples, monotonicity properties,
findings on deliberately broken plans, malformed files, search and the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moebench.cli import main
from moebench.plan import model as Mo
from moebench.plan import search as S
from moebench.plan.findings import findings, unit_slip
from moebench.plan.spec import PlanError, load_plan, parse_quantity

SEED = Path(__file__).resolve().parent.parent / "scenarios" / "plans" / "seed-002.toml"

# A toy plan small enough to work out by hand (the numbers in the tests below).
# attention 2·d·h·dh + 2·d·kv·dh = 32 + 32 = 64; one expert m·d·F = 2·4·8 = 64;
# layer = 64 + 4·64 + d·E 16 + 2·d 8 = 344; embedding V·d·2 = 80; total = 2·344 + 80 + d 4 = 772.
TOY = {
    "plan": {"name": "toy"},
    "model": {"layers": 2, "hidden": 4, "heads": 2, "head_dim": 2, "ffn_hidden": 8, "experts": 4, "top_k": 2,
              "vocab": 10, "precision": "fp16"},
    "hardware": {"peak_flops": 1000, "mfu": 0.5, "memory_bandwidth": 1e12, "memory_bandwidth_efficiency": 1.0,
                 "memory": "1 GB", "gpus_per_node": 8, "intra_node_bandwidth": 64, "intra_node_latency": 0.5,
                 "inter_node_bandwidth": 16, "inter_node_latency": 2},
    "workload": {"batch": 4, "seq_len_max": 8, "output_tokens": 2},
    "parallel": {"ep": 1, "tp": 1, "pp": 1, "dp": 1},
}  # fmt: skip


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_plan(tmp_path: Path, doc: dict | None = None, name: str = "plan.toml", **overrides) -> Path:
    """TOY with ``section__key=value`` overrides (None deletes the key) written as TOML."""
    doc = json.loads(json.dumps(doc or TOY))
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        table = doc.setdefault(section, {})
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) for section, table in doc.items()
    )
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def toy(tmp_path):
    def make(**overrides):
        return load_plan(str(write_plan(tmp_path, **overrides)))

    return make


def codes(plan) -> dict[str, str]:
    return {f.code: f.severity for f in findings(Mo.estimate(plan))}


# -------------------------------------------------------------------------------------------
# Formulas, worked by hand


def test_parameter_counts_match_the_hand_count(toy):
    p = toy()
    assert Mo.attention_params(p) == 64 and Mo.expert_params(p) == 64 and Mo.layer_params(p) == 344
    assert Mo.total_params(p) == 772
    assert Mo.active_params(p) == 772 - 2 * (4 - 2) * 64  # two of four experts idle in each layer
    assert toy(model__activation="swiglu").model.expert_matrices == 3
    assert Mo.total_params(toy(model__tie_embeddings=True)) == 772 - 40


def test_flops_per_token_match_the_hand_count(toy):
    p = toy()
    assert Mo.matmul_flops_per_token(p) == 2 * 2 * (64 + 16 + 2 * 64)  # 2·L·(attn + d·E + k·m·d·F)
    assert Mo.score_flops(p, 10) == 4 * 2 * 2 * 2 * 10  # 4·L·h·dh·c


def test_memory_per_gpu_matches_the_hand_count(toy):
    p = toy(parallel__ep=2)  # 2 sequences per data rank, 2 local experts, M = PP = 1
    mem = Mo.memory_per_gpu(p)
    assert mem.weights_dense == 2 * (64 + 16 + 8) * 2  # L/PP · (attn/TP + router + norms) · b
    assert mem.weights_experts == 2 * 2 * 64 * 2  # L/PP · E/EP · m·d·F · b
    assert mem.weights_embedding == 2 * 10 * 4 * 2  # embedding and LM head on the one stage
    assert mem.kv_cache == 2 * 10 * 2 * 2 * 2 * 2 * 2  # seqs · (S+O) · L · 2 · kv · dh · b
    # T = 2·8 = 16 prompt tokens, R = T·k = 32 expert rows, q/k/v = (h + 2·kv)·dh = 12
    assert mem.activations == 2 * (16 * (2 * 4 + 12) + 32 * (4 + 2 * 8))
    assert mem.comm_buffers == 2 * 4 * (16 * 2 + 32)
    assert mem.total == 1024 + 640 + 1920 + 512


def test_all_to_all_alpha_beta_over_the_right_link(toy):
    # busiest rank receives tokens·k·load·d·b/TP = 16·2·1·4·2 = 256 B, half of it from the other rank
    t = Mo.all_to_all(toy(parallel__ep=2), 16)
    assert (t.bytes, t.link, t.total) == (128, "intra-node", 0.5 + 128 / 64)
    # 4 ranks, one per node: every remote byte crosses nodes
    t = Mo.all_to_all(toy(parallel__ep=4, hardware__gpus_per_node=1), 16)
    assert (t.bytes, t.link, t.total) == (192, "inter-node", 2 + 192 / 16)
    # 4 ranks, two per node: one peer of three is local; the inter-node part is the slower one
    t = Mo.all_to_all(toy(parallel__ep=4, hardware__gpus_per_node=2), 16)
    assert t.total == pytest.approx(2 + max(64 / 64, 128 / 16))
    assert Mo.all_to_all(toy(), 16).total == 0  # EP 1 sends nothing


def test_skew_and_capacity_set_the_busiest_rank_bytes(toy):
    base = Mo.all_to_all(toy(parallel__ep=2), 16).bytes
    assert Mo.all_to_all(toy(parallel__ep=2, workload__routing_skew=1.5), 16).bytes == 1.5 * base
    capped = toy(parallel__ep=2, workload__routing_skew=1.5, parallel__capacity_factor=1.25)
    assert Mo.load_factor(capped) == 1.25 and Mo.all_to_all(capped, 16).bytes == 1.25 * base


def test_tp_all_reduce_is_a_ring(toy):
    t = Mo.tp_all_reduce(toy(parallel__tp=2), 16)  # 16 tokens · d 4 · b 2 = 128 B
    assert t.total == pytest.approx(2 * 1 * 0.5 + 2 * 1 / 2 * 128 / 64)
    t = Mo.tp_all_reduce(toy(parallel__tp=2, hardware__gpus_per_node=1), 16)
    assert t.link == "inter-node" and t.total == pytest.approx(2 * 2 + 128 / 16)


def test_ttft_tpot_and_throughput_match_the_hand_count(toy):
    p = toy()  # one GPU, no communication, memory far faster than compute
    e = Mo.estimate(p)
    # prefill, 32 tokens per layer: dense 32·2·(64+16) = 5120, scores 32·4·h·dh·(S/2) = 2048,
    # experts 64 rows · 2·64 = 8192 FLOP at 500 FLOP/s; two layers, then the LM head 4·2·V·d = 320
    assert e["ttft"] == pytest.approx(2 * (5120 + 2048 + 8192) / 500 + 320 / 500)
    # decode, 4 tokens at context S + O/2 = 9: 4·2·80 + 4·4·4·9 + 8·128 = 2240 FLOP per layer
    assert e["tpot"] == pytest.approx(2 * 2240 / 500 + 4 * 80 / 500)
    assert e["throughput_per_gpu"] == pytest.approx(4 * (8 + 2) / (e["ttft"] + 2 * e["tpot"]))
    assert e.prefill.layer.compute > 1e6 * e.prefill.layer.memory  # the example is compute-bound


def test_pipeline_bubble_and_round_time(toy):
    e = Mo.estimate(toy(parallel__pp=2, workload__microbatches=4))
    assert e["pipeline_bubble"] == pytest.approx(1 / 5)
    assert e["ttft"] == pytest.approx((4 + 2 - 1) * e.prefill.stage + Mo.lm_head_time(e.plan, 4))
    assert e["tpot"] == pytest.approx(4 * e.decode.stage)  # M ≥ PP: a round is M stage times
    assert Mo.estimate(toy(parallel__pp=2, workload__microbatches=1))["tpot"] == pytest.approx(
        2 * Mo.estimate(toy(parallel__pp=2, workload__microbatches=1)).decode.stage
    )


def test_gemm_efficiency_falls_with_few_rows(toy):
    p = toy(hardware__gemm_half_rows=32)
    assert Mo.gemm_efficiency(p, 32) == pytest.approx(0.25) and Mo.gemm_efficiency(p, 1e9) == pytest.approx(0.5)
    assert Mo.gemm_efficiency(toy(), 1) == 0.5


def test_units_convert_to_canonical():
    assert parse_quantity("100 tokens/ms", "token_rate") == 1e5
    assert parse_quantity("1.8 TBps", "bandwidth") == 1.8e12
    assert parse_quantity("400 Gbit/s", "bandwidth") == 5e10
    assert parse_quantity("400 TFlops", "flop_rate") == 4e14
    assert parse_quantity("64 GiB", "bytes") == 64 * 2**30
    assert parse_quantity("10 us", "time") == pytest.approx(1e-5)
    for bad in ("10 parsecs", "fast", "-1 s", True, float("nan"), "64 gb"):
        assert parse_quantity(bad, "time" if bad != "64 gb" else "bytes") is None


# -------------------------------------------------------------------------------------------
# Properties


degrees = st.fixed_dictionaries({"ep": st.sampled_from([1, 2, 4]), "tp": st.sampled_from([1, 2]),
                                 "pp": st.sampled_from([1, 2]), "dp": st.sampled_from([1, 2])})  # fmt: skip
shapes = st.fixed_dictionaries({
    "batch": st.integers(8, 64), "seq_len_max": st.integers(16, 4096), "output_tokens": st.integers(1, 512),
    "routing_skew": st.floats(1.0, 4.0), "capacity_factor": st.sampled_from([0.0, 1.0, 1.25, 2.0]),
    "gpus_per_node": st.sampled_from([1, 2, 4, 8]),
})  # fmt: skip


def _plan(tmp_path_factory, shape: dict, deg: dict):
    path = write_plan(
        tmp_path_factory.mktemp("p"),
        workload__batch=shape["batch"], workload__seq_len_max=shape["seq_len_max"],
        workload__output_tokens=shape["output_tokens"], workload__routing_skew=shape["routing_skew"],
        parallel__capacity_factor=shape["capacity_factor"], hardware__gpus_per_node=shape["gpus_per_node"],
        hardware__memory_bandwidth=1e6, hardware__peak_flops=1e9,
        **{f"parallel__{k}": v for k, v in deg.items()},
    )  # fmt: skip
    return load_plan(str(path))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, deg=degrees, which=st.sampled_from(["ep", "tp", "pp", "dp"]))
def test_more_gpus_never_raise_memory_per_gpu(tmp_path_factory, shape, deg, which):
    p = _plan(tmp_path_factory, shape, deg)
    bigger = p.with_parallel(**{which: deg[which] * 2})
    assert Mo.memory_per_gpu(bigger).total <= Mo.memory_per_gpu(p).total


@settings(max_examples=60, deadline=None)
@given(shape=shapes, deg=degrees, more=st.floats(0.0, 3.0), tokens=st.integers(1, 10**6))
def test_higher_skew_never_lowers_all_to_all_time(tmp_path_factory, shape, deg, more, tokens):
    p = _plan(tmp_path_factory, shape, deg)
    skewed = replace(p, workload=replace(p.workload, routing_skew=p.workload.routing_skew + more))
    assert Mo.all_to_all(skewed, tokens).total >= Mo.all_to_all(p, tokens).total
    assert Mo.estimate(skewed)["ttft"] >= Mo.estimate(p)["ttft"]


@settings(max_examples=60, deadline=None)
@given(shape=shapes, deg=degrees)
def test_doubling_bandwidth_never_slows_a_plan(tmp_path_factory, shape, deg):
    p = _plan(tmp_path_factory, shape, deg)
    hw = p.hardware
    faster = p.with_hardware(
        memory_bandwidth=2 * hw.memory_bandwidth,
        intra_node_bandwidth=2 * hw.intra_node_bandwidth,
        inter_node_bandwidth=2 * hw.inter_node_bandwidth,
    )
    before, after = Mo.estimate(p), Mo.estimate(faster)
    assert after["ttft"] <= before["ttft"] and after["tpot"] <= before["tpot"]
    assert after["throughput_per_gpu"] >= before["throughput_per_gpu"]
    for one in ("memory_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
        alone = Mo.estimate(p.with_hardware(**{one: 2 * getattr(hw, one)}))
        assert alone["ttft"] <= before["ttft"] and alone["tpot"] <= before["tpot"]


# -------------------------------------------------------------------------------------------
# Findings on broken plans


def test_a_sound_plan_has_no_errors(toy):
    assert "error" not in codes(toy(model__params=772))


def test_declared_parameters_the_architecture_cannot_produce(toy):
    found = {f.code: f for f in findings(Mo.estimate(toy(model__params=772_000)))}
    assert found["params.impossible"].severity == "error"
    assert found["params.impossible"].numbers["ratio"] == pytest.approx(1000)
    assert "exactly ×1000" in found["params.impossible"].message
    assert "params.impossible" not in codes(toy(model__params=800))  # within 10 %
    # vocab left out, and an embedding of a plausible vocabulary closes the gap: a warning
    near = {f.code: f for f in findings(Mo.estimate(toy(model__vocab=0, model__params=692 + 8 * 30_000)))}
    assert near["params.impossible"].severity == "warning"
    assert near["params.impossible"].numbers["vocab_needed"] == pytest.approx(30_000)


def test_gpu_count_disagreeing_with_the_degrees(toy):
    found = {f.code: f for f in findings(Mo.estimate(toy(parallel__ep=2, parallel__pp=2, claims__gpus=8)))}
    assert found["gpus.mismatch"].severity == "error"
    assert found["gpus.mismatch"].numbers == {"claimed": 8, "derived": 4, "ratio": 2.0}
    assert "gpus.mismatch" not in codes(toy(parallel__ep=2, claims__gpus=2))


def test_memory_that_does_not_fit(toy):
    total = Mo.memory_per_gpu(toy()).total
    found = {f.code: f for f in findings(Mo.estimate(toy(hardware__memory=total - 1)))}
    assert found["memory.overflow"].severity == "error" and found["memory.overflow"].numbers["memory_per_gpu"] == total
    assert codes(toy(hardware__memory=total / 0.95)).get("memory.tight") == "warning"
    assert not {"memory.overflow", "memory.tight"} & codes(toy(hardware__memory=total * 2)).keys()


def test_capacity_settings_that_must_drop_tokens(toy):
    found = {f.code: f for f in findings(Mo.estimate(toy(parallel__capacity_factor=0.8)))}
    assert found["capacity.drops"].numbers["dropped_fraction_at_least"] == pytest.approx(0.2)
    found = {f.code: f for f in findings(Mo.estimate(toy(parallel__capacity_factor=1.2, workload__routing_skew=2.0)))}
    assert found["capacity.drops"].numbers["dropped_fraction_at_least"] == pytest.approx((2.0 - 1.2) / 4)
    assert "capacity.drops" not in codes(toy(parallel__capacity_factor=1.2, workload__routing_skew=1.2))
    # a load-CV SLO of 0.2 over 4 experts allows the busiest up to 1 + 0.2·√3 = 1.35× the mean
    may = {f.code: f for f in findings(Mo.estimate(toy(parallel__capacity_factor=1.2, slo__max_load_cv=0.2)))}
    assert may["capacity.may_drop"].numbers["max_imbalance_allowed"] == pytest.approx(1 + 0.2 * math.sqrt(3))
    assert "capacity.may_drop" not in codes(toy(parallel__capacity_factor=1.5, slo__max_load_cv=0.2))


def test_slos_not_met(toy):
    e = Mo.estimate(toy())
    found = codes(toy(slo__ttft=e["ttft"] / 2, slo__tpot=e["tpot"] * 2, slo__throughput_per_gpu=1e9))
    assert found["slo.ttft"] == "error" and found["slo.throughput_per_gpu"] == "error" and "slo.tpot" not in found


def test_claims_off_by_a_unit_slip_or_a_margin(toy):
    e = Mo.estimate(toy())
    tput_per_ms = e["throughput_per_gpu"] / 1e3
    # the derived figure in tokens/s, written as tokens/ms: exactly ×1000
    found = {
        f.code: f for f in findings(Mo.estimate(toy(claims__throughput_per_gpu=f"{e['throughput_per_gpu']} tokens/ms")))
    }
    f = found["claim.throughput_per_gpu"]
    assert f.severity == "error" and f.numbers["ratio"] == pytest.approx(1000) and "exactly ×1000" in f.message
    assert "claim.throughput_per_gpu" not in codes(toy(claims__throughput_per_gpu=f"{tput_per_ms * 1.1} tokens/ms"))
    # a pessimistic TTFT claim is a warning, an optimistic one beyond 2× an error
    assert codes(toy(claims__ttft=e["ttft"] * 3))["claim.ttft"] == "warning"
    assert codes(toy(claims__ttft=e["ttft"] / 3))["claim.ttft"] == "error"
    assert codes(toy(claims__weights_total=f"{772 * 2 * 3} B"))["claim.weights_total"] == "error"


def test_unit_slip_names_the_factor():
    assert unit_slip(1000.0).startswith("exactly ×1000")
    assert unit_slip(1 / 1000).startswith("exactly 1/×1000")
    assert unit_slip(8.0).startswith("exactly ×8")
    assert "possibly" in unit_slip(700.0)
    assert unit_slip(3.0) == "" and unit_slip(float("nan")) == ""


def test_indivisible_degrees_and_idle_ranks(toy):
    found = codes(toy(parallel__ep=3))
    assert found["degrees.indivisible"] == "error"
    assert codes(toy(parallel__dp=8))["degrees.idle_ranks"] == "error"  # 4 sequences over 8 data ranks
    assert codes(toy(parallel__ep=4, workload__batch=6))["degrees.uneven_batch"] == "warning"


def test_the_seed_plan_is_caught_on_its_known_errors():
    e = Mo.estimate(load_plan(str(SEED)))
    found = {f.code: f for f in findings(e)}
    assert found["gpus.mismatch"].numbers == {"claimed": 512, "derived": 256, "ratio": 2.0}
    assert found["params.impossible"].numbers["ratio"] == pytest.approx(1e10 / e["params"])
    slip = found["claim.compute_bound_throughput_per_gpu"]
    assert slip.numbers["claimed"] / slip.numbers["from_own_claims"] == pytest.approx(1000)
    assert "exactly ×1000" in slip.message
    assert found["slo.throughput_per_gpu"].severity == "error"
    assert e["params"] == 16 * (2 * 512 * 512 * 2 + 16 * 2 * 512 * 1024 + 512 * 16 + 2 * 512) + 512


# -------------------------------------------------------------------------------------------
# Malformed plan files


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"hardware__peak_flops": "400 parsecs"}, '[hardware] peak_flops = "400 parsecs" is invalid: accepted'),
        ({"model__layers": 0}, "[model] layers = 0 is invalid: accepted an integer from 1 to 1e9"),
        ({"model__layers": None}, "[model] layers is missing"),
        ({"model__colour": "red"}, "[model] colour is not a known key: accepted layers"),
        ({"hardware__mfu": 1.5}, "[hardware] mfu = 1.5 is invalid: accepted a number from 1e-30 to 1"),
        ({"model__top_k": 5}, "[model] top_k = 5 is invalid: accepted at most experts = 4"),
        ({"workload__seq_len_min": 9}, "[workload] seq_len_min = 9 is invalid: accepted at most seq_len_max = 8"),
        ({"plan__assumed": ["model.vocabulary"]}, '[plan] assumed names "model.vocabulary"'),
        ({"model__precision": "fp64"}, '[model] precision = "fp64" is invalid: accepted one of "fp32"'),
        ({"parallel__capacity_factor": 9.0}, "[parallel] capacity_factor = 9.0 is invalid"),
    ],
)
def test_malformed_plans_give_one_line_errors(tmp_path, overrides, expected):
    path = write_plan(tmp_path, **overrides)
    with pytest.raises(PlanError) as err:
        load_plan(str(path))
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_unreadable_plan_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[plan\nname = 1")
    with pytest.raises(PlanError, match="not valid TOML"):
        load_plan(str(bad))
    with pytest.raises(PlanError, match="cannot be read"):
        load_plan(str(tmp_path / "missing.toml"))
    doc = {k: v for k, v in TOY.items() if k != "hardware"}
    with pytest.raises(PlanError, match=r"\[hardware\] is missing"):
        load_plan(str(write_plan(tmp_path, doc)))
    with pytest.raises(PlanError, match=r"\[hardwear\] is not a known section"):
        load_plan(str(write_plan(tmp_path, {**TOY, "hardwear": {"x": 1}})))


# -------------------------------------------------------------------------------------------
# Search


def test_search_finds_the_fewest_gpus_that_fit_in_memory(toy):
    two = Mo.memory_per_gpu(toy(parallel__ep=2)).total  # EP 2 halves the experts and the sequences per GPU
    assert Mo.memory_per_gpu(toy()).total > two
    p = toy(hardware__memory=two)
    result = S.search(p, top=3)
    best = result.best[0]
    assert best.gpus == 2 and best.feasible
    assert best.binds().startswith("memory")
    assert result.smaller_failures["memory.overflow"] == 1  # the one 1-GPU assignment
    assert all(a.gpus >= 2 for a in result.best)
    assert [a.gpus for a in result.best] == sorted(a.gpus for a in result.best)


def test_search_names_the_binding_slo(toy):
    e = Mo.estimate(toy())
    result = S.search(toy(slo__ttft=e["ttft"] / 3))  # one GPU is too slow; more must share the prompt
    best = result.best[0]
    assert best.gpus > 1 and best.estimate["ttft"] <= e["ttft"] / 3
    assert result.smaller_failures["slo.ttft"] >= 1
    assert "ttft" in best.binds() or "memory" in best.binds()


def test_search_reports_when_nothing_meets_the_slos(toy):
    doc = S.to_json(S.search(toy(slo__ttft=1e-12), max_gpus=16))
    assert doc["answers"] == [] and doc["fewer_gpus_fail_on"]["slo.ttft"] == doc["tried"]
    assert "none of" in S.render(doc)


# -------------------------------------------------------------------------------------------
# CLI


def test_cli_exit_codes_and_json(tmp_path, capsys):
    assert main(["plan", str(SEED)]) == 1  # the seed has errors
    out = capsys.readouterr().out
    assert "gpus.mismatch" in out and "exactly ×1000" in out
    clean = write_plan(tmp_path)
    assert main(["plan", str(clean), "--json", str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["schema"] == "moebench.plan/1" and doc["errors"] == 0
    assert doc["figures"]["params"]["value"] == 772 and "L·(" in doc["figures"]["params"]["formula"]
    capsys.readouterr()
    assert main(["plan", str(SEED), "--json", "-", "--search", "--top", "2"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert {f["code"] for f in doc["findings"]} >= {"gpus.mismatch", "params.impossible"}
    assert len(doc["search"]["answers"]) == 2


def test_cli_malformed_plan_is_exit_2_with_one_line(tmp_path, capsys):
    path = write_plan(tmp_path, hardware__memory="lots")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'moebench: error: {path}: [hardware] memory = "lots"') and "\n" not in err


# -------------------------------------------------------------------------------------------
# Offload in the plan


def test_offload_keeps_only_the_cache_slots_on_the_gpu_and_adds_the_missed_copies(toy):
    plain = toy()
    off = toy(parallel__offload_cache_slots=1, workload__offload_hit_rate=0.75, hardware__host_to_device_bandwidth=64)
    # weights: 2 layers x 1 resident expert x 64 params x 2 B, against 4 experts resident
    assert Mo.memory_per_gpu(off).weights_experts == 2 * 1 * 64 * 2
    assert Mo.memory_per_gpu(plain).weights_experts == 2 * 4 * 64 * 2
    # decode: 4 tokens x top-2 = 8 rows read all 4 experts; a quarter missed: 1 expert of 128 B at 64 B/s
    d_off, d_plain = Mo.decode(off).layer, Mo.decode(plain).layer
    assert d_off.offload == pytest.approx(0.25 * 4 * 64 * 2 / 64)
    assert d_off.total == pytest.approx(d_plain.total + d_off.offload)
    assert d_off.parts()["host-to-device"] == d_off.offload and "host-to-device" not in d_plain.parts()
    assert Mo.prefill(off).layer.offload == 0  # prefill reads every expert for many tokens: not modelled
    assert Mo.offloaded_time(1.0, 128, 64) == 3.0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"parallel__offload_cache_slots": 1, "hardware__host_to_device_bandwidth": 64},
         "[workload] offload_hit_rate is missing with offload_cache_slots = 1: accepted a fraction in (0, 1]"),
        ({"parallel__offload_cache_slots": 1, "workload__offload_hit_rate": 0.5},
         "[hardware] host_to_device_bandwidth is missing with offload_cache_slots = 1: accepted a bandwidth"),
        ({"parallel__offload_cache_slots": 5, "workload__offload_hit_rate": 0.5,
          "hardware__host_to_device_bandwidth": 64},
         "[parallel] offload_cache_slots = 5 is invalid: accepted 0 (no offload) or 1 to experts / ep = 4"),
        ({"workload__offload_hit_rate": 1.5}, "[workload] offload_hit_rate = 1.5 is invalid: accepted"),
    ],
)  # fmt: skip
def test_bad_offload_plans_are_refused_in_one_line(tmp_path, overrides, message):
    path = write_plan(tmp_path, **overrides)
    with pytest.raises(PlanError) as err:
        load_plan(str(path))
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)
