"""The runtime's layout rules: EP = 1 on its own dispatcher, features fixed at construction, no test hooks.

- ``LocalDispatcher`` (EP = 1, no group) gives the fp64 reference's output, serial and chunked,
  with the grouped and the loop backends;
- ``MoELayer`` refuses an impossible feature combination at construction with a one-line error
  naming the argument, its value and what is accepted; ``set_schedule`` validates the same way;
- ``runtime/`` reads no environment variable and never imports ``moebench`` (its source parsed),
  and the harness sets no layer's or dispatcher's attribute from outside.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from runtime import MoEConfig, MoELayer, ParallelConfig, init_weights, reference_moe, rel_error
from runtime.dispatch import LocalDispatcher
from runtime.offload import OffloadConfig
from runtime.redundancy import RedundancyConfig

ROOT = Path(__file__).resolve().parents[1]
MOE = MoEConfig(16, 32, 8, top_k=2, activation="swiglu", capacity_factor=1.0, normalize_topk=True)


# ---------------------------------------------------------------------------------------------
# EP = 1: LocalDispatcher against the fp64 reference


@pytest.mark.parametrize("backend", ["bmm", "loop"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_local_dispatcher_layer_matches_the_fp64_reference_serial_and_chunked(backend, chunks):
    moe = dataclasses.replace(MOE, expert_backend=backend)
    weights = init_weights(moe, seed=4)
    x_ND = torch.randn(40, moe.hidden_size, generator=torch.Generator().manual_seed(1))
    layer = MoELayer(moe, ParallelConfig(overlap_chunks=chunks))
    layer.load_global_weights(weights)
    assert type(layer.dispatcher) is LocalDispatcher and layer.transport is None
    with torch.no_grad():
        out = layer(x_ND)
    ref = reference_moe(x_ND, weights, moe)
    assert ref.dropped  # capacity 1.0 drops copies: the kept set matters
    assert rel_error(out.out_TD, ref.out_ND) <= 1e-5
    assert out.kept_WE[0].tolist() == ref.kept_E
    assert out.tokens_dropped == len(ref.dropped)


def test_local_dispatcher_chunks_split_every_experts_copies_and_keep_the_send_order_by_chunk():
    # 3 tokens, top 2: expert 0 gets tokens 0, 1, 2; expert 2 gets tokens 0 and 2; expert 1 token 1
    ids_TK = torch.tensor([[0, 2], [1, 0], [2, 0]])
    keep_TK = torch.ones_like(ids_TK, dtype=torch.bool)
    kept_WE = torch.tensor([[3, 1, 2]])
    meta = LocalDispatcher(3).plan(ids_TK, keep_TK, kept_WE, chunks=2)
    # chunk sizes ⌊(i+1)n/2⌋ − ⌊in/2⌋: expert 0: 1, 2; expert 1: 0, 1; expert 2: 1, 1
    assert [c.tokens_per_expert for c in meta.chunks] == [[1, 0, 1], [2, 1, 1]]
    assert [(c.rows.start, c.rows.stop) for c in meta.chunks] == [(0, 2), (2, 6)]
    # flat copy t·K + k in send order: chunk 0 = e0's first copy (token 0), e2's first (token 0);
    # chunk 1 = e0's tokens 1, 2; e1's token 1; e2's token 2
    assert meta.order_P.tolist() == [0, 1, 3, 5, 2, 4]
    assert meta.token_P.tolist() == [0, 0, 1, 2, 1, 2]
    assert all(c.to_expert_major_R is None and c.run_experts is None for c in meta.chunks)


# ---------------------------------------------------------------------------------------------
# Features at construction


def _offloaded(**kw) -> MoELayer:
    return MoELayer(MOE, ParallelConfig(), offload=OffloadConfig(2), **kw)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: MoELayer(MOE, offload=OffloadConfig(2), redundancy=RedundancyConfig((1.0,) * 8, 1)),
            "offload with redundant experts is refused: accepted one or the other",
        ),
        (
            lambda: MoELayer(MOE, ParallelConfig(overlap_chunks=2), offload=OffloadConfig(2)),
            "offload with ParallelConfig.overlap_chunks = 2 is refused: accepted 1",
        ),
        (
            lambda: MoELayer(MOE, redundancy=RedundancyConfig((1.0,) * 8, 1)),
            "redundant experts at ep_size = 1 are refused: accepted ep_size >= 2",
        ),
        (
            lambda: MoELayer(MOE, transport="local_copy"),
            "transport = 'local_copy' needs an all-to-all: accepted 'collective' with the local dispatcher",
        ),
        (lambda: MoELayer(MOE, transport="rdma"), "transport = 'rdma' is invalid: accepted one of 'collective'"),
        (lambda: MoELayer(MOE, on_loss="ignore"), "on_loss = 'ignore' is invalid: accepted one of 'reroute', 'drop'"),
        (
            lambda: MoELayer(MOE, offload_steps=[[0]]),
            "MoELayer offload_steps without offload is refused: accepted with an OffloadConfig",
        ),
        (lambda: MoELayer(MOE, offload=2), "MoELayer offload = 2 is invalid: accepted an OffloadConfig or None"),
        (lambda: _offloaded().set_schedule(overlap_chunks=2), "offload with overlap_chunks = 2 is refused: accepted 1"),
        (lambda: MoELayer(MOE).set_schedule(overlap_chunks=0), "overlap_chunks = 0 is invalid: accepted an integer"),
        (
            lambda: MoELayer(MOE).set_schedule(transport="local_copy"),
            "transport = 'local_copy' needs an all-to-all: the layer's dispatcher is local",
        ),
        (
            lambda: RedundancyConfig((1.0, float("nan")), 1),
            "RedundancyConfig.loads_E = (1.0, nan) is invalid: accepted finite numbers >= 0",
        ),
        (lambda: RedundancyConfig((1.0,), -1), "RedundancyConfig.redundant = -1 is invalid: accepted an integer >= 0"),
        (
            lambda: MoELayer(MOE, offload=OffloadConfig(2, "belady")),
            "MoELayer offload policy 'belady' needs offload_steps",
        ),
        (lambda: ParallelConfig(overlap_chunks=4097), "ParallelConfig.overlap_chunks = 4097 is invalid"),
        (
            lambda: MoELayer(MOE).set_schedule(overlap_chunks=70_000),
            "overlap_chunks = 70000 is invalid: accepted an integer from 1 to 4096",
        ),
        (
            lambda: MoELayer(MOE).set_schedule(transport="rdma"),
            "transport = 'rdma' is invalid: accepted one of 'collective'",
        ),
    ],
)
def test_an_impossible_feature_combination_is_refused_with_a_clear_error(build, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        build()
    assert "\n" not in str(err.value)


def test_set_schedule_changes_the_chunks_of_the_next_forward_and_none_leaves_them(monkeypatch):
    layer = MoELayer(MOE)
    layer.load_global_weights(init_weights(MOE, seed=0))
    x_TD = torch.randn(12, MOE.hidden_size, generator=torch.Generator().manual_seed(2))
    seen = []
    plan = layer.dispatcher.plan
    monkeypatch.setattr(layer.dispatcher, "plan", lambda *args, **kw: seen.append(args[3]) or plan(*args, **kw))
    with torch.no_grad():
        layer.set_schedule(overlap_chunks=3)
        layer(x_TD)
        layer.set_schedule(transport=None)
        layer(x_TD)
        layer.set_schedule(overlap_chunks=1)
        layer(x_TD)
    assert seen == [3, 3, 1]


def test_an_offloaded_layer_takes_its_weights_before_its_first_forward_only():
    layer = _offloaded()
    weights = init_weights(MOE, seed=0)
    layer.load_global_weights(weights)
    assert torch.equal(layer.experts.cache.host_in_LDH, weights.w_in_EDH)  # every expert, on the host
    with torch.no_grad():
        layer(torch.randn(8, MOE.hidden_size, generator=torch.Generator().manual_seed(3)))
    router = layer.router.weight_ED.clone()
    with pytest.raises(RuntimeError, match="before the first forward: an expert is resident"):
        layer.load_global_weights(init_weights(MOE, seed=1))
    assert torch.equal(layer.router.weight_ED, router)  # a refused load leaves the layer as it was


def test_a_local_layer_keeps_its_collective_transport_when_asked_for_it():
    layer = MoELayer(MOE)
    layer.set_schedule(transport="collective")  # what it was built with: nothing to change
    assert layer.transport is None  # no exchange at all


# ---------------------------------------------------------------------------------------------
# No test hooks in the runtime; no attributes set on it from outside


def _trees(folder: str):
    for path in sorted((ROOT / folder).rglob("*.py")):
        yield path.relative_to(ROOT), ast.parse(path.read_text(encoding="utf-8"))


def test_runtime_reads_no_environment_variable_and_never_imports_moebench():
    found = []
    for path, tree in _trees("runtime"):
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{path}: import {a.name}" for a in node.names if a.name.split(".")[0] == "moebench"]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "moebench":
                found.append(f"{path}: from {node.module} import")
            elif isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                found.append(f"{path}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.Name) and node.id in ("environ", "getenv"):
                found.append(f"{path}:{node.lineno}: {node.id}")
    assert found == []
    assert len(list(_trees("runtime"))) >= 15  # the walk saw the runtime's files


LAYER_STATE = {"overlap_chunks", "transport", "on_loss", "experts", "dispatcher", "replicas", "local_experts", "router"}


def test_the_harness_sets_no_runtime_layer_attribute_and_calls_no_feature_mutator():
    found = []
    for path, tree in _trees("moebench"):
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    own = isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
                    if isinstance(t, ast.Attribute) and not own and t.attr in LAYER_STATE:
                        found.append(f"{path}:{t.lineno}: sets .{t.attr}")
            call = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            if call and node.func.attr in ("offload", "replicate"):
                found.append(f"{path}:{node.lineno}: calls .{node.func.attr}()")
    assert found == []
