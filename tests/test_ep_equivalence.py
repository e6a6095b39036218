"""EP-size invariance: the layer on 1, 2 and 4 gloo ranks matches the fp64 reference.

For every case the output, the aux and z losses and the gradients of the input, the router and
every expert weight must be within ‖x − ref‖/‖ref‖ ≤ 1e-5 in float32 (the bfloat16 and float16
cases: their documented tolerances, ``moebench.kinds.equivalence.TOLERANCE``). Each world size is
launched once for all its cases (spawning ranks costs seconds); each case is its own test.
"""

from __future__ import annotations

import itertools

import pytest

from moebench.kinds.equivalence import TOLERANCE, Case, assemble, compare, run_cases, run_reference
from moebench.launch.spawn import launch
from runtime import MoEConfig

WORLD_SIZES = (1, 2, 4)


def _moe(**kw) -> MoEConfig:
    base = dict(hidden_size=16, ffn_hidden_size=32, num_experts=8, aux_loss_coef=0.1, z_loss_coef=0.01)
    return MoEConfig(**{**base, **kw})


def _grid() -> list[Case]:
    cases = []
    for i, (k, cf, act) in enumerate(itertools.product((1, 2), (1.25, 0.0), ("gelu", "swiglu"))):
        placement = ("round_robin", "contiguous")[i % 2]
        name = f"top{k}-{'dropless' if cf == 0 else f'cap{cf}'}-{act}-{placement}"
        cases.append(Case(name, _moe(top_k=k, capacity_factor=cf, activation=act), placement=placement))
    return cases


SKEWED_LOADS = {"expert_loads": (9.0, 1.0, 1.0, 7.0, 2.0, 2.0, 5.0, 1.0)}
CASES = [
    *_grid(),
    Case(
        "load_balanced-top2-cap",
        _moe(top_k=2, capacity_factor=1.25, activation="swiglu"),
        "load_balanced",
        SKEWED_LOADS,
    ),
    Case("custom-top2-dropless", _moe(top_k=2), "custom"),
    Case("normalized-top2-cap", _moe(top_k=2, capacity_factor=1.25, normalize_topk=True)),
    # 88 tokens lose their copy to the hot expert and keep the other copy's normalized weight (< 1)
    Case("normalized-top2-cap-drops", _moe(top_k=2, capacity_factor=1.25, normalize_topk=True), routing="hot:5"),
    Case("empty-rank-top2-cap", _moe(top_k=2, capacity_factor=1.25), empty_rank=True),
    Case("idle-expert-top2-dropless", _moe(top_k=2), routing="avoid:3"),
    Case("all-to-one-top1-dropless", _moe(top_k=1), routing="hot:5"),
    Case("all-to-one-top2-cap", _moe(top_k=2, capacity_factor=1.25), routing="hot:5"),
    Case("capacity-exactly-hit", _moe(top_k=1, capacity_factor=1.0), routing="cyclic"),
    Case("capacity-one-short", _moe(top_k=1, capacity_factor=0.9), routing="cyclic"),
    Case("ep-equals-experts", _moe(num_experts=4, top_k=2, capacity_factor=1.25, activation="swiglu")),
    Case("one-expert", _moe(num_experts=1, top_k=1, capacity_factor=0.5)),
    Case("tied-router-top2-cap", _moe(top_k=2, capacity_factor=1.25), routing="tied"),
    Case("all-to-all-path-top2-cap", _moe(top_k=2, capacity_factor=1.25), dispatcher="all_to_all"),
    Case("bfloat16-top2-cap", _moe(top_k=2, capacity_factor=1.25, dtype="bfloat16")),
    Case("float16-top2-swiglu-dropless", _moe(top_k=2, activation="swiglu", dtype="float16")),
    Case("bmm-backend-top2-cap", _moe(top_k=2, capacity_factor=1.25, activation="swiglu", expert_backend="bmm")),
    # sequence routing: 8 sequences of 16 tokens (every rank's slice a whole number of them at W ≤ 4)
    Case("sequence-top2-cap", _moe(top_k=2, capacity_factor=1.25, granularity="sequence", seq_len=16), layers=2),
    Case("sequence-top1-swiglu-dropless", _moe(activation="swiglu", granularity="sequence", seq_len=16), skew="zipf"),
    # the routers real models use (runtime/router.py ``gate``), each against the reference's own code
    Case("sigmoid-normalized-top2-cap", _moe(top_k=2, capacity_factor=1.25, scoring="sigmoid", normalize_topk=True)),
    Case("sigmoid-raw-top2-dropless", _moe(top_k=2, scoring="sigmoid"), layers=2),
    Case("topk-before-softmax-top2-cap", _moe(top_k=2, capacity_factor=1.25, topk_before_softmax=True), layers=2),
    Case("group-limited-softmax-top2-cap", _moe(top_k=2, capacity_factor=1.25, group_limited=(4, 2))),
    Case("score-bias-softmax-top1-dropless", _moe(score_bias=0.05, activation="swiglu")),
    Case("routed-scaling-top2-cap", _moe(top_k=2, capacity_factor=1.25, routed_scaling=2.5)),
    Case(  # DeepSeek-V3's router: sigmoid, groups, a choice bias, normalised weights scaled
        "deepseek-v3-router-top2-cap",
        _moe(
            top_k=2,
            capacity_factor=1.25,
            scoring="sigmoid",
            normalize_topk=True,
            group_limited=(4, 2),
            score_bias=0.1,
            routed_scaling=2.5,
        ),
        layers=2,
    ),
]
BY_NAME = {case.name: case for case in CASES}


def _for_world(case: Case, world_size: int) -> Case | None:
    """The case as run on ``world_size`` ranks, or None where it cannot be (fewer experts than ranks)."""
    if case.moe.num_experts < world_size:
        return None
    if case.placement == "custom":  # a deliberately scrambled map: expert e on rank (3e + 1) mod W
        mapping = tuple((3 * e + 1) % world_size for e in range(case.moe.num_experts))
        return Case(**{**case.__dict__, "par_extra": {"expert_to_rank": mapping}})
    return case


@pytest.fixture(scope="module")
def references():
    return {case.name: run_reference(case) for case in CASES}


@pytest.fixture(scope="module")
def ep_results(request):
    """Per world size: {case name: assembled Result}, each world size launched once, lazily."""
    cache: dict[int, dict] = {}

    def get(world_size: int) -> dict:
        if world_size not in cache:
            runnable = [c for c in (_for_world(c, world_size) for c in CASES) if c is not None]
            per_rank = launch(run_cases, world_size, runnable, device="cpu", backend="gloo")
            cache[world_size] = {c.name: assemble([r[i] for r in per_rank]) for i, c in enumerate(runnable)}
        return cache[world_size]

    return get


def _marks(world_size: int) -> list:
    """Multi-rank cases are multiproc; the EP 4 launch (8 s of the unit suite's budget) runs in the slow session."""
    marks = [pytest.mark.multiproc] if world_size > 1 else []
    return [*marks, pytest.mark.slow] if world_size >= 4 else marks


PARAMS = [
    pytest.param(ws, case.name, id=f"ep{ws}-{case.name}", marks=_marks(ws))
    for ws in WORLD_SIZES
    for case in CASES
    if _for_world(case, ws) is not None
]


@pytest.mark.parametrize(("world_size", "name"), PARAMS)
def test_ep_layer_matches_fp64_reference(world_size, name, ep_results, references):
    ep, ref = ep_results(world_size)[name], references[name]
    tolerance = TOLERANCE[BY_NAME[name].moe.dtype]
    errors = compare(ep, ref)
    bad = {k: v for k, v in errors.items() if not v <= tolerance}
    assert not bad, f"relative errors above {tolerance}: {bad}"
    assert ep.tokens_dropped == ref.tokens_dropped


@pytest.mark.parametrize(
    ("name", "dropped"),
    [
        ("all-to-one-top2-cap", 128 - 40),  # C = ceil(1.25·128·2/8) = 40 of the hot expert's 128
        ("normalized-top2-cap-drops", 128 - 40),
        ("all-to-one-top1-dropless", 0),
        ("capacity-exactly-hit", 0),  # 16 copies per expert, C = ceil(1.0·128/8) = 16
        ("capacity-one-short", 8),  # C = ceil(0.9·128/8) = 15: one copy dropped per expert
        ("one-expert", 64),  # C = ceil(0.5·128·1/1) = 64
        ("tied-router-top2-cap", 2 * (128 - 40)),  # every token picks experts 0 and 1; C = 40
    ],
)
@pytest.mark.parametrize("world_size", [1, 4])
def test_tokens_dropped_by_capacity_match_hand_count(world_size, name, dropped, ep_results, references):
    assert references[name].tokens_dropped == dropped
    if _for_world(BY_NAME[name], world_size) is not None:
        assert ep_results(world_size)[name].tokens_dropped == dropped


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_expert_that_receives_no_tokens_gets_zero_gradient(world_size, ep_results, references):
    ep = ep_results(world_size)["idle-expert-top2-dropless"]
    assert references["idle-expert-top2-dropless"].grads["w_in"][3].abs().max() == 0
    assert ep.grads["w_in"][3].abs().max() == 0 and ep.grads["w_down"][3].abs().max() == 0
    assert ep.grads["w_in"][2].abs().max() > 0
