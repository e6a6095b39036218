"""Routing skew: the share of token copies each expert should get, and the router logit offsets
that make a stack's measured shares follow it.

Shape legend: M = calibration samples, N = calibration tokens, E = experts, K = top_k, D = hidden.

A skew names a target distribution of expert popularity, as shares of the routed token copies.
Each token sends K copies to K distinct experts, so no expert can take more than 1/K of them:

- ``uniform``: 1/E each.
- ``zipf`` (s, default 1.0): the expert of popularity rank r gets a share ∝ 1/r^s (ranks over a
  seeded permutation of the experts).
- ``hot`` (h, default 3.0): one seeded expert gets h times the share of each other expert,
  h / (h + E − 1); the others share the rest equally.
- ``single``: every token's first choice is one seeded expert (its share is 1/K); the other
  K − 1 copies of each token spread equally over the other experts.

A target that asks an expert for more than 1/K is refused (``target_shares`` says which values
are accepted).

Why calibrate. The router's logits are ``x · W_gateᵀ + b``. With random gate weights the experts
are not equally popular even when b = 0: at D = 32 the rows' norms differ by ±25 %, and an expert
whose logits spread more wins more argmaxes (measured: max/mean load 1.40 on 8 experts where
equal shares give under 1.125). So ``b`` is fitted, per layer, until the shares routed on a
calibration sample match the target; the whole router still runs on every real token.

Calibration of layer l (``calibrate_offsets``), deterministic for a seed:

1. The logits' mean and covariance without offset. Layer 0 sees the workload's tokens,
   x ~ N(0, I), so they are exactly 0 and W Wᵀ. A deeper layer sees the residual stream:
   ``FORWARD_TOKENS`` seeded tokens are run through the layers below it (already calibrated,
   fp32, one process), and the moments of its logits on them are taken. As many tokens as
   ``FORWARD_FLOPS`` pays for, within ``FORWARD_TOKENS``: the moments' own error sets the deeper
   layers' accuracy (measured at D = 64, E = 16: shares within 3 % of target at 65,536 tokens,
   within 7 % at 8,192).
2. ``M`` Gaussian logit vectors with those moments are drawn (a logit is a sum over D inputs, so
   close to Gaussian; for layer 0 it is exact). Their number bounds the fit's own error to about
   √(E / (M·K)) of a share (0.8 % at E = 16, K = 1).
3. Damped fixed point: b_e ← b_e + η · log(p_e / ŝ_e(b)), where ŝ_e is the share expert e gets
   on the sample and η starts at half the logits' standard deviation (halved after a step that
   made the fit worse), until every |log(ŝ_e / p_e)| is under ``TOLERANCE`` or ``MAX_STEPS`` pass (the best b
   seen is kept). Experts with a target share of 1/K (``single``'s expert) get a fixed offset of
   +``FIXED_OFFSET_SIGMAS`` logit standard deviations, experts with share 0 the negative of it:
   no other logit overcomes such a gap.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SKEWS = ("uniform", "zipf", "hot", "single")
VERSION = 2  # of the calibration method: part of the cache key (with the constants below), bump on a change
DEFAULT_SKEW_PARAM = {"uniform": 0.0, "zipf": 1.0, "hot": 3.0, "single": 0.0}
MAX_SKEW_PARAM = {"zipf": 4.0, "hot": 1e4}
MIN_COPIES = 50  # the rarest expert must get this many of a calibration sample's M·K copies
FIXED_OFFSET_SIGMAS = 30.0
SAMPLE_ELEMENTS = 2**22  # M·E logits per calibration (16 MiB of fp32)
MAX_SAMPLES = 2**18
FORWARD_FLOPS = 2e10  # the calibration forward's budget (about a second on one CPU core)
FORWARD_TOKENS = (8192, 65536)  # the fewest and most calibration tokens a deeper layer's moments come from
TOLERANCE = 0.004  # about half the sample's own error at E = 16
MAX_STEPS = 100


def skew_param(skew: str, param: float | None) -> float:
    """The skew's parameter, its default when ``param`` is None."""
    return DEFAULT_SKEW_PARAM[skew] if param is None else float(param)


def target_shares(skew: str, param: float | None, num_experts: int, top_k: int, order_E: torch.Tensor) -> np.ndarray:
    """Target share of copies per expert (sums to 1); ``order_E[r]`` is the expert of rank r.

    Raises ``ValueError`` naming the skew, its parameter and what is accepted when the target is
    not a valid routing (an expert above 1/K, a parameter out of range).
    """
    if skew not in SKEWS:
        raise ValueError(f'skew = "{skew}" is invalid: accepted one of {", ".join(SKEWS)}')
    s = skew_param(skew, param)
    limit = MAX_SKEW_PARAM.get(skew, math.inf)
    if not (math.isfinite(s) and 0 <= s <= limit):
        accepted = f"a number from 0 to {limit:g}" if math.isfinite(limit) else "a finite number >= 0"
        raise ValueError(f'skew_param = {s!r} is invalid for skew = "{skew}": accepted {accepted}')
    e, k = num_experts, top_k
    problem = _feasible(skew, s, e, k)
    if problem:
        raise ValueError(
            f'skew = "{skew}" with skew_param = {s:g} {problem}: accepted skew_param <= '
            f"{_largest_param(skew, e, k):.3g} for {e} experts and top_k = {k}"
        )
    by_rank = _by_rank(skew, s, e, k)
    shares = np.empty(e)
    shares[order_E.numpy()] = by_rank
    return shares


def _by_rank(skew: str, s: float, e: int, k: int) -> np.ndarray:
    """Target shares in popularity order (sums to 1), before the feasibility checks."""
    by_rank = np.full(e, 1.0 / e)
    if skew == "zipf":
        by_rank = np.arange(1, e + 1, dtype=np.float64) ** -s
    elif skew == "hot":
        by_rank = np.array([s] + [1.0] * (e - 1))
    elif skew == "single":
        by_rank = np.array([1.0 / k] + [(1.0 - 1.0 / k) / (e - 1)] * (e - 1)) if e > 1 else np.ones(1)
    return by_rank / by_rank.sum()


def _feasible(skew: str, s: float, e: int, k: int) -> str | None:
    """Why no calibrated router can produce the target, or None: an expert above 1/K, or an expert so
    rare that a calibration sample gives it fewer than ``MIN_COPIES`` copies."""
    by_rank = _by_rank(skew, s, e, k)
    if by_rank[0] > 1.0 / k + 1e-12:
        return f"asks one expert for {by_rank[0]:.3f} of the copies, but with top_k = {k} an expert takes at most 1/{k}"
    copies = calibration_samples(e) * k
    if skew in ("zipf", "hot") and by_rank.min() * copies < MIN_COPIES:
        return (
            f"asks the rarest expert for {by_rank.min():.2g} of the copies, below the {MIN_COPIES / copies:.2g} "
            f"the calibration resolves ({MIN_COPIES} of its {copies} copies)"
        )
    return None


def _largest_param(skew: str, e: int, k: int) -> float:
    """The largest zipf s or hot h whose target is still feasible (``_feasible``), by bisection."""
    lo, hi = 0.0, MAX_SKEW_PARAM[skew]
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _feasible(skew, mid, e, k) is None else (lo, mid)
    return lo


def routed_shares(logits_ME: torch.Tensor, top_k: int) -> torch.Tensor:
    """Share of the M·K copies each expert gets when every row picks its top-K logits."""
    num_experts = logits_ME.shape[1]
    ids = logits_ME.argmax(dim=1) if top_k == 1 else logits_ME.topk(top_k, dim=1).indices.reshape(-1)
    return torch.bincount(ids, minlength=num_experts).double() / ids.numel()


def gaussian_logits(mean_E: torch.Tensor, cov_EE: torch.Tensor, samples: int, gen: torch.Generator) -> torch.Tensor:
    """``samples`` draws of N(mean, cov) (fp32), through the symmetric square root of ``cov``."""
    eigval_E, eigvec_EE = torch.linalg.eigh(cov_EE.double())
    root_EE = (eigvec_EE * eigval_E.clamp(min=0).sqrt()) @ eigvec_EE.T
    z_ME = torch.randn(samples, mean_E.numel(), generator=gen, dtype=torch.float64)
    return (z_ME @ root_EE + mean_E.double()).float()


def fit_offsets(logits_ME: torch.Tensor, target_E: np.ndarray, top_k: int) -> tuple[torch.Tensor, float]:
    """The offset b (fp32) whose top-K shares on ``logits_ME`` follow ``target_E`` (see step 3 of the
    module docstring), and the largest |log(share / target)| it leaves over the experts it fits."""
    num_samples, num_experts = logits_ME.shape
    target = torch.as_tensor(target_E, dtype=torch.float64)
    sigma = float(logits_ME.std(dim=0).max()) or 1.0
    fixed_hi, fixed_lo = target >= 1.0 / top_k - 1e-12, target <= 0
    free = ~(fixed_hi | fixed_lo)
    b = torch.zeros(num_experts, dtype=torch.float64)
    b[fixed_hi], b[fixed_lo] = FIXED_OFFSET_SIGMAS * sigma, -FIXED_OFFSET_SIGMAS * sigma
    if not bool(free.any()):
        return b.float(), 0.0
    floor = 0.5 / (num_samples * top_k)  # an expert no sample picked counts as half a copy
    # A share moves by more than e^Δb when b moves by Δb (about e^(2Δb/σ) at top-1), so the step is
    # damped by the logits' spread, and halved whenever it made the fit worse.
    step = 0.5 * float(logits_ME.std(dim=0).mean())
    best, best_err, best_ratio = b.clone(), math.inf, None
    for _ in range(MAX_STEPS):
        shares = routed_shares(logits_ME + b.float(), top_k).clamp(min=floor)
        log_ratio = torch.log(target[free] / shares[free])
        err = float(log_ratio.abs().max())
        if err < best_err:
            best, best_err, best_ratio = b.clone(), err, log_ratio
            if err < TOLERANCE:
                break
        else:
            step /= 2  # overshot: a shorter step from the best point so far
        b = best.clone()
        b[free] += step * best_ratio
        b[free] -= b[free].mean()  # only differences matter; keep the offsets centred
    return best.float(), best_err


def constants() -> tuple:
    """Every constant the calibration's result depends on (part of its cache key)."""
    return (FIXED_OFFSET_SIGMAS, SAMPLE_ELEMENTS, MAX_SAMPLES, FORWARD_FLOPS, FORWARD_TOKENS, TOLERANCE, MAX_STEPS)


def calibration_samples(num_experts: int) -> int:
    """M: Gaussian logit samples per calibration, ``SAMPLE_ELEMENTS`` logits in all, at most ``MAX_SAMPLES``."""
    return min(max(SAMPLE_ELEMENTS // num_experts, 1024), MAX_SAMPLES)


def forward_tokens(hidden: int, ffn_hidden: int, num_experts: int, top_k: int, swiglu: bool, layers: int) -> int:
    """Calibration tokens for the deeper layers: what ``FORWARD_FLOPS`` pays for, in ``FORWARD_TOKENS``."""
    per_token_layer = 2 * hidden * num_experts + 2 * top_k * (3 if swiglu else 2) * hidden * ffn_hidden
    fewest, most = FORWARD_TOKENS
    affordable = int(FORWARD_FLOPS / (per_token_layer * max(layers - 1, 1))) // 1024 * 1024
    return min(max(affordable, fewest), most)
