"""On a CUDA device with the package installed: vLLM's fused MoE and MegaBlocks' dMoE through ``[model] impl``
(moebench/adapters/vllm.py, megablocks.py), each against the fp64 reference by the equivalence kind at the
bfloat16 tolerance, and vLLM's route hook against the reference's routing counts. Skipped without CUDA
(conftest) or without the package (importorskip). Not yet run on a GPU in this project."""

from __future__ import annotations

import pytest
import torch

from moebench import adapters, kinds
from moebench.kinds import equivalence
from moebench.launch.spawn import RankContext
from moebench.measure import impl as impl_measure
from moebench.scenario import load
from moebench.workload.tokens import tokens
from runtime import reference_moe

pytestmark = pytest.mark.gpu

SCENARIO = """
[scenario]
name = "fused-gpu"
kind = "{kind}"

[model]
hidden = 128
ffn_hidden = 256
num_experts = 8
top_k = 2
activation = "swiglu"
dtype = "bfloat16"
impl = "{impl}"

[routing]
normalize_topk = true
{routing}

[workload]
tokens_per_rank = 64
"""

DEEPSEEK = 'scoring = "sigmoid"\ngroup_limited = [4, 2]\nscore_bias = 0.1\nrouted_scaling = 2.5'
CASES = [
    ("vllm", "python:moebench.adapters.vllm:fused_moe", ""),
    ("vllm", "python:moebench.adapters.vllm:fused_moe", DEEPSEEK),
    ("megablocks", "python:moebench.adapters.megablocks:dmoe", ""),
]


def _spec(tmp_path, impl, routing, kind="equivalence"):
    path = tmp_path / "fused.toml"
    path.write_text(SCENARIO.format(kind=kind, impl=impl, routing=routing))
    return load(path).runs[0]


def _routed_elsewhere(spec, module) -> list[int]:
    """Tokens the implementation's route sends to other experts than the reference does (each token's chosen
    set read from the reference on that token alone)."""
    c, weights, x_ND = equivalence.impl_inputs(spec)
    with torch.no_grad():
        ids_NK = module.route(x_ND.to(c.moe.torch_dtype)).cpu()
    theirs = [set(row.tolist()) for row in ids_NK]
    ours = [
        {e for e, n in enumerate(reference_moe(x_ND[t : t + 1], weights[0], c.moe).counts_E) if n}
        for t in range(len(theirs))
    ]
    return [t for t, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b]


@pytest.mark.parametrize(("package", "impl", "routing"), CASES, ids=["vllm", "vllm-deepseek", "megablocks"])
def test_each_fused_implementation_matches_the_fp64_reference_at_the_bfloat16_tolerance(
    tmp_path, package, impl, routing
):
    pytest.importorskip(package)
    if package == "megablocks":
        pytest.importorskip("grouped_gemm")
    spec = _spec(tmp_path, impl, routing)
    metrics, checks, details = kinds.evaluate(spec, [equivalence.impl_forward(spec)])
    if checks[0]["pass"]:
        assert metrics["rel_error_forward"]["median"] <= equivalence.TOLERANCE["bfloat16"]
        return
    # the one FAIL that is not a mapping bug: a bfloat16 near-tie routed one token elsewhere, and it is the
    # token the kind names
    c, weights, _ = equivalence.impl_inputs(spec)
    elsewhere = _routed_elsewhere(spec, adapters.build(impl, weights, c.moe))
    assert elsewhere == [details["first_difference"]["token"]], (checks[0]["detail"], elsewhere)


def test_vllms_route_hook_counts_as_the_fp64_reference_routes(tmp_path):
    pytest.importorskip("vllm")
    ctx = RankContext(rank=0, world_size=1, group=None, device=torch.device("cuda"), backend="nccl")
    spec = _spec(tmp_path, CASES[1][1], DEEPSEEK, kind="load_balance")
    (batch,) = impl_measure.impl_routing(ctx, spec, 1)
    moe = spec.moe_config()
    x_TD = tokens(64, moe.hidden_size, spec.workload["seed"], 1_000)
    # routed from the bfloat16 tokens (the kind's dtype); a near-tie may move one copy, not more
    expected = reference_moe(x_TD.to(torch.bfloat16).double(), impl_measure.impl_weights(spec)[0], moe).counts_E
    assert sum(abs(a - b) for a, b in zip(batch["counts_WE"][0][0], expected, strict=True)) <= 2
