"""What a scenario feeds the runtime: seeded weights with calibrated router skew, tokens (also as a
decode-like stream of correlated steps), and the dense stack (the MoE stack is runtime/stack.py).

Shape legend: T = tokens on this rank, N = calibration tokens, D = hidden, E = experts.

Skew is a fixed offset ``b_E`` added to each layer's router logits (``Router.bias_E``), fitted so
that the measured share of copies per expert follows the distribution the skew names
(``moebench/workload/skew.py`` defines the targets and the calibration). The whole router still runs and
every token still gets its own routing. ``skew = "trace"`` leaves the offsets at zero: the
recorded choices replace the router's (``moebench/workload/trace.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import math
import os
from pathlib import Path

import torch
from torch import nn

from moebench import atomic
from moebench.workload import skew as S
from runtime import MoEConfig, MoELayer, MoEWeights, ParallelConfig, init_weights
from runtime.experts import expert_ffn

SKEWS = (*S.SKEWS, "trace")
# The random streams of one seed (``_generator``): tokens of rank r: r; the seeded expert order of a layer:
# 10_000 + layer; the dense stack: 20_000; gradients: 500_000 + r; load_balance batch b: 1_000·(b + 1) + r;
# the calibration: CALIBRATION_STREAM and + 1; step s ≥ 1 of a token stream: STEP_STREAM + s·2**16 + r.
CALIBRATION_STREAM = 10**12  # random streams of the calibration, apart from every workload's (tokens use < 10**10)
STEP_STREAM = 2 * 10**12  # the fresh noise of a token stream's steps: above the calibration's, below 3·10**12
MAX_STEPS = 2**16  # steps of a token stream ([workload] steps)
_RANKS = 2**16  # ranks a step's streams leave room for (world_size <= 2**16), so no two (step, rank) collide


def _generator(seed: int, stream: int) -> torch.Generator:
    """A generator for one independent random stream of a seeded workload."""
    return torch.Generator().manual_seed(seed * 1_000_003 + stream)


def layer_weights(moe: MoEConfig, layers: int, seed: int, skew: str, skew_param: float | None) -> list[MoEWeights]:
    """Seeded global weights for each layer of a stack, each router offset calibrated to ``skew``
    (``router_offsets``; none with ``skew = "trace"``). Deterministic: every rank computes the same."""
    plain = _init_stack(moe, layers, seed)
    if skew == "trace":
        return plain
    offsets = router_offsets(moe, layers, seed, skew, skew_param, _digest(plain))
    return [dataclasses.replace(w, router_bias_E=b) for w, b in zip(plain, offsets, strict=True)]


def expert_order(num_experts: int, seed: int, layer: int) -> torch.Tensor:
    """The seeded popularity order of one layer's experts: ``order[r]`` is the expert of rank r."""
    return torch.randperm(num_experts, generator=_generator(seed, 10_000 + layer))


def layer_targets(moe: MoEConfig, layers: int, seed: int, skew: str, skew_param: float | None) -> list:
    """Each layer's target share of copies per expert (``moebench.workload.skew.target_shares``)."""
    return [
        S.target_shares(skew, skew_param, moe.num_experts, moe.top_k, expert_order(moe.num_experts, seed, layer))
        for layer in range(layers)
    ]


def _init_stack(moe: MoEConfig, layers: int, seed: int) -> list[MoEWeights]:
    return [init_weights(moe, seed=seed * 1_000_003 + layer) for layer in range(layers)]


def _digest(weights: list[MoEWeights]) -> str:
    """A digest of the stack's router weights (part of the calibration cache key)."""
    return hashlib.sha256(b"".join(w.router_ED.numpy().tobytes() for w in weights)).hexdigest()


@functools.lru_cache(maxsize=64)
def router_offsets(
    moe: MoEConfig, layers: int, seed: int, skew: str, skew_param: float | None, routers: str | None = None
) -> tuple:
    """Each layer's calibrated router offset b_E (``moebench.workload.skew``), cached in this process and on
    disk (``cache_dir``), so the ranks of a run read what the parent fitted. The cache key holds what
    the fit depends on: the shape and routing fields of ``moe``, the stack, seed and skew, the
    calibration's version and constants, torch's version and ``routers``, the digest of the router
    weights (computed here when the caller has not already built the weights)."""
    plain = None
    if routers is None:
        plain = _init_stack(moe, layers, seed)
        routers = _digest(plain)
    key = (S.VERSION, S.constants(), torch.__version__, routers, moe.hidden_size, moe.ffn_hidden_size,
           moe.num_experts, moe.top_k, moe.activation, moe.capacity_factor, moe.normalize_topk, layers, seed,
           skew, S.skew_param(skew, skew_param))  # fmt: skip
    if not moe.plain_routing:  # the router variants change the stack the later layers are fitted through
        key += (moe.scoring, moe.topk_before_softmax, moe.group_limited, moe.score_bias, moe.routed_scaling)
    path = cache_dir() / f"skew-{hashlib.sha256(repr(key).encode()).hexdigest()[:32]}.pt"
    offsets = _read_cached(path, layers, moe.num_experts)
    if offsets is None:  # only a miss needs the weights themselves
        offsets = _calibrate(moe, plain or _init_stack(moe, layers, seed), seed, skew, skew_param)
        _write_cached(path, offsets)
    return tuple(offsets)


def cache_dir() -> Path:
    """Where calibrated offsets are kept: $MOEBENCH_CACHE, else $XDG_CACHE_HOME/moebench, else ~/.cache/moebench."""
    if os.environ.get("MOEBENCH_CACHE"):
        return Path(os.environ["MOEBENCH_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moebench"


def _read_cached(path: Path, layers: int, num_experts: int) -> list[torch.Tensor] | None:
    try:
        offsets = torch.load(path, weights_only=True)
    except Exception:  # absent, unreadable or from another torch: compute it again
        return None
    ok = isinstance(offsets, list) and len(offsets) == layers
    return offsets if ok and all(o.shape == (num_experts,) for o in offsets) else None


def _write_cached(path: Path, offsets: list[torch.Tensor]) -> None:
    """Write atomically (ranks may race); a cache that cannot be written is only a slower next run."""
    with contextlib.suppress(OSError):
        atomic.write(path, lambda f: torch.save(offsets, f), binary=True)


def _calibrate(moe: MoEConfig, plain: list[MoEWeights], seed: int, skew: str, skew_param: float | None) -> list:
    """Each layer's fitted offsets, bottom up (see ``moebench.workload.skew``)."""
    layers = len(plain)
    targets = layer_targets(moe, layers, seed, skew, skew_param)
    gen = _generator(seed, CALIBRATION_STREAM)
    samples = S.calibration_samples(moe.num_experts)
    h_ND = None  # the calibration tokens at the current layer's input (layer 0: moments are exact)
    offsets = []
    for layer, (w, target_E) in enumerate(zip(plain, targets, strict=True)):
        router_ED = w.router_ED.double()
        if h_ND is None:
            mean_E, cov_EE = torch.zeros(moe.num_experts, dtype=torch.float64), router_ED @ router_ED.T
        else:
            logits_NE = h_ND.double() @ router_ED.T
            mean_E, cov_EE = logits_NE.mean(0), torch.cov(logits_NE.T).reshape(moe.num_experts, moe.num_experts)
        bias_E, _ = S.fit_offsets(S.gaussian_logits(mean_E, cov_EE, samples, gen), target_E, moe.top_k)
        offsets.append(bias_E)
        if layer + 1 < layers:
            if h_ND is None:
                count = S.forward_tokens(
                    moe.hidden_size, moe.ffn_hidden_size, moe.num_experts, moe.top_k, moe.activation == "swiglu", layers
                )
                h_ND = tokens(count, moe.hidden_size, seed, CALIBRATION_STREAM + 1)
            h_ND = h_ND + _forward_fp32(moe, dataclasses.replace(w, router_bias_E=bias_E), h_ND)
    return offsets


def _forward_fp32(moe: MoEConfig, weights: MoEWeights, x_ND: torch.Tensor) -> torch.Tensor:
    """One layer's output on the CPU in fp32 at EP = 1 (the calibration's view of the stack)."""
    layer = MoELayer(dataclasses.replace(moe, dtype="float32", expert_backend="auto"), ParallelConfig())
    layer.load_global_weights(weights)
    with torch.no_grad():
        return layer(x_ND).out_TD


def tokens(num_tokens: int, hidden: int, seed: int, stream: int) -> torch.Tensor:
    """Random unit-variance tokens [num_tokens, hidden] (never zeros) for one rank and batch."""
    return torch.randn(num_tokens, hidden, generator=_generator(seed, stream))


def step_stream(step: int, rank: int) -> int:
    """The random stream of the fresh noise z_s of step ``step`` ≥ 1 of rank ``rank``'s token stream."""
    return STEP_STREAM + step * _RANKS + rank


def token_stream(
    num_steps: int, num_tokens: int, hidden: int, seed: int, rank: int, correlation: float = 0.0
) -> list[torch.Tensor]:
    """A decode-like stream of ``num_steps`` token batches [num_tokens, hidden] for one rank, each
    correlated with the one before, so that a real router routes consecutive steps alike.

    Step 0 is ``tokens(num_tokens, hidden, seed, rank)``, the input every kind uses (so a stream of
    one step is today's workload). Step s ≥ 1 is x_s = ρ·x_{s−1} + √(1−ρ²)·z_s, with ρ =
    ``correlation`` in [0, 1) and z_s fresh unit-variance noise from its own seeded stream
    (``step_stream``). Every element of every step is standard normal (so the router offsets
    calibrated on unit-variance tokens hold at every step), and element i of x_s correlates with
    element i of x_{s−k} by ρ^k. The steps are separate tensors, kept whole so that a caller can
    index them (a harness cycles step = call mod num_steps): num_steps × num_tokens × hidden fp32
    values in all.
    """
    if not 0 <= correlation < 1:
        raise ValueError(f"correlation = {correlation!r} is invalid: accepted a number >= 0 and < 1")
    if not (1 <= num_steps <= MAX_STEPS and 0 <= rank < _RANKS):
        raise ValueError(f"num_steps = {num_steps}, rank = {rank}: accepted 1 to {MAX_STEPS} steps, rank < {_RANKS}")
    keep, fresh = correlation, math.sqrt(1 - correlation**2)  # ρ² + (1 − ρ²) = 1: unit variance kept
    steps = [tokens(num_tokens, hidden, seed, rank)]
    for step in range(1, num_steps):
        z_TD = tokens(num_tokens, hidden, seed, step_stream(step, rank))
        steps.append(keep * steps[-1] + fresh * z_TD)  # a new tensor: the steps before stay as they were
    return steps


class DenseStack(nn.Module):
    """The dense counterpart of an ``MoEStack``: per layer one FFN of width top_k · ffn_hidden.

    Over T tokens it does the GEMM FLOPs of the MoE layer's experts when no copy is dropped
    (T · top_k rows through an FFN of width ffn_hidden), with the same activation and dtype, and
    none of the routing, permutation or all-to-all. ``step time / dense time`` is the within-run
    ratio ``moe_over_dense``.
    """

    def __init__(self, moe: MoEConfig, layers: int, seed: int, device):
        super().__init__()
        self.activation = moe.activation
        width = moe.top_k * moe.ffn_hidden_size
        width_in = 2 * width if moe.activation == "swiglu" else width
        gen = _generator(seed, 20_000)
        d = moe.hidden_size
        self.w_in = nn.ParameterList(
            torch.randn(1, d, width_in, generator=gen).div_(math.sqrt(d)).to(device, moe.torch_dtype)
            for _ in range(layers)
        )
        self.w_down = nn.ParameterList(
            torch.randn(1, width, d, generator=gen).div_(math.sqrt(width)).to(device, moe.torch_dtype)
            for _ in range(layers)
        )

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        for w_in, w_down in zip(self.w_in, self.w_down, strict=True):
            x_TD = x_TD + expert_ffn(x_TD, w_in, w_down, [x_TD.shape[0]], self.activation, "loop")
        return x_TD
