"""The fused GPU implementations (moebench/adapters/vllm.py, megablocks.py; docs/adapters.md) on a CPU host:
their weight layouts and routing arguments, evaluated in fp64 with the semantics each library's source states
(written here, sharing no code with runtime/), give the fp64 reference's output, and planted mapping bugs do not;
what each refuses; why each cannot run here; and the shipped sweeps come out skipped, not as errors."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moebench import adapters, runner
from moebench.adapters import megablocks as mb
from moebench.adapters import vllm
from moebench.scenario import ScenarioError, load
from runtime import MoEConfig, init_weights, reference_moe

REPO = Path(__file__).resolve().parents[1]
VLLM = "python:moebench.adapters.vllm:fused_moe"
MEGABLOCKS = "python:moebench.adapters.megablocks:dmoe"


def _layer(activation="swiglu", **routing):
    cfg = MoEConfig(32, 16, 8, top_k=2, activation=activation, **routing)
    x_TD = torch.randn(64, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return cfg, init_weights(cfg, seed=5), x_TD


def _rel(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


# -------------------------------------------------------------------------------------------
# vLLM: fused_topk / grouped_topk and fused_experts as vllm/model_executor/layers/fused_moe states them


def _vllm_fused_topk(logits_TE, topk, renormalize):
    """topk_softmax: softmax over the logits, the top k, renormalised when asked."""
    weights_TK, ids_TK = torch.softmax(logits_TE, dim=-1).topk(topk, dim=-1)
    return (weights_TK / weights_TK.sum(-1, keepdim=True) if renormalize else weights_TK), ids_TK


def _vllm_grouped_topk(
    logits_TE, topk, renormalize, num_expert_group, topk_group, scoring_func, routed_scaling_factor, bias_E
):
    """grouped_topk: scores; with a bias, groups ranked by their two best biased scores (without, by their best);
    the top k of the kept groups chosen on the biased scores, weighted by the unbiased ones."""
    scores = torch.softmax(logits_TE, dim=-1) if scoring_func == "softmax" else logits_TE.sigmoid()
    t = scores.shape[0]
    choice = scores if bias_E is None else scores + bias_E
    grouped = choice.view(t, num_expert_group, -1)
    group_scores = grouped.max(-1).values if bias_E is None else grouped.topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1)
    mask = keep[:, :, None].expand_as(grouped).reshape(t, -1).bool()
    ids_TK = choice.masked_fill(~mask, float("-inf")).topk(topk, dim=-1)[1]
    weights_TK = scores.gather(1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return weights_TK * routed_scaling_factor, ids_TK


def _vllm_fused_experts(x_TD, w1, w2, weights_TK, ids_TK):
    """Σ_k w_k · silu_and_mul(x · w1[e]ᵀ) · w2[e]ᵀ, silu_and_mul(h) = silu(h[:N]) ⊙ h[N:]."""
    out = torch.zeros_like(x_TD)
    n = w2.shape[2]
    for t in range(x_TD.shape[0]):
        for g, e in zip(weights_TK[t], ids_TK[t], strict=True):
            h = x_TD[t] @ w1[e].T
            out[t] += g * ((F.silu(h[:n]) * h[n:]) @ w2[e].T)
    return out


def _vllm_output(x_TD, weights, cfg, bias=True):
    """What vLLM computes from the adapter's tensors and routing plan (``bias=False``: no bias tensor passed)."""
    w1, w2 = (w.double() for w in vllm.expert_weights(weights))
    logits_TE = x_TD @ weights.router_ED.double().T
    plan = vllm.routing_plan(cfg)
    if plan.function == "fused_topk":
        weights_TK, ids_TK = _vllm_fused_topk(logits_TE, **plan.kwargs)
    else:
        bias_E = vllm.choice_bias(weights, cfg).double() if bias else None
        weights_TK, ids_TK = _vllm_grouped_topk(logits_TE, **plan.kwargs, bias_E=bias_E)
    return _vllm_fused_experts(x_TD, w1, w2, weights_TK, ids_TK)


ROUTINGS = {
    "softmax-renormalised": {"normalize_topk": True},
    "softmax-raw": {},
    "mixtral-order": {"topk_before_softmax": True},
    "deepseek-v3": {
        "scoring": "sigmoid",
        "group_limited": (4, 2),
        "score_bias": 0.1,
        "routed_scaling": 2.5,
        "normalize_topk": True,
    },
    "softmax-score-bias": {"score_bias": 0.2},
    "sigmoid-raw": {"scoring": "sigmoid"},
    "scaled": {"routed_scaling": 2.0, "normalize_topk": True},
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_the_vllm_layout_and_routing_plan_evaluated_as_vllm_states_give_the_fp64_reference(routing):
    cfg, weights, x_TD = _layer(**ROUTINGS[routing])
    assert vllm.refusal(cfg) == ""
    assert _rel(_vllm_output(x_TD, weights, cfg), reference_moe(x_TD, weights, cfg).out_ND) < 1e-12


def test_a_swapped_gate_and_up_half_moves_the_vllm_layout_off_the_reference():
    cfg, w, x_TD = _layer(normalize_topk=True)
    f = cfg.ffn_hidden_size
    swapped = type(w)(w.router_ED, torch.cat([w.w_in_EDH[..., f:], w.w_in_EDH[..., :f]], dim=-1), w.w_down_EFD)
    assert _rel(_vllm_output(x_TD, swapped, cfg), reference_moe(x_TD, w, cfg).out_ND) > 1e-2


def test_the_vllm_grouped_route_gets_a_bias_tensor_so_groups_score_their_two_best_experts():
    cfg, weights, x_TD = _layer(scoring="sigmoid", group_limited=(4, 2), normalize_topk=True)  # score_bias = 0
    assert vllm.routing_plan(cfg).function == "grouped_topk" and torch.equal(
        vllm.choice_bias(weights, cfg), torch.zeros(8)
    )
    ref = reference_moe(x_TD, weights, cfg).out_ND
    assert _rel(_vllm_output(x_TD, weights, cfg), ref) < 1e-12
    # without the (zero) bias vLLM ranks a group by its best expert alone: some tokens keep other groups
    assert _rel(_vllm_output(x_TD, weights, cfg, bias=False), ref) > 1e-2


def test_the_plain_and_mixtral_routers_go_through_fused_topk_the_variants_through_grouped_topk():
    plans = {name: vllm.routing_plan(_layer(**routing)[0]) for name, routing in ROUTINGS.items()}
    assert {n for n, p in plans.items() if p.function == "fused_topk"} == {
        "softmax-renormalised",
        "softmax-raw",
        "mixtral-order",
    }
    assert plans["mixtral-order"].kwargs == {"topk": 2, "renormalize": True}
    assert plans["softmax-raw"].kwargs == {"topk": 2, "renormalize": False}
    assert plans["deepseek-v3"].kwargs == {
        "topk": 2,
        "renormalize": True,
        "num_expert_group": 4,
        "topk_group": 2,
        "scoring_func": "sigmoid",
        "routed_scaling_factor": 2.5,
    }


# -------------------------------------------------------------------------------------------
# MegaBlocks: LearnedRouter and the GLU/MLP experts as megablocks/layers states them


def _megablocks_output(x_TD, weights, cfg, activation_fn=None, swap=False):
    """What dMoE computes with the adapter's Arguments and [E·F, D] tensors."""
    args, params = mb.moe_arguments(cfg), {k: v.double() for k, v in mb.expert_weights(weights, cfg).items()}
    act = activation_fn or args["activation_fn"]
    scores_TE = torch.softmax(x_TD @ weights.router_ED.double().T, dim=-1)
    weights_TK, ids_TK = scores_TE.topk(args["moe_top_k"], dim=-1)
    if args["moe_normalize_expert_weights"]:
        weights_TK = weights_TK / weights_TK.norm(p=args["moe_normalize_expert_weights"], dim=-1, keepdim=True)
    if swap:
        params["w1"], params["v1"] = params["v1"], params["w1"]
    f, out = cfg.ffn_hidden_size, torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for g, e in zip(weights_TK[t], ids_TK[t], strict=True):
            w1, w2 = (params[n][e * f : (e + 1) * f] for n in ("w1", "w2"))
            a = act(x_TD[t] @ w1.T)
            if args["mlp_type"] == "glu":
                a = a * (x_TD[t] @ params["v1"][e * f : (e + 1) * f].T)
            out[t] += g * (a @ w2)
    return out


@pytest.mark.parametrize(
    ("activation", "routing"),
    [("swiglu", {"normalize_topk": True}), ("swiglu", {}), ("swiglu", {"topk_before_softmax": True}), ("gelu", {})],
)
def test_the_megablocks_layout_and_arguments_evaluated_as_megablocks_states_give_the_fp64_reference(
    activation, routing
):
    cfg, weights, x_TD = _layer(activation, dtype="bfloat16", **routing)
    assert mb.refusal(cfg) == ""
    assert _rel(_megablocks_output(x_TD, weights, cfg), reference_moe(x_TD, weights, cfg).out_ND) < 1e-12


def test_swapped_w1_and_v1_or_megablocks_default_tanh_gelu_move_it_off_the_reference():
    cfg, weights, x_TD = _layer(normalize_topk=True, dtype="bfloat16")
    ref = reference_moe(x_TD, weights, cfg).out_ND
    assert _rel(_megablocks_output(x_TD, weights, cfg, swap=True), ref) > 1e-2
    cfg, weights, x_TD = _layer("gelu", dtype="bfloat16")
    tanh_gelu = lambda h: F.gelu(h, approximate="tanh")  # noqa: E731  Arguments' default activation_fn
    assert (
        _rel(_megablocks_output(x_TD, weights, cfg, activation_fn=tanh_gelu), reference_moe(x_TD, weights, cfg).out_ND)
        > 1e-5
    )


def test_megablocks_is_built_in_bfloat16_without_bias_and_renormalises_only_when_asked():
    args = mb.moe_arguments(_layer(normalize_topk=True, dtype="bfloat16")[0])
    assert (args["bf16"], args["fp16"], args["bias"], args["return_bias"]) == (True, False, False, False)
    assert args["moe_normalize_expert_weights"] == 1 and args["mlp_impl"] == "grouped"
    assert mb.moe_arguments(_layer(dtype="bfloat16")[0])["moe_normalize_expert_weights"] is None


# -------------------------------------------------------------------------------------------
# What each refuses, needs, and how a run comes out on this host

SCENARIO = """
[scenario]
name = "fused"
kind = "equivalence"

[model]
hidden = 32
ffn_hidden = 16
num_experts = 8
top_k = 2
activation = "{activation}"
dtype = "{dtype}"
impl = "{impl}"

[routing]
normalize_topk = true
{routing}

[workload]
tokens_per_rank = 24
"""


def _load(tmp_path, impl, activation="swiglu", dtype="bfloat16", routing=""):
    path = tmp_path / "fused.toml"
    path.write_text(SCENARIO.format(impl=impl, activation=activation, dtype=dtype, routing=routing))
    return load(path).runs[0]


@pytest.mark.parametrize(
    ("impl", "activation", "dtype", "routing", "refused"),
    [
        (VLLM, "gelu", "bfloat16", "", 'activation = "gelu": accepted "swiglu"'),
        (VLLM, "swiglu", "bfloat16", "capacity_factor = 1.25", "capacity_factor = 1.25: accepted 0"),
        (MEGABLOCKS, "swiglu", "bfloat16", 'scoring = "sigmoid"', "a router variant"),
        (MEGABLOCKS, "swiglu", "bfloat16", "group_limited = [4, 2]", "a router variant"),
        (MEGABLOCKS, "swiglu", "float32", "", 'dtype = "float32": accepted "bfloat16"'),
        (MEGABLOCKS, "swiglu", "bfloat16", "capacity_factor = 1.0", "capacity_factor = 1: accepted 0"),
    ],
)
def test_a_layer_a_fused_implementation_cannot_express_is_refused_in_one_line(
    tmp_path, impl, activation, dtype, routing, refused
):
    with pytest.raises(ScenarioError) as err:
        _load(tmp_path, impl, activation, dtype, routing)
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "fused.toml") in text
    assert f"[model] impl = '{impl}' cannot express this layer: {refused}" in text


def test_vllm_expresses_deepseek_routing_and_float32(tmp_path):
    routing = 'scoring = "sigmoid"\ngroup_limited = [4, 2]\nscore_bias = 0.1\nrouted_scaling = 2.5'
    assert _load(tmp_path, VLLM, dtype="float32", routing=routing).model["impl"] == VLLM


_FIND_SPEC = importlib.util.find_spec


def _no_spec(monkeypatch, present=()):
    """find_spec answering only for ``present`` (with some module's spec), None for every other name."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: _FIND_SPEC("os") if name in present else None)


def test_why_each_cannot_run_names_the_device_or_the_missing_package(monkeypatch):
    assert adapters.unavailable(VLLM, "cpu") == f"[model] impl = '{VLLM}': needs a CUDA device"
    assert adapters.unavailable(MEGABLOCKS, "cpu") == f"[model] impl = '{MEGABLOCKS}': needs a CUDA device"
    _no_spec(monkeypatch)
    assert vllm.unavailable("cuda") == "needs vllm, which is not installed (pip install vllm)"
    assert mb.unavailable("cuda") == "needs megablocks and grouped_gemm, which are not installed"
    _no_spec(monkeypatch, present=("vllm", "megablocks"))
    assert vllm.unavailable("cuda") == "" and mb.unavailable("cuda") == "needs grouped_gemm, which is not installed"
    _no_spec(monkeypatch, present=("megablocks", "grouped_gemm"))
    assert mb.unavailable("cuda") == ""


def test_neither_vllm_nor_megablocks_is_imported_to_load_check_or_ask(tmp_path):
    for name in ("vllm", "megablocks", "grouped_gemm"):  # stand-ins that fail loudly when imported
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise RuntimeError('{name} was imported')\n")
    code = textwrap.dedent(f"""
        import sys
        from moebench import adapters
        from moebench.scenario import load
        for path in ("fused-moe.toml", "fused-moe-deepseek.toml", "fused-moe-throughput.toml"):
            for run in load({str(REPO / "scenarios" / "sweeps")!r} + "/" + path).runs:
                assert adapters.unavailable(run.model["impl"], "cuda") == "", run.model["impl"]
        print(sorted(m for m in ("vllm", "megablocks", "grouped_gemm") if m in sys.modules))
    """)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


SWEEPS = REPO / "scenarios" / "sweeps"


def test_the_fused_sweeps_check_both_implementations_and_time_them_against_the_runtime():
    runs = [
        r
        for name in ("fused-moe.toml", "fused-moe-deepseek.toml", "fused-moe-throughput.toml")
        for r in load(SWEEPS / name).runs
    ]
    by_kind = {}
    for r in runs:
        by_kind.setdefault(r.kind, []).append(r.model["impl"])
    assert sorted(by_kind["equivalence"]) == sorted([VLLM, MEGABLOCKS, VLLM])
    assert sorted(by_kind["throughput"]) == sorted([VLLM, MEGABLOCKS])
    assert all(r.model["dtype"] == "bfloat16" and r.world_size == 1 for r in runs)
    deepseek = load(SWEEPS / "fused-moe-deepseek.toml").runs[0].moe_config()
    assert vllm.routing_plan(deepseek).function == "grouped_topk" and deepseek.score_bias > 0


def test_on_this_cpu_host_every_fused_run_is_skipped_with_its_reason_not_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA host runs them")
    for name in ("fused-moe.toml", "fused-moe-deepseek.toml", "fused-moe-throughput.toml"):
        for spec in load(SWEEPS / name).runs:
            run = runner.run_one(spec, None)
            assert run["status"] == "skipped", run
            assert run["error"] == f"[model] impl = '{spec.model['impl']}': needs a CUDA device"


# -------------------------------------------------------------------------------------------
# The modules' plumbing on the CPU, under stand-in packages that compute as the sources state (the functions
# above): the arguments each module passes, the bias tensor, the scaling an older grouped_topk leaves out,
# the route hook, dtypes and devices. The real kernels run only on a GPU (tests/test_gpu_fused.py).


def _package(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def stand_in_vllm(monkeypatch):
    """vllm as a release before 2025's router/ folder: grouped_topk in fused_moe/fused_moe.py, without
    routed_scaling_factor (the adapter scales after it)."""

    def fused_topk(hidden_states, gating_output, topk, renormalize):
        assert hidden_states.shape[0] == gating_output.shape[0] and gating_output.dtype == torch.float32
        weights_TK, ids_TK = _vllm_fused_topk(gating_output, topk, renormalize)
        return weights_TK, ids_TK.int(), None

    def grouped_topk(
        hidden_states, gating_output, topk, renormalize, num_expert_group=0, topk_group=0, scoring_func="softmax",
        e_score_correction_bias=None,
    ):  # fmt: skip
        assert e_score_correction_bias is not None  # the adapter always passes one
        bias = e_score_correction_bias
        return _vllm_grouped_topk(
            gating_output, topk, renormalize, num_expert_group, topk_group, scoring_func, 1.0, bias
        )

    def fused_experts(hidden_states, w1, w2, topk_weights, topk_ids):
        assert w1.is_contiguous() and w2.is_contiguous() and w1.dtype == hidden_states.dtype
        return _vllm_fused_experts(hidden_states, w1, w2, topk_weights.to(hidden_states.dtype), topk_ids.long())

    for name in ("vllm", "vllm.model_executor", "vllm.model_executor.layers"):
        _package(monkeypatch, name)
    base = "vllm.model_executor.layers.fused_moe"
    _package(monkeypatch, base, fused_experts=fused_experts, fused_topk=fused_topk)
    _package(monkeypatch, f"{base}.fused_moe", grouped_topk=grouped_topk)


@pytest.mark.parametrize("routing", ["softmax-renormalised", "mixtral-order", "deepseek-v3", "softmax-score-bias"])
def test_the_vllm_module_passes_its_plan_to_vllms_functions_and_matches_the_reference(stand_in_vllm, routing):
    cfg, weights, x_TD = _layer(**ROUTINGS[routing])
    module = vllm.VllmFusedMoE(weights, cfg, torch.device("cpu"))
    x = x_TD.float()
    ref = reference_moe(x_TD, weights, cfg)
    with torch.no_grad():
        assert _rel(module(x).double(), ref.out_ND) < 1e-5
        ids_TK = module.route(x)
    assert torch.bincount(ids_TK.reshape(-1).long(), minlength=8).tolist() == ref.counts_E


@pytest.fixture
def stand_in_megablocks(monkeypatch):
    """megablocks' dMoE as its layers/ source states (LearnedRouter, GroupedGLU/GroupedMLP), in its dtype."""

    class Arguments:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class Experts(torch.nn.Module):
        def __init__(self, args, dtype):
            super().__init__()
            self.mlp = torch.nn.Module()
            names = ("w1", "v1", "w2") if args.mlp_type == "glu" else ("w1", "w2")
            for name in names:
                shape = (args.moe_num_experts * args.ffn_hidden_size, args.hidden_size)
                self.mlp.register_parameter(name, torch.nn.Parameter(torch.empty(shape, dtype=dtype)))

    class Router(torch.nn.Module):
        def __init__(self, args, dtype):
            super().__init__()
            self.args = args
            self.layer = torch.nn.Linear(args.hidden_size, args.moe_num_experts, bias=False, dtype=dtype)

        def forward(self, x):
            scores = self.layer(x.view(-1, x.shape[-1])).softmax(dim=-1)
            weights, ids = scores.topk(self.args.moe_top_k, dim=-1)
            p = self.args.moe_normalize_expert_weights
            return scores, (weights / weights.norm(p=p, dim=-1, keepdim=True) if p else weights), ids

    class dMoE(torch.nn.Module):  # megablocks' name
        def __init__(self, args):
            super().__init__()
            assert args.bf16 and not args.fp16 and not args.bias and not args.return_bias
            self.args, dtype = args, torch.bfloat16
            self.router, self.experts = Router(args, dtype), Experts(args, dtype)

        def forward(self, x):
            sl, bs, hs = x.shape
            _, weights_TK, ids_TK = self.router(x)
            mlp, f = self.experts.mlp, self.args.ffn_hidden_size
            x_TD, out = x.view(-1, hs), torch.zeros(sl * bs, hs, dtype=x.dtype)
            for t in range(sl * bs):
                for g, e in zip(weights_TK[t], ids_TK[t], strict=True):
                    rows = slice(e * f, (e + 1) * f)
                    a = self.args.activation_fn(x_TD[t] @ mlp.w1[rows].T)
                    if self.args.mlp_type == "glu":
                        a = a * (x_TD[t] @ mlp.v1[rows].T)
                    out[t] += g * (a @ mlp.w2[rows])
            return out.view(sl, bs, hs)

    cleared = []
    _package(monkeypatch, "megablocks")
    _package(monkeypatch, "megablocks.layers")
    _package(monkeypatch, "megablocks.layers.arguments", Arguments=Arguments)
    _package(monkeypatch, "megablocks.layers.dmoe", dMoE=dMoE)
    _package(monkeypatch, "megablocks.layers.moe", clear_load_balancing_loss=lambda: cleared.append(1))
    return cleared


def _agreeing_rows(ids_TK, x_TD, weights, cfg):
    """Tokens whose chosen experts (as a set) equal the reference's top-k of its fp64 softmax."""
    ref_TK = torch.softmax(x_TD @ weights.router_ED.double().T, dim=-1).topk(cfg.top_k, dim=-1).indices
    return torch.tensor([set(a.tolist()) == set(b.tolist()) for a, b in zip(ids_TK, ref_TK, strict=True)])


@pytest.mark.parametrize(("activation", "routing"), [("swiglu", {"normalize_topk": True}), ("gelu", {})])
def test_the_megablocks_module_fills_dmoe_and_matches_the_reference_in_bfloat16(
    stand_in_megablocks, activation, routing
):
    cfg, weights, x_TD = _layer(activation, dtype="bfloat16", **routing)
    module = mb.MegaBlocksMoE(weights, cfg, torch.device("cpu"))
    ref_ND = reference_moe(x_TD, weights, cfg).out_ND
    with torch.no_grad():
        out = module(x_TD.float()).double()
        assert len(stand_in_megablocks) == 1  # the saved load-balancing inputs released after the forward
        same = _agreeing_rows(module.route(x_TD.float()), x_TD, weights, cfg)
    # its router runs in bfloat16: a near-tie may choose another expert for a token (at most one here); every
    # token it routes as the reference does agrees at bfloat16's tolerance
    assert out.shape == x_TD.shape and int((~same).sum()) <= 1
    assert _rel(out[same], ref_ND[same]) < 2e-2
