"""The plain loop-over-experts baselines compute the runtime's functions (the experts kind's loop floor,
the Mixtral-pattern block), and ``moebench.tools.serial_path`` reports what it timed and refuses to
compare different functions. Nothing here judges speed."""

from __future__ import annotations

import pytest
import torch

from moebench.measure.floors import loop_floor, mixtral_block
from moebench.measure.timing import Timing
from moebench.tools import serial_path
from moebench.workload.tokens import tokens
from runtime import MoEConfig, MoELayer, init_weights
from runtime.experts import expert_ffn
from runtime.reference import rel_error

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


TINY = {"hidden": 32, "ffn": 64, "experts": 4, "num_tokens": 64, "repeats": 2, "warmup": 0}


def test_serial_path_reports_every_function_on_the_layers_own_dispatch():
    result = serial_path.measure(**TINY)
    functions = result["functions"]
    assert list(functions) == ["layer", "gemms", "experts", "block", "loop"]
    assert result["samples"] == 2 and result["tokens"] == 64 and result["threads"] == torch.get_num_threads()
    assert result["same_function_error"] <= serial_path.SAME_FUNCTION_RTOL
    assert functions["gemms"]["over_gemms"] == 1.0
    assert [name for name, f in functions.items() if "over_block" in f] == ["layer"]
    assert all(f["median_s"] > 0 for f in functions.values())
    # The counts are the layer's dispatch of these tokens: every token's two copies, one per expert.
    moe = MoEConfig(32, 64, 4, top_k=2, activation="swiglu")
    layer = MoELayer(moe)
    layer.load_global_weights(init_weights(moe, seed=0))
    ids_TK = layer.plan(tokens(64, 32, 0, stream=1)).routing.ids_TK
    assert result["counts"] == torch.bincount(ids_TK.reshape(-1), minlength=4).tolist()
    text = serial_path.render(result)
    assert "relative error" in text and "2 rounds" in text and result["cpu"] in text
    assert all(f["description"] in text for f in functions.values())


def test_serial_path_ratios_are_medians_of_round_ratios(monkeypatch):
    rounds = {
        "layer": (3.0, 1.0, 4.0),
        "gemms": (1.0, 2.0, 2.0),  # layer/gemms per round 3, 0.5, 2 -> 2 (the ratio of medians: 1.5)
        "experts": (2.0, 2.0, 2.0),  # per round 2, 1, 1 -> 1 (the ratio of medians: 1)
        "block": (2.0, 1.0, 1.0),  # layer/block per round 1.5, 1, 4 -> 1.5 (the ratio of medians: 3)
        "loop": (1.0, 1.0, 1.0),
    }
    monkeypatch.setattr(serial_path, "time_interleaved", lambda fns, **kw: {n: Timing(rounds[n]) for n in fns})
    functions = serial_path.measure(**TINY)["functions"]
    assert functions["layer"]["over_gemms"] == 2.0
    assert functions["layer"]["over_block"] == 1.5
    assert functions["experts"]["over_gemms"] == 1.0
    assert functions["block"]["over_gemms"] == 0.5  # per round 2, 0.5, 0.5 (the ratio of medians: 1)
    assert functions["layer"]["median_s"] == 3.0


def test_serial_path_refuses_to_compare_a_different_function(monkeypatch, capsys):
    def off_by_normalisation(gate, w_in, w_down, activation, top_k, normalize):
        return mixtral_block(gate, w_in, w_down, activation, top_k, not normalize)

    monkeypatch.setattr(serial_path, "mixtral_block", off_by_normalisation)
    with pytest.raises(RuntimeError, match="not the layer's function: relative error"):
        serial_path.measure(**TINY)
    # The command says so in one line and exits 1, before timing anything.
    threads = str(torch.get_num_threads())  # unchanged for the rest of the session
    assert serial_path.main(["--tokens", "16", "--repeats", "1", "--threads", threads]) == 1
    err = capsys.readouterr().err
    assert (
        err.startswith("serial_path: the loop-over-experts block is not the layer's function") and err.count("\n") == 1
    )


def test_serial_path_profile_prints_operators_per_forward(capsys):
    text = serial_path.profile_layer(2, num_tokens=32, rows=40, hidden=16, ffn=32, experts=4)
    lines = text.splitlines()
    assert lines[0] == "EP 1 forward under torch.profiler, 32 tokens, 2 forwards; per forward:"
    calls = {line.split()[0]: int(line.split()[-1]) for line in lines[3:-1]}
    assert calls["aten::mm"] == 8  # two GEMMs per expert, 4 experts, per forward (not summed over forwards)
    assert calls["route"] == 1 and calls["experts[0]"] == 1
    threads = str(torch.get_num_threads())
    assert serial_path.main(["--profile", "1", "--tokens", "8", "--threads", threads]) == 0
    assert "aten::mm" in capsys.readouterr().out
