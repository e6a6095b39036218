"""The plain loop-over-experts baselines compute the runtime's functions (the experts kind's loop floor,
the Mixtral-pattern block). Nothing here judges speed."""

from __future__ import annotations

import pytest
import torch

from moebench.kinds.equivalence import rel_error
from moebench.loop_baselines import loop_floor, mixtral_block
from moebench.workload import tokens
from runtime import MoEConfig, MoELayer, init_weights
from runtime.experts import expert_ffn

COUNTS = [7, 0, 13, 3, 1]  # uneven, one expert with no rows
FP32_RTOL = 1e-5


def _experts(activation: str, d: int = 16, f: int = 24) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    h = 2 * f if activation == "swiglu" else f
    w_in = torch.randn(len(COUNTS), d, h, generator=gen) / d**0.5
    w_down = torch.randn(len(COUNTS), f, d, generator=gen) / f**0.5
    return torch.randn(sum(COUNTS), d, generator=gen), w_in, w_down


@pytest.mark.parametrize("backend", ["loop", "bmm"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_loop_floor_equals_expert_ffn_on_uneven_counts_with_an_empty_expert(activation, backend):
    x_RD, w_in, w_down = _experts(activation)
    want = expert_ffn(x_RD, w_in, w_down, COUNTS, activation, backend)
    got = loop_floor(x_RD, w_in, w_down, COUNTS, activation)()
    assert got.shape == want.shape == (sum(COUNTS), x_RD.shape[1])
    assert rel_error(got, want) <= FP32_RTOL
    # The data tells the planted bugs apart: experts' outputs in another row order, or (swiglu) the
    # gate and up halves swapped, are far from the expert FFN's.
    shuffled = loop_floor(x_RD, w_in.flip(0), w_down.flip(0), COUNTS[::-1], activation)()
    assert rel_error(shuffled, want) > 0.1
    if activation == "swiglu":
        swapped = torch.cat(w_in.chunk(2, dim=-1)[::-1], dim=-1)
        assert rel_error(loop_floor(x_RD, swapped, w_down, COUNTS, activation)(), want) > 0.1


def test_loop_floor_transposes_the_weights_once_when_built():
    x_RD, w_in, w_down = _experts("swiglu")
    floor = loop_floor(x_RD, w_in, w_down, COUNTS, "swiglu")
    before = floor()
    w_in.zero_()  # a floor reading the stacked weights at call time would now return zeros
    assert torch.equal(floor(), before)


def _layer(activation: str, top_k: int, normalize: bool) -> tuple[MoELayer, MoEConfig]:
    moe = MoEConfig(16, 24, 6, top_k=top_k, activation=activation, normalize_topk=normalize)
    layer = MoELayer(moe)
    layer.load_global_weights(init_weights(moe, seed=5))
    return layer, moe


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize(("activation", "top_k"), [("swiglu", 2), ("gelu", 1), ("gelu", 3)])
def test_mixtral_block_is_the_dropless_layers_function(activation, top_k, normalize):
    layer, moe = _layer(activation, top_k, normalize)
    x_TD = tokens(40, moe.hidden_size, 0, 1)
    w_in, w_down, gate = layer.experts.w_in_LDH, layer.experts.w_down_LFD, layer.router.weight_ED
    with torch.no_grad():
        want = layer(x_TD).out_TD
        got = mixtral_block(gate, w_in, w_down, activation, top_k, normalize)(x_TD)
        other = mixtral_block(gate, w_in, w_down, activation, top_k, not normalize)(x_TD)
    assert rel_error(got, want) <= FP32_RTOL
    assert rel_error(other, want) > 1e-2  # the routing weights' normalisation is seen
