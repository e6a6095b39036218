"""Checkpoints (``runtime/checkpoint.py``): saved at EP 2, loaded at EP 1, 2 and 4 with the same
weights, optimizer state and outputs (resharding by global expert id); ``latest`` skips an
incomplete save; loading refuses a metadata pickle that names anything but DCP's metadata."""

from __future__ import annotations

import pickle

import pytest
import torch

from moebench.launch.spawn import launch
from runtime import MoEConfig, ParallelConfig, checkpoint
from runtime.layer import MoELayer
from runtime.weights import init_weights

MOE = MoEConfig(hidden_size=16, ffn_hidden_size=24, num_experts=8, top_k=2, activation="swiglu")
TOKENS = 32
LAYERS = 2


def _layers(ctx, seed: int) -> list[MoELayer]:
    group = ctx.group if ctx.world_size > 1 else None
    layers = [MoELayer(MOE, ParallelConfig(ep_size=ctx.world_size), group) for _ in range(LAYERS)]
    for l, layer in enumerate(layers):
        layer.load_global_weights(init_weights(MOE, seed=seed + l))
    return layers


def _x(rank: int) -> torch.Tensor:
    return torch.randn(TOKENS, MOE.hidden_size, generator=torch.Generator().manual_seed(7 + rank))


def _forward(layers, x_TD: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        for layer in layers:
            x_TD = x_TD + layer(x_TD).out_TD
    return x_TD


def _train_and_save(ctx, directory: str) -> dict:
    """Two Adam steps at this EP size, then a save after step 2; returns this rank's saved tensors."""
    layers = _layers(ctx, seed=1)
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2, foreach=False)
    for _ in range(2):
        optimizer.zero_grad()
        out = _forward_grad(layers, _x(ctx.rank))
        out.square().sum().backward()
        for layer in layers:
            layer.reduce_replicated_grads()
        optimizer.step()
    checkpoint.save(directory, layers, optimizer, 2, ctx.group if ctx.world_size > 1 else None)
    state = checkpoint.state_dict(layers, optimizer, 2)
    return {k: v.clone() for k, v in state.items()}


def _forward_grad(layers, x_TD):
    for layer in layers:
        x_TD = x_TD + layer(x_TD).out_TD
    return x_TD


def _load(ctx, directory: str, world_saved: int) -> dict:
    """Fresh layers (other seeds) and a fresh Adam at this EP size, loaded from the checkpoint."""
    layers = _layers(ctx, seed=50)
    params = [p for layer in layers for p in layer.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-2, foreach=False)
    path = checkpoint.latest(directory)
    step = checkpoint.load(path, layers, optimizer, ctx.group if ctx.world_size > 1 else None)
    tokens = torch.cat([_x(r) for r in range(world_saved)])  # the saving run's global tokens
    mine = tokens.chunk(ctx.world_size)[ctx.rank]
    state = checkpoint.state_dict(layers, optimizer, step)
    return {"step": step, "state": {k: v.clone() for k, v in state.items()}, "out": _forward(layers, mine)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt")
    per_rank = launch(_train_and_save, 2, str(directory), device="cpu", backend="gloo")
    want = {k: v for r in per_rank for k, v in r.items()}
    # the outputs the saving layout gives for the global tokens, at EP 2
    outs = launch(_load, 2, str(directory), 2, device="cpu", backend="gloo")
    return directory, want, torch.cat([o["out"] for o in outs])


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [1, *(pytest.param(w, marks=pytest.mark.slow) for w in (2, 4))])
def test_a_checkpoint_saved_at_ep2_loads_at_any_ep_size_with_the_same_state_and_outputs(saved, world):
    directory, want, out_ep2 = saved
    loaded = launch(_load, world, str(directory), 2, device="cpu", backend="gloo")
    got = {k: v for r in loaded for k, v in r["state"].items()}
    assert {r["step"] for r in loaded} == {2}
    assert got.keys() == want.keys()  # every expert and its Adam moments, each under its global id
    for key, value in want.items():
        assert torch.equal(got[key], value), key  # bit for bit
    assert any(k.endswith("exp_avg_sq") for k in want) and "optim.layers.1.experts.w_in_LDH.step" in want
    out = torch.cat([r["out"] for r in loaded])
    assert torch.allclose(out, out_ep2, rtol=0, atol=1e-6)  # same weights: same outputs, up to fp32 sum order


def test_latest_skips_a_save_without_its_metadata(tmp_path):
    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / ".metadata").write_bytes(b"")
    (tmp_path / "step-00000006").mkdir()  # a save cut short: its data but no .metadata yet
    (tmp_path / "step-00000006" / "__0_0.distcp").write_bytes(b"")
    assert checkpoint.latest(tmp_path).name == "step-00000004"
    assert checkpoint.latest(tmp_path / "none") is None


class _Boom:
    def __reduce__(self):
        return (print, ("this ran",))


def test_loading_refuses_metadata_that_would_build_anything_else(tmp_path):
    class Ctx:
        rank, world_size, group = 0, 1, None

    layers = _layers(Ctx, seed=1)
    path = checkpoint.save(tmp_path, layers, None, 1)
    checkpoint.load(path, _layers(Ctx, seed=2), None)  # DCP's own metadata loads
    (path / ".metadata").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(pickle.UnpicklingError, match=r"names builtins\.print: refused"):
        checkpoint.SafeReader(path).read_metadata()


class _Touch:
    """Unpickled, it would create a file: what a crafted checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_refuses_a_value_the_metadata_calls_bytes_and_runs_nothing(tmp_path):
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "ran"
    with pytest.warns(UserWarning, match="single process"):
        dcp.save({"train.step": _Touch(str(marker))}, checkpoint_id=tmp_path / "evil", no_dist=True)
    with pytest.raises(pickle.UnpicklingError, match="BytesStorageMetadata: refused"):
        checkpoint.load(tmp_path / "evil", [], None)
    assert not marker.exists()


def test_only_plain_adam_state_is_checkpointed():
    class Ctx:
        rank, world_size, group = 0, 1, None

    layers = _layers(Ctx, seed=1)
    params = [p for layer in layers for p in layer.parameters()]
    for optimizer in (torch.optim.SGD(params, lr=0.1), torch.optim.Adam(params, amsgrad=True)):
        with pytest.raises(ValueError, match=r"accepted torch\.optim\.Adam without amsgrad"):
            checkpoint.state_dict(layers, optimizer)
