"""``[model] impl``: other MoE implementations checked against the fp64 reference (moebench/adapters/,
docs/adapters.md). Planted ``python:`` implementations with a routing bug FAIL with the token and expert where
they first differ; the Hugging Face blocks pass at the float32 tolerance (skipped without transformers); bad
values are one-line errors; the default path never imports transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moebench import adapters, kinds
from moebench.cli import main
from moebench.kinds import equivalence
from moebench.launch.spawn import RankContext
from moebench.measure import impl as impl_measure
from moebench.scenario import ScenarioError, load
from moebench.workload.tokens import tokens
from runtime import reference_moe

REPO = Path(__file__).resolve().parents[1]
CTX = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")

SCENARIO = """
[scenario]
name = "impl"
kind = "{kind}"
warmup = 1
repeats = 3

[model]
hidden = 32
ffn_hidden = 16
num_experts = 8
top_k = 2
activation = "swiglu"
impl = "{impl}"

[routing]
normalize_topk = true
{routing}

[parallel]
world_size = {world}

[workload]
tokens_per_rank = 24
"""

# Written from the definitions, sharing no code with runtime/: softmax, top-2, renormalised, SwiGLU experts.
PLANTED = """
import torch

class Planted(torch.nn.Module):
    def __init__(self, weights, cfg, renormalise=True, drop=None):
        super().__init__()
        self.w, self.cfg, self.renormalise, self.drop = weights[0], cfg, renormalise, drop

    def forward(self, x):
        probs = torch.softmax(x @ self.w.router_ED.T, dim=-1)
        top, ids = probs.topk(self.cfg.top_k, dim=-1)
        if self.renormalise:
            top = top / top.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        f = self.cfg.ffn_hidden_size
        for t in range(x.shape[0]):
            if t == self.drop:
                continue
            for g, e in zip(top[t], ids[t]):
                h = x[t] @ self.w.w_in_EDH[e]
                out[t] += g * ((torch.nn.functional.silu(h[:f]) * h[f:]) @ self.w.w_down_EFD[e])
        return out

class Routed(Planted):
    def route(self, x):
        return torch.softmax(x @ self.w.router_ED.T, dim=-1).topk(self.cfg.top_k, dim=-1).indices

def correct(weights, cfg):
    return Planted(weights, cfg)

def no_renormalise(weights, cfg):
    return Planted(weights, cfg, renormalise=False)

def drops_token_5(weights, cfg):
    return Planted(weights, cfg, drop=5)

def routed(weights, cfg):
    return Routed(weights, cfg)

def gpu_only(weights, cfg):
    return Planted(weights, cfg)

gpu_only.unavailable = lambda device: "" if device == "cuda" else "needs a CUDA device"

def broken_needs(weights, cfg):
    return Planted(weights, cfg)

def _raise(device):
    raise RuntimeError("probe failed")

broken_needs.unavailable = _raise

class DeviceProbe(torch.nn.Module):
    seen = []

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        DeviceProbe.seen.append((x.device.type, self.w.device.type))
        return torch.zeros(x.shape)

def device_probe(weights, cfg):
    return DeviceProbe()
"""


def _spec(tmp_path, impl, kind="equivalence", routing="", world=1):
    path = tmp_path / "impl.toml"
    path.write_text(SCENARIO.format(kind=kind, impl=impl, routing=routing, world=world))
    return load(path).runs[0]


@pytest.fixture
def planted(tmp_path, monkeypatch):
    (tmp_path / "planted_moe.py").write_text(PLANTED)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("planted_moe", None)


def _evaluate(spec):
    return kinds.evaluate(spec, [equivalence.impl_forward(spec)])


def test_a_correct_python_implementation_passes(tmp_path, planted):
    metrics, checks, details = _evaluate(_spec(tmp_path, "python:planted_moe:correct"))
    assert checks[0]["pass"] is True and metrics["rel_error_forward"]["median"] <= 1e-5
    assert details["first_difference"] is None


def _chosen(spec, t):
    """The reference's top-2 experts of token t, by weight."""
    _, weights, x_ND = equivalence.impl_inputs(spec)
    probs = torch.softmax(x_ND[t].double() @ weights[0].router_ED.double().T, dim=-1)
    return set(probs.topk(2).indices.tolist()), int(probs.argmax())


def test_an_implementation_that_forgets_to_renormalise_fails_at_token_0(tmp_path, planted):
    spec = _spec(tmp_path, "python:planted_moe:no_renormalise")
    metrics, checks, details = _evaluate(spec)
    assert checks[0]["pass"] is False and metrics["rel_error_forward"]["median"] > 1e-2
    where = details["first_difference"]
    assert where["token"] == 0 and where["expert"] in _chosen(spec, 0)[0]  # one of the experts it under-weighs
    assert "first differs at token 0, expert" in checks[0]["detail"]


def test_an_implementation_that_drops_a_token_fails_naming_it_and_one_of_its_experts(tmp_path, planted):
    spec = _spec(tmp_path, "python:planted_moe:drops_token_5")
    _, checks, details = _evaluate(spec)
    where = details["first_difference"]
    assert checks[0]["pass"] is False
    # token 5's output is missing: its difference is −Σ g_e·expert_e over its two experts, named by the largest term
    assert where["token"] == 5 and where["expert"] in _chosen(spec, 5)[0]
    assert where["detail"].startswith("token 5, expert ")


def test_a_disagreement_under_deepseek_routing_fails_naming_token_and_expert_without_crashing(tmp_path, planted):
    routing = 'scoring = "sigmoid"\ngroup_limited = [4, 2]\nscore_bias = 0.1\nrouted_scaling = 2.5'
    spec = _spec(tmp_path, "python:planted_moe:correct", routing=routing)  # a softmax router: not DeepSeek's
    _, checks, details = _evaluate(spec)
    where = details["first_difference"]
    assert checks[0]["pass"] is False and where["token"] == 0 and 0 <= where["expert"] < 8


def test_a_wrong_shape_fails_instead_of_crashing(tmp_path, planted):
    spec = _spec(tmp_path, "python:planted_moe:correct")
    out = equivalence.impl_forward(spec)
    _, checks, details = kinds.evaluate(spec, [out | {"out": out["out"][:-1]}])
    assert checks[0]["pass"] is False and "output shape (23, 32)" in details["first_difference"]["detail"]


@pytest.mark.parametrize(
    ("impl", "kind", "routing", "world", "message"),
    [
        ("hf:llama", "equivalence", "", 1, "[model] impl = 'hf:llama' is invalid: unknown family 'llama': accepted"),
        ("python:no.such.module:f", "equivalence", "", 1, "module 'no.such.module' cannot be imported"),
        ("pythn:x", "equivalence", "", 1, "[model] impl = 'pythn:x' is invalid: accepted \"runtime\""),
        ("python:planted_moe:correct", "equivalence", "", 2, "[parallel] world_size = 2 is invalid with [model] impl"),
        (
            "python:planted_moe:correct",
            "dispatch",
            "",
            1,
            'is invalid for kind = "dispatch": accepted only with kind "throughput" or "latency" or',
        ),
        ("python:planted_moe:correct", "equivalence", "capacity_factor = 1.0", 1, None),
    ],
)
def test_a_bad_impl_is_a_one_line_error_naming_the_file_key_and_value(
    tmp_path, planted, impl, kind, routing, world, message
):
    if message is None:  # a python: implementation gets the config: capacity is its business, not refused
        assert _spec(tmp_path, impl, kind, routing, world).model["impl"] == impl
        return
    with pytest.raises(ScenarioError) as err:
        _spec(tmp_path, impl, kind, routing, world)
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "impl.toml") in text and message in text


def test_the_cli_exits_2_on_a_bad_impl(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(SCENARIO.format(kind="equivalence", impl="hf:nope", routing="", world=1))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hf:nope" in err[0]


def test_hf_without_transformers_loads_and_fails_to_build_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(adapters.importlib.util, "find_spec", lambda name: None)
    spec = _spec(tmp_path, "hf:mixtral")  # the file loads (moebench list shows it) ...
    with pytest.raises(ValueError, match=r"^\[model\] impl = 'hf:mixtral' needs transformers, which is not installed"):
        equivalence.impl_forward(spec)  # ... and the run is an error naming the missing package


def test_a_run_whose_implementation_cannot_run_here_is_skipped_with_the_reason(tmp_path, monkeypatch, planted):
    from moebench import runner

    monkeypatch.setattr(adapters.importlib.util, "find_spec", lambda name: None)
    run = runner.run_one(_spec(tmp_path, "hf:mixtral"), None)
    assert run["status"] == "skipped" and "needs transformers, which is not installed" in run["error"]
    run = runner.run_one(_spec(tmp_path, "python:planted_moe:gpu_only"), None)  # its factory's own needs
    assert run["status"] == "skipped" and run["error"].endswith("python:planted_moe:gpu_only': needs a CUDA device")
    assert adapters.unavailable("python:planted_moe:gpu_only", "cuda") == ""
    assert adapters.unavailable("python:planted_moe:correct", "cpu") == ""  # no attribute: runs anywhere
    run = runner.run_one(_spec(tmp_path, "python:planted_moe:broken_needs"), None)  # its unavailable() raises
    assert run["status"] == "error" and run["error"] == "RuntimeError: probe failed"


def test_the_implementation_runs_on_the_runs_device(tmp_path, planted):
    import planted_moe

    equivalence.impl_forward(_spec(tmp_path, "python:planted_moe:device_probe"), torch.device("meta"))
    assert planted_moe.DeviceProbe.seen == [("meta", "meta")]  # module and input moved to the device given


def test_the_default_path_never_imports_transformers():
    code = textwrap.dedent(f"""
        import sys
        from moebench.scenario import load
        from moebench.kinds import equivalence, latency, load_balance, throughput
        load({str(REPO / "scenarios" / "tour-equivalence-top2.toml")!r})
        print("transformers" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -------------------------------------------------------------------------------------------
# The Hugging Face blocks (skipped without transformers)

HF_ROUTING = {
    "mixtral": "",
    "qwen2_moe": "",
    "qwen3_moe": "",
    "olmoe": "",
    "deepseek_v3": 'scoring = "sigmoid"\ngroup_limited = [4, 2]\nscore_bias = 0.1\nrouted_scaling = 2.5',
}


@pytest.mark.parametrize("family", list(HF_ROUTING))
def test_each_hf_block_matches_the_fp64_reference_at_the_float32_tolerance(tmp_path, family):
    pytest.importorskip("transformers")
    spec = _spec(tmp_path, f"hf:{family}", routing=HF_ROUTING[family])
    metrics, checks, _ = _evaluate(spec)
    assert checks[0]["pass"] is True, checks[0]["detail"]
    assert metrics["rel_error_forward"]["median"] <= equivalence.TOLERANCE["float32"]


def test_the_hf_weight_mapping_is_what_the_block_computes(tmp_path):
    """Swapping gate and up halves of w_in (a planted mapping bug) moves the Mixtral block off the reference."""
    pytest.importorskip("transformers")
    spec = _spec(tmp_path, "hf:mixtral")
    c, weights, x_ND = equivalence.impl_inputs(spec)
    f = c.moe.ffn_hidden_size
    w = weights[0]
    swapped = type(w)(w.router_ED, torch.cat([w.w_in_EDH[..., f:], w.w_in_EDH[..., :f]], dim=-1), w.w_down_EFD)
    block = adapters.build("hf:mixtral", [swapped], c.moe)
    ref = reference_moe(x_ND.double(), w, c.moe).out_ND
    with torch.no_grad():
        assert equivalence.rel_error(block(x_ND), ref) > 1e-2
        assert equivalence.rel_error(adapters.build("hf:mixtral", weights, c.moe)(x_ND), ref) <= 1e-5


@pytest.mark.parametrize(
    ("family", "routing", "refused"),
    [
        ("mixtral", 'scoring = "sigmoid"', "a router variant"),
        ("qwen3_moe", "routed_scaling = 2.0", "a router variant"),
        ("deepseek_v3", "", 'scoring = "softmax": accepted scoring = "sigmoid"'),
    ],
)
def test_a_routing_the_family_cannot_express_is_refused_in_one_line(tmp_path, family, routing, refused):
    pytest.importorskip("transformers")
    with pytest.raises(ScenarioError) as err:
        _spec(tmp_path, f"hf:{family}", routing=routing)
    assert "\n" not in str(err.value) and "cannot express this layer" in str(err.value) and refused in str(err.value)


def test_the_real_models_scenarios_check_and_time_every_family():
    from moebench.scenario import load_file

    files = [REPO / "scenarios" / "real-models.toml", REPO / "scenarios" / "real-models" / "deepseek.toml"]
    runs = [r for path in files for sc in load_file(path) for r in sc.runs]  # loads without transformers too
    every = sorted(f"hf:{f}" for f in adapters.hf.FAMILIES)
    for kind in ("equivalence", "throughput"):
        assert sorted(r.model["impl"] for r in runs if r.kind == kind) == every
    assert all(r.world_size == 1 for r in runs)


# -------------------------------------------------------------------------------------------
# throughput, latency and load_balance with impl


@pytest.mark.parametrize("kind", ["throughput", "latency"])
def test_impl_over_runtime_is_the_round_by_round_ratio_of_the_two_forwards(tmp_path, planted, kind):
    spec = _spec(tmp_path, "python:planted_moe:correct", kind=kind)
    raw = impl_measure.impl_timed(CTX, spec, None)
    assert len(raw["step"]) == len(raw["runtime_step"]) == 3 and raw["finite"] is True
    raw |= {"step": [2.0, 3.0, 4.0], "runtime_step": [1.0, 2.0, 1.0]}  # ratios 2, 1.5, 4: median 2
    metrics, checks, _ = kinds.evaluate(spec, [raw])
    assert metrics["impl_over_runtime"]["median"] == 2.0 and metrics["step_time_s"]["median"] == 3.0
    assert ("tokens_per_s" in metrics) == (kind == "throughput") and checks[0]["pass"] is True


def test_load_balance_reads_the_counts_through_the_route_hook(tmp_path, planted):
    spec = _spec(tmp_path, "python:planted_moe:routed", kind="load_balance")
    batches = impl_measure.impl_routing(CTX, spec, 2)
    weights, moe = impl_measure.impl_weights(spec), spec.moe_config()
    for b, batch in enumerate(batches):  # the reference's counts on the batch the kind routes
        x_TD = tokens(24, moe.hidden_size, spec.workload["seed"], 1_000 * (b + 1))
        assert batch["counts_WE"] == [[reference_moe(x_TD, weights[0], moe).counts_E]]
    metrics, _, _ = kinds.evaluate(spec, [{"batches": batches}])
    assert metrics["tokens_dropped"]["median"] == 0


def test_load_balance_without_a_route_hook_is_a_one_line_error(tmp_path, planted):
    spec = _spec(tmp_path, "python:planted_moe:correct", kind="load_balance")
    with pytest.raises(ValueError, match=r"^Planted has no route\(x_TD\) method: accepted an implementation whose"):
        impl_measure.impl_routing(CTX, spec, 1)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[parallel]\noverlap_chunks = 2", "[parallel] overlap_chunks = 2 is invalid with [model] impl"),
        ('[workload]\nskew = "zipf"', "[workload] skew = 'zipf' is invalid with [model] impl"),
        ("[alerts]", "[alerts] = True is invalid with [model] impl"),
    ],
)
def test_a_timed_run_with_impl_refuses_what_belongs_to_the_runtime_layer(tmp_path, planted, extra, message):
    text = SCENARIO.format(kind="throughput", impl="python:planted_moe:correct", routing="", world=1)
    section = extra.partition("\n")[0]
    text = text.replace(section, extra) if section in text else text + "\n" + extra + "\n"
    path = tmp_path / "impl.toml"
    path.write_text(text)
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert "\n" not in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("family", list(HF_ROUTING))
def test_each_hf_block_routes_as_the_fp64_reference_counts(tmp_path, family):
    pytest.importorskip("transformers")
    spec = _spec(tmp_path, f"hf:{family}", kind="load_balance", routing=HF_ROUTING[family])
    (batch,) = impl_measure.impl_routing(CTX, spec, 1)
    moe = spec.moe_config()
    x_TD = tokens(24, moe.hidden_size, spec.workload["seed"], 1_000)
    assert batch["counts_WE"] == [[reference_moe(x_TD, impl_measure.impl_weights(spec)[0], moe).counts_E]]


# -------------------------------------------------------------------------------------------
# bfloat16 with the Hugging Face blocks (skipped without transformers)


def _bf16_spec(tmp_path, impl, kind="equivalence", routing=""):
    path = tmp_path / "impl.toml"
    text = SCENARIO.format(kind=kind, impl=impl, routing=routing, world=1)
    path.write_text(text.replace('activation = "swiglu"', 'activation = "swiglu"\ndtype = "bfloat16"'))
    return load(path).runs[0]


@pytest.mark.parametrize("family", list(HF_ROUTING))
def test_each_hf_block_in_bfloat16_matches_the_fp64_reference_at_the_bfloat16_tolerance(tmp_path, family):
    pytest.importorskip("transformers")
    spec = _bf16_spec(tmp_path, f"hf:{family}", routing=HF_ROUTING[family])
    metrics, checks, _ = _evaluate(spec)
    error = metrics["rel_error_forward"]["median"]
    assert checks[0]["pass"] is True, checks[0]["detail"]
    # within the bfloat16 tolerance, and far above float32's rounding: the block really computed in bfloat16
    assert 1e-4 < error <= equivalence.TOLERANCE["bfloat16"] and "tolerance 0.02" in checks[0]["detail"]


def test_a_bf16_hf_block_that_skips_renormalising_or_stores_fp8_weights_fails(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    hf, build, config = adapters.hf, adapters.hf.build, adapters.hf._config

    def no_renormalise(family, cfg):
        planted = config(family, cfg)
        planted.norm_topk_prob = False
        return planted

    monkeypatch.setattr(hf, "_config", no_renormalise)
    metrics, checks, _ = _evaluate(_bf16_spec(tmp_path, "hf:qwen3_moe"))
    assert checks[0]["pass"] is False and metrics["rel_error_forward"]["median"] > 0.1
    monkeypatch.setattr(hf, "_config", config)

    def fp8_weights(family, w, cfg):  # the experts' weights rounded through float8 (e4m3) instead of bfloat16
        f8 = lambda t: t.to(torch.float8_e4m3fn).float()  # noqa: E731
        return build(family, type(w)(w.router_ED, f8(w.w_in_EDH), f8(w.w_down_EFD)), cfg)

    monkeypatch.setattr(hf, "build", fp8_weights)
    metrics, checks, _ = _evaluate(_bf16_spec(tmp_path, "hf:mixtral"))
    assert checks[0]["pass"] is False and metrics["rel_error_forward"]["median"] > equivalence.TOLERANCE["bfloat16"]


def test_a_bf16_hf_block_is_timed_in_bfloat16_against_the_runtimes_layer(tmp_path):
    pytest.importorskip("transformers")
    spec = _bf16_spec(tmp_path, "hf:mixtral", kind="throughput")
    c, weights, _ = equivalence.impl_inputs(spec)
    assert {p.dtype for p in adapters.build("hf:mixtral", weights, c.moe).parameters()} == {torch.bfloat16}
    raw = impl_measure.impl_timed(CTX, spec, None)
    assert raw["finite"] is True and len(raw["step"]) == len(raw["runtime_step"]) == 3
    metrics, checks, _ = kinds.evaluate(spec, [raw])
    assert checks[0]["pass"] is True and metrics["impl_over_runtime"]["n"] == 3
