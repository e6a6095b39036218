"""The grouped expert GEMM backends agree with each other and with fp64 (runtime/experts.py).

Every expected value is computed independently of ``runtime/``: plain Python loops, integer
arithmetic or fp64 tensor arithmetic written out in the tests.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import FAST, expert_weights, ffn_rows_fp64

from runtime.experts import expert_ffn

BACKENDS = ("loop", "bmm", "grouped_mm")

# ---------------------------------------------------------------------------------------------
# Expert GEMM backends


@FAST
@given(
    counts=st.lists(st.integers(0, 6), min_size=1, max_size=4),
    activation=st.sampled_from(["gelu", "swiglu"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_expert_backends_agree_with_a_per_row_fp64_reference(counts, activation, seed):
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed)
    x_RD = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(seed + 1))
    expected = ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts, activation)
    outs = {b: expert_ffn(x_RD, w_in_LDH, w_down_LFD, counts, activation, b) for b in BACKENDS}
    for backend, y_RD in outs.items():
        assert y_RD.shape == x_RD.shape, backend
        torch.testing.assert_close(y_RD.double(), expected, rtol=1e-4, atol=1e-5, msg=backend)
    for backend in ("bmm", "grouped_mm"):
        torch.testing.assert_close(outs[backend], outs["loop"], rtol=1e-5, atol=1e-6, msg=backend)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("counts", [[0, 5, 0], [7, 0, 0, 0], [0, 0, 0, 6], [0, 0], [3, 0, 2, 0]], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_backend_handles_empty_experts_and_all_rows_on_one_expert(backend, counts, activation):
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed=7)
    x_RD = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(3))
    y_RD = expert_ffn(x_RD, w_in_LDH, w_down_LFD, counts, activation, backend)
    expected = ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts, activation)
    assert y_RD.shape == (sum(counts), 8)
    torch.testing.assert_close(y_RD.double(), expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), num_local=st.integers(1, 4), activation=st.sampled_from(["gelu", "swiglu"]))
def test_loop_backend_takes_runs_in_any_order_with_their_experts(data, num_local, activation):
    # rows as received at EP > 1: runs (source rank, local expert), several runs per expert
    run_experts = data.draw(st.lists(st.integers(0, num_local - 1), min_size=1, max_size=8))
    counts = data.draw(st.lists(st.integers(0, 4), min_size=len(run_experts), max_size=len(run_experts)))
    assume(sum(counts) > 0)
    w_in_LDH, w_down_LFD = expert_weights(num_local, activation, seed=5)
    x_RD = torch.randn(sum(counts), 8, generator=torch.Generator().manual_seed(6))
    expected = ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts, activation, run_experts)
    got = expert_ffn(x_RD, w_in_LDH, w_down_LFD, counts, activation, "loop", run_experts)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)
    # under autograd too: each weight's gradient collects every run of its expert
    leaves = [t.clone().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    expert_ffn(*leaves, counts, activation, "loop", run_experts).sum().backward()
    leaves64 = [t.double().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    ffn_rows_fp64(*leaves64, counts, activation, run_experts).sum().backward()
    for t, t64 in zip(leaves, leaves64, strict=True):
        torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["bmm", "grouped_mm"])
def test_grouped_backends_refuse_runs_out_of_expert_order(backend):
    w_in_LDH, w_down_LFD = expert_weights(2, "gelu", seed=1)
    with pytest.raises(ValueError, match="expert-major"):
        expert_ffn(torch.randn(3, 8), w_in_LDH, w_down_LFD, [1, 2], "gelu", backend, [1, 0])


def _grads(backend, x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD):
    leaves = [t.clone().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    (expert_ffn(*leaves, counts, activation, backend) * g_RD).sum().backward()
    return [t.grad for t in leaves]


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    activation=st.sampled_from(["gelu", "swiglu"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_expert_loop_and_bmm_backends_have_the_same_gradients_as_the_fp64_reference(counts, activation, seed):
    assume(sum(counts) > 0)
    w_in_LDH, w_down_LFD = expert_weights(len(counts), activation, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x_RD = torch.randn(sum(counts), 8, generator=gen)
    g_RD = torch.randn(sum(counts), 8, generator=gen)  # random upstream gradient
    loop = _grads("loop", x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD)
    bmm = _grads("bmm", x_RD, w_in_LDH, w_down_LFD, counts, activation, g_RD)
    leaves = [t.double().requires_grad_(True) for t in (x_RD, w_in_LDH, w_down_LFD)]
    (ffn_rows_fp64(*leaves, counts, activation) * g_RD.double()).sum().backward()
    for name, a, b, ref in zip(("x", "w_in", "w_down"), loop, bmm, leaves, strict=True):
        # fp32 sums that cancel: an entry of -0.0049 in a gradient whose largest is 10.3 differed by
        # 1.4e-6 (counts [3, 2], swiglu, seed 3), so the absolute tolerance scales with the largest
        scale = max(1.0, float(a.abs().max()))
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * scale, msg=name)
        torch.testing.assert_close(a.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_auto_picks_grouped_mm_on_hopper_only_for_rows_of_whole_16_byte_units(monkeypatch):
    from runtime.experts import resolve_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    hopper = torch.device("cuda")
    assert resolve_backend("auto", hopper, torch.float32, (16, 64, 32)) == "grouped_mm"
    assert resolve_backend("auto", hopper, torch.float32, (2, 64, 32)) == "loop"  # 8-byte rows
    assert resolve_backend("auto", hopper, torch.bfloat16, (8, 24, 16)) == "grouped_mm"
    assert resolve_backend("auto", hopper, torch.bfloat16, (12, 24, 16)) == "loop"  # 24-byte rows
