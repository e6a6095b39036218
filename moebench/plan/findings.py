"""What is wrong with a plan: findings with a stable code, a severity and the numbers behind them.

Codes never change meaning once shipped (the README lists them). Severities: ``error`` (the plan
cannot work as written, or states something false: exit 1), ``warning`` (a risk or a claim off
by a margin), ``info`` (worth knowing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moebench.plan import model as Mo
from moebench.plan.model import Estimate
from moebench.plan.spec import human, in_unit_of

SEVERITIES = ("error", "warning", "info")
MEMORY_TIGHT = 0.9  # of the GPU's memory
CLAIM_CLOSE = 1.25  # a claim within this factor of the derived figure is not reported
CLAIM_FAR = 2.0  # an optimistic performance claim, or any arithmetic claim, off by more is an error
PARAMS_TOLERANCE = 0.10
PLAUSIBLE_VOCAB = 1_000_000


@dataclass(frozen=True)
class Finding:
    code: str
    severity: str
    message: str
    numbers: dict = field(default_factory=dict)


def unit_slip(ratio: float) -> str:
    """'' or a note when ``ratio`` (claimed / derived) is a power-of-1000 or bits/bytes factor."""
    if not (ratio > 0 and math.isfinite(ratio)):
        return ""
    for factor, what in ((1e3, "×1000 (ms vs s, MB vs GB, per ms vs per s)"), (1e6, "×10⁶"), (8, "×8 (bits vs bytes)")):
        for direction, r in (("", ratio), ("1/", 1 / ratio)):
            gap = abs(math.log(r / factor))
            if gap < math.log(1.05):
                return f"exactly {direction}{what}: a unit slip"
            if factor >= 1e3 and gap < math.log(2):
                return f"within 2× of {direction}{what}: possibly a unit slip"
    return ""


DIMS = {"B": "bytes", "s": "time", "FLOP": "flops", "tokens/s": "token_rate"}


def _fmt(value: float, unit: str, like: object = None) -> str:
    """``value`` readably, in the unit ``like`` was written in when there is one."""
    return (in_unit_of(value, like, DIMS[unit]) if like is not None and unit in DIMS else "") or human(value, unit)


# -------------------------------------------------------------------------------------------
# Individual checks


def _params(e: Estimate) -> list[Finding]:
    m, derived = e.plan.model, e["params"]
    if m.params is None:
        return []
    ratio = m.params / derived
    if abs(ratio - 1) <= PARAMS_TOLERANCE:
        return []
    numbers = {"declared": m.params, "derived": derived, "ratio": ratio}
    message = f"declared {m.params:.4g} parameters; the architecture gives {derived:.4g} ({ratio:.3g}×)"
    severity = "error"
    if m.vocab == 0 and ratio > 1:  # the missing embedding might explain the gap
        vocab = (m.params - derived) / ((1 if m.tie_embeddings else 2) * m.hidden)
        numbers["vocab_needed"] = vocab
        message += f"; closing the gap with an embedding and LM head needs vocab ≈ {vocab:.3g}"
        if vocab <= PLAUSIBLE_VOCAB:
            severity = "warning"
            message += ", plausible: state vocab"
        else:
            message += f", more than {PLAUSIBLE_VOCAB:.0e}: no plausible vocabulary does"
    if slip := unit_slip(ratio):
        message += f"; {slip}"
    return [Finding("params.impossible", severity, message, numbers)]


def _degrees(e: Estimate) -> list[Finding]:
    p, out = e.plan, []
    m, par, wl = p.model, p.parallel, p.workload
    divides = [
        ("ep", par.ep, "experts", m.experts),
        ("pp", par.pp, "layers", m.layers),
        ("tp", par.tp, "heads", m.heads),
        ("tp", par.tp, "ffn_hidden", m.ffn_hidden),
    ]
    for degree, value, what, total in divides:
        if total % value:
            out.append(Finding(
                "degrees.indivisible", "error",
                f"{degree} = {value} does not divide {what} = {total}: ranks would hold unequal shares",
                {"degree": degree, "value": value, what: total},
            ))  # fmt: skip
    if m.kv_heads % par.tp and par.tp % m.kv_heads:
        out.append(Finding(
            "degrees.indivisible", "error", f"tp = {par.tp} and kv_heads = {m.kv_heads}: neither divides the other",
            {"tp": par.tp, "kv_heads": m.kv_heads},
        ))  # fmt: skip
    ranks = Mo.data_ranks(p)
    if wl.batch < ranks:
        out.append(Finding(
            "degrees.idle_ranks", "error",
            f"batch = {wl.batch} sequences over EP·DP = {ranks} data ranks: {ranks - wl.batch} ranks get none",
            {"batch": wl.batch, "data_ranks": ranks},
        ))  # fmt: skip
    elif wl.batch % ranks:
        out.append(Finding(
            "degrees.uneven_batch", "warning",
            f"batch = {wl.batch} over EP·DP = {ranks} data ranks is uneven: the busiest holds {Mo.seqs_per_rank(p)}",
            {"batch": wl.batch, "data_ranks": ranks},
        ))  # fmt: skip
    if wl.microbatches > Mo.seqs_per_rank(p):
        out.append(Finding(
            "degrees.empty_microbatches", "warning",
            f"microbatches = {wl.microbatches} but a data rank holds {Mo.seqs_per_rank(p)} sequences",
            {"microbatches": wl.microbatches, "sequences_per_rank": Mo.seqs_per_rank(p)},
        ))  # fmt: skip
    if m.heads * m.head_dim != m.hidden:
        out.append(Finding(
            "model.heads_hidden", "info", f"heads·head_dim = {m.heads * m.head_dim} differs from hidden = {m.hidden}",
            {"heads_x_head_dim": m.heads * m.head_dim, "hidden": m.hidden},
        ))  # fmt: skip
    return out


def _gpus(e: Estimate) -> list[Finding]:
    claimed, par = e.plan.claims.gpus, e.plan.parallel
    if claimed is None or claimed == par.gpus:
        return []
    ratio = claimed / par.gpus
    message = (
        f"the plan claims {claimed} GPUs; its degrees EP·TP·PP·DP = {par.ep}·{par.tp}·{par.pp}·{par.dp} "
        f"give {par.gpus} ({ratio:.3g}×)"
    )
    if (m := e.plan.model).experts * m.layers * par.tp == claimed:
        message += "; the claim equals experts·layers·TP, which counts every layer's experts on their own GPUs"
    return [Finding("gpus.mismatch", "error", message, {"claimed": claimed, "derived": par.gpus, "ratio": ratio})]


def _memory(e: Estimate) -> list[Finding]:
    used, have = e.memory.total, e.plan.hardware.memory
    numbers = {"memory_per_gpu": used, "gpu_memory": have, "fraction": used / have}
    parts = ", ".join(
        f"{name} {value / 1e9:.3g} GB"
        for name, value in [("weights", e.memory.weights), ("KV cache", e.memory.kv_cache),
                            ("activations", e.memory.activations), ("buffers", e.memory.comm_buffers)]
    )  # fmt: skip
    if used > have:
        return [
            Finding(
                "memory.overflow", "error", f"{used / 1e9:.3g} GB per GPU ({parts}) exceed {have / 1e9:.3g} GB", numbers
            )
        ]
    if used > MEMORY_TIGHT * have:
        return [Finding("memory.tight", "warning", f"{used / have:.0%} of GPU memory in use ({parts})", numbers)]
    return []


def _capacity(e: Estimate) -> list[Finding]:
    p = e.plan
    cf, skew, E = p.parallel.capacity_factor, p.workload.routing_skew, p.model.experts
    if cf == 0:
        return []
    out = []
    if cf < 1:
        out.append(Finding(
            "capacity.drops", "error",
            f"capacity_factor = {cf:g} < 1 drops at least {1 - cf:.1%} of token copies even under perfect balance",
            {"capacity_factor": cf, "dropped_fraction_at_least": 1 - cf},
        ))  # fmt: skip
    elif skew > cf:
        dropped = (skew - cf) / E
        out.append(Finding(
            "capacity.drops", "error",
            f"routing_skew = {skew:g} exceeds capacity_factor = {cf:g}: the busiest expert drops at least "
            f"{dropped:.2%} of all token copies",
            {"capacity_factor": cf, "routing_skew": skew, "dropped_fraction_at_least": dropped},
        ))  # fmt: skip
    if (cv := p.slo.max_load_cv) is not None and 1 + cv * math.sqrt(E - 1) > cf:
        bound = 1 + cv * math.sqrt(E - 1)
        out.append(Finding(
            "capacity.may_drop", "warning",
            f"max_load_cv = {cv:g} allows the busiest of {E} experts up to 1 + CV·√(E−1) = {bound:.3g}× the mean, "
            f"above capacity_factor = {cf:g}: a load the SLO accepts can still drop tokens",
            {"max_load_cv": cv, "max_imbalance_allowed": bound, "capacity_factor": cf},
        ))  # fmt: skip
    return out


def _slos(e: Estimate) -> list[Finding]:
    slo, out = e.plan.slo, []
    gates = [("ttft", slo.ttft, "s", "max"), ("tpot", slo.tpot, "s", "max"),
             ("throughput_per_gpu", slo.throughput_per_gpu, "tokens/s", "min")]  # fmt: skip
    for key, limit, unit, op in gates:
        if limit is None:
            continue
        value, written = e[key], e.plan.written.get("slo", {}).get(key)
        met = value <= limit if op == "max" else value >= limit
        if not met:
            word = "above" if op == "max" else "below"
            out.append(Finding(
                f"slo.{key}", "error",
                f"{key} = {_fmt(value, unit, written)} is {word} the SLO {_fmt(limit, unit, written)}",
                {"derived": value, "limit": limit, "ratio": value / limit},
            ))  # fmt: skip
    return out


# claim key -> (derived figure, unit, kind): "perf" claims are judged by direction, "arith" both ways
CLAIMS = {
    "memory_per_gpu": ("memory_per_gpu", "B", "arith"),
    "weights_per_gpu": ("weights_per_gpu", "B", "arith"),
    "weights_total": ("weights_total", "B", "arith"),
    "flops_per_token": ("flops_per_token", "FLOP", "arith"),
    "expert_flops_per_token": ("expert_flops_per_token", "FLOP", "arith"),
    "compute_bound_throughput_per_gpu": ("compute_bound_throughput_per_gpu", "tokens/s", "higher"),
    "throughput_per_gpu": ("throughput_per_gpu", "tokens/s", "higher"),
    "ttft": ("ttft", "s", "lower"),
    "tpot": ("tpot", "s", "lower"),
}


def _from_own_claims(e: Estimate, key: str) -> float | None:
    """A figure recomputed from the plan's own claimed inputs, to catch slips in its arithmetic:
    compute-bound throughput = peak · mfu / the claimed FLOPs per token."""
    c, hw = e.plan.claims, e.plan.hardware
    flops = c.flops_per_token or c.expert_flops_per_token
    if key == "compute_bound_throughput_per_gpu" and flops:
        return hw.peak_flops * hw.mfu / flops
    return None


def _claims(e: Estimate) -> list[Finding]:
    out, claims, written = [], e.plan.claims, e.plan.written.get("claims", {})
    for key, (figure, unit, kind) in CLAIMS.items():
        claimed = getattr(claims, key)
        if claimed is None:
            continue
        derived = e[figure]
        ratio = claimed / derived
        own = _from_own_claims(e, key)
        slip = unit_slip(ratio) or (unit_slip(claimed / own) if own else "")
        if 1 / CLAIM_CLOSE <= ratio <= CLAIM_CLOSE and not slip:
            continue
        optimistic = (kind == "higher" and ratio > 1) or (kind == "lower" and ratio < 1)
        far = max(ratio, 1 / ratio) > CLAIM_FAR
        severity = "error" if (far and (kind == "arith" or optimistic)) or slip.startswith("exactly") else "warning"
        as_written = written.get(key, claimed)
        message = f"claims {key} = {as_written}; derived {_fmt(derived, unit, as_written)} ({ratio:.3g}×"
        message += ", optimistic)" if optimistic else ")"
        numbers = {"claimed": claimed, "derived": derived, "ratio": ratio}
        if own:
            message += f"; the plan's own figures give {_fmt(own, unit, as_written)} ({claimed / own:.4g}×)"
            numbers["from_own_claims"] = own
        if slip:
            message += f"; {slip}"
        out.append(Finding(f"claim.{key}", severity, message, numbers))
    return out


def findings(e: Estimate) -> list[Finding]:
    """Every finding on the plan, errors first."""
    found = [f for check in (_params, _gpus, _degrees, _memory, _capacity, _slos, _claims) for f in check(e)]
    return sorted(found, key=lambda f: SEVERITIES.index(f.severity))
