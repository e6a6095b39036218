"""``moebench plan --calibrate RESULTS...``: fit the model's efficiency factors to measured runs.

Three fits, each a least-squares fit of relative error (every run counts alike whatever its size),
non-negative, with scipy's ``nnls``:

- GEMM (``experts`` runs): t = flops / (R · r/(r + r½)) = flops/R + (flops/r)·r½/R, with r the rows
  per expert. Linear in 1/R and r½/R. R is the large-GEMM rate; mfu = R / the plan's peak.
- All-to-all (``dispatch`` and ``throughput`` runs at 2+ ranks): per layer t = α + bytes/β, with
  bytes the nccl-tests size S of one layer times (W−1)/W (the off-rank part, as busbw counts it).
- Host-to-device (throughput or latency runs with ``[offload]``): the expert copies' total time
  t = bytes/β, with bytes and time summed over the run's caches (``details.offload``).
- The offloaded step, the plan model's ``offloaded_time``: t = resident step + copied bytes per
  step / β, with β fitted on the other runs; its held-out error is the model's error on offload.
- TTFT and TPOT (``serve`` runs): measured = a + b · the plan model's prediction for the run's
  deployment (``serve_runs``) on the calibrating plan's hardware with the factors the GEMM and
  all-to-all fits measured (the machine the runs ran on, as far as those fits know it): the
  idle-engine TTFT (``idle_ttft_s``) against ``prefill``, ``tpot_s`` against ``decode``. With the
  fit, the plan's own TTFT and TPOT are given calibrated, a + b · its value with the same factors.

Each fit is judged on runs held out of it: leave one run out, fit the rest, predict the one left
out. The report gives every held-out error, whatever it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import nnls

from moebench.plan import serve_runs
from moebench.plan.model import decode, offloaded_time, prefill
from moebench.plan.spec import Plan
from moebench.report.results import find, read_any
from moebench.text import clip

MIN_RUNS = 3  # a two-parameter fit left one run out still has two


@dataclass(frozen=True)
class Observation:
    source: str
    label: str
    features: tuple[float, float]  # the fit's two regressors
    measured: float  # median time, s
    rows: float = 0.0  # GEMM: rows per expert


@dataclass(frozen=True)
class Fit:
    name: str
    coefs: tuple[float, ...] = ()
    observations: list = field(default_factory=list)
    held_out: list = field(default_factory=list)  # predicted time of each run, fitted without it
    reason: str = ""  # why there is no fit

    @property
    def fitted(self) -> bool:
        return bool(self.coefs)

    def errors(self) -> list[float]:
        return [p / o.measured - 1 for p, o in zip(self.held_out, self.observations, strict=True)]


def _solve(obs: list[Observation]) -> tuple[float, float]:
    A = np.array([o.features for o in obs]) / np.array([[o.measured] for o in obs])
    coefs, _ = nnls(A, np.ones(len(obs)))
    return float(coefs[0]), float(coefs[1])


def fit(name: str, obs: list[Observation], what: str) -> Fit:
    if len(obs) < MIN_RUNS:
        return Fit(name, observations=obs, reason=f"{len(obs)} {what} runs found; the fit needs at least {MIN_RUNS}")
    if len({o.features for o in obs}) < 2:
        return Fit(name, observations=obs, reason=f"every {what} run has the same size: nothing to fit a slope to")
    held_out = []
    for i, o in enumerate(obs):
        a, b = _solve(obs[:i] + obs[i + 1 :])
        held_out.append(a * o.features[0] + b * o.features[1])
    return Fit(name, _solve(obs), obs, held_out)


# -------------------------------------------------------------------------------------------
# Observations from result files


def _measured(where: str, value) -> float | None:
    """``value`` if it is a number > 0; None for null or 0 (not measured: e.g. no bytes off-rank at one
    rank); a ``ValueError`` naming ``where`` for NaN, infinity, a negative number or text, which no run
    measures and which would fit a rate of 0 (or infinity) with NaN errors."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{where} = {clip(json.dumps(value))} is invalid: accepted a finite number > 0 or null")
    return float(value)


def _median(path, i: int, run: dict, metric: str) -> float | None:
    m = run.get("metrics", {}).get(metric)
    return None if m is None else _measured(f"{path}: runs[{i}].metrics.{metric}.median", m.get("median"))


def _caches(path, i: int, run: dict) -> tuple[float, float]:
    """(bytes copied, copy seconds) summed over the run's caches (``details.offload``: per rank, per layer)."""
    ranks = (run.get("details") or {}).get("offload", [])
    if not isinstance(ranks, list) or not all(
        isinstance(r, list) and all(isinstance(c, dict) for c in r) for r in ranks
    ):
        raise ValueError(f"{path}: runs[{i}].details.offload is invalid: accepted a list (ranks) of lists of tables")
    copied, copy_s = 0.0, 0.0
    for r, rank in enumerate(ranks):
        for l, cache in enumerate(rank):
            where = f"{path}: runs[{i}].details.offload[{r}][{l}]"
            copied += _measured(f"{where}.h2d_bytes", cache.get("h2d_bytes")) or 0.0
            copy_s += _measured(f"{where}.copy_s", cache.get("copy_s")) or 0.0
    return copied, copy_s


def observations(paths: list[str], p: Plan) -> tuple[list[Observation], ...]:
    """(GEMM, all-to-all, host-to-device, offloaded-step, TTFT and TPOT observations, environments)
    from result files or folders; TTFT and TPOT are predicted on ``p``'s hardware. The i-th
    host-to-device and offloaded-step observations are the same run's."""
    gemm, a2a, h2d, offload, ttft, tpot, envs = [], [], [], [], [], [], []
    for path in find(paths):
        doc = read_any(path)
        if doc.get("schema") != "moebench.result/1":
            continue
        envs.append(doc["environment"])
        for i, run in enumerate(doc["runs"]):
            if run.get("status") != "ok":
                continue
            params = " ".join(f"{k}={v}" for k, v in run["params"].items())
            cfg, label = run["config"], f"{doc['scenario']['scenario']['name']} {params}".strip()
            model, wl = cfg["model"], cfg["workload"]
            if (t := _median(path, i, run, "expert_time_s")) is not None:
                m = 3 if model["activation"] == "swiglu" else 2
                rows = wl["tokens_per_rank"] * model["top_k"]
                flops = 2.0 * rows * m * model["hidden"] * model["ffn_hidden"]
                per_expert = rows / model["num_experts"]
                gemm.append(Observation(str(path), label, (flops, flops / per_expert), t, per_expert))
            t, bw = _median(path, i, run, "a2a_time_s"), _median(path, i, run, "a2a_algbw_gbps")
            if t is not None and bw is not None and run["world_size"] > 1:
                layers, world = model["layers"], run["world_size"]
                size = bw * 1e9 * t / layers  # nccl-tests S of one layer
                a2a.append(Observation(str(path), label, (1.0, size * (world - 1) / world), t / layers))
            copied, copy_s = _caches(path, i, run)
            resident = _median(path, i, run, "resident_step_time_s")
            offloaded = _median(path, i, run, "offload_step_time_s")
            if copied > 0 and copy_s > 0 and resident is not None and offloaded is not None:
                h2d.append(Observation(str(path), label, (float(copied), 0.0), copy_s))
                per_step = copied / run["world_size"] / run["metrics"]["offload_step_time_s"]["n"]
                offload.append(Observation(str(path), label, (resident, per_step), offloaded))
            if doc["scenario"]["scenario"]["kind"] == "serve":
                for phase, metric, obs in (("prefill", "idle_ttft_s", ttft), ("decode", "tpot_s", tpot)):
                    if (t := _median(path, i, run, metric)) is not None:
                        model_s = serve_runs.predicted(p, run, phase, f"{path}: runs[{i}]")
                        if model_s is not None:
                            obs.append(Observation(str(path), label, (1.0, model_s), t))
    return gemm, a2a, h2d, offload, ttft, tpot, envs


def fit_offloaded(h2d: Fit, obs: list[Observation]) -> Fit:
    """The offloaded step predicted by ``model.offloaded_time`` with β fitted on the other runs'
    copies (``h2d``'s observations, in the same order)."""
    if not h2d.fitted:
        return Fit("offloaded step", observations=obs, reason=f"no host-to-device fit: {h2d.reason}")
    held_out = []
    for i, o in enumerate(obs):
        per_byte, _ = _solve(h2d.observations[:i] + h2d.observations[i + 1 :])
        resident, per_step = o.features
        held_out.append(offloaded_time(resident, per_step, 1 / per_byte) if per_byte > 0 else float("inf"))
    return Fit("offloaded step", h2d.coefs, obs, held_out)


# -------------------------------------------------------------------------------------------
# From fits to the plan's factors


def _device(env: dict) -> str:
    gpus = env.get("gpus") or []
    if gpus:
        first = gpus[0]
        return first.get("name", "") if isinstance(first, dict) else str(first)
    return env.get("cpu") or "cpu"


@dataclass(frozen=True)
class Calibration:
    gemm: Fit
    a2a: Fit
    h2d: Fit
    offload: Fit  # the offloaded step, predicted with the h2d fit
    ttft: Fit  # serve runs' idle TTFT = a + b · the model's prefill
    tpot: Fit  # serve runs' TPOT = a + b · the model's decode
    devices: tuple[str, ...]  # what the results ran on
    factors: dict  # hardware key -> fitted value (only the fitted ones)
    applies: bool  # the results ran on the plan's hardware
    why_not: str = ""
    calibrated: dict = field(default_factory=dict)  # "ttft"/"tpot" -> the plan's own, a + b · model (when applies)


def calibrate(p: Plan, paths: list[str]) -> Calibration:
    gemm_obs, a2a_obs, h2d_obs, offload_obs, _, _, envs = observations(paths, p)
    gemm = fit("gemm", gemm_obs, "experts")
    a2a = fit("all-to-all", a2a_obs, "all-to-all (2+ ranks)")
    h2d = fit("host-to-device", h2d_obs, "offload (with copies)")
    offload = fit_offloaded(h2d, offload_obs)
    factors = {}
    if gemm.fitted and gemm.coefs[0] > 0:
        rate = 1 / gemm.coefs[0]
        factors |= {"gemm_rate": rate, "mfu": rate / p.hardware.peak_flops, "gemm_half_rows": gemm.coefs[1] * rate}
    if a2a.fitted and a2a.coefs[1] > 0:
        factors |= {"intra_node_latency": a2a.coefs[0], "intra_node_bandwidth": 1 / a2a.coefs[1]}
    if h2d.fitted and h2d.coefs[0] > 0:
        factors["host_to_device_bandwidth"] = 1 / h2d.coefs[0]
    # the serve runs are predicted on the machine they ran on, as far as the other fits know it (its GEMM
    # rate and all-to-all), so that a and b measure the model's own error, not the plan's hardware's
    machine = _with_factors(p, factors)
    *_, ttft_obs, tpot_obs, _ = observations(paths, machine)
    ttft = fit("ttft", ttft_obs, "serve (with idle_ttft_s)")
    tpot = fit("tpot", tpot_obs, "serve (with tpot_s)")
    devices = tuple(sorted({_device(env) for env in envs}))
    name = p.hardware.name.strip().lower()
    applies = bool(name) and bool(devices) and all(name in d.lower() for d in devices)
    why_not = "" if applies else (
        f"the results ran on {', '.join(devices) or 'nothing readable'}, not on the plan's hardware "
        f"({p.hardware.name or 'unnamed'}): their factors describe that machine and are not applied"
    )  # fmt: skip
    if applies and factors.get("mfu", 0) > 1:
        applies, why_not = False, f"the fitted GEMM rate is {factors['mfu']:.2f}× the plan's peak_flops: check the peak"
    calibrated = {}
    if applies:  # with the fitted factors, as the serve runs were predicted: the fit maps that prediction to a time
        for key, f, phase in (("ttft", ttft, prefill), ("tpot", tpot, decode)):
            if f.fitted:
                model_s = phase(machine).total
                calibrated[key] = {"model_s": model_s, "calibrated_s": f.coefs[0] + f.coefs[1] * model_s}
    return Calibration(gemm, a2a, h2d, offload, ttft, tpot, devices, factors, applies, why_not, calibrated)


FACTORS = ("mfu", "gemm_half_rows", "intra_node_latency", "intra_node_bandwidth", "host_to_device_bandwidth")


def _with_factors(p: Plan, factors: dict) -> Plan:
    return p.with_hardware(**{k: factors[k] for k in FACTORS if k in factors})


def applied(p: Plan, c: Calibration) -> Plan:
    """The plan with the calibrated factors in place of its own."""
    return _with_factors(p, c.factors)


def to_json(c: Calibration) -> dict:
    def one(f: Fit) -> dict:
        errors = f.errors() if f.fitted else []
        return {
            "fitted": f.fitted,
            "reason": f.reason,
            "coefficients": list(f.coefs),
            "runs": [
                {
                    "label": o.label,
                    "source": o.source,
                    "measured_s": o.measured,
                    "held_out_prediction_s": p if f.fitted else None,
                    "held_out_error": e if f.fitted else None,
                }
                for o, p, e in zip(
                    f.observations,
                    f.held_out or [None] * len(f.observations),
                    errors or [None] * len(f.observations),
                    strict=True,
                )
            ],
            "held_out_abs_error_median": float(np.median(np.abs(errors))) if errors else None,
            "held_out_abs_error_max": float(np.max(np.abs(errors))) if errors else None,
        }

    return {
        "devices": list(c.devices),
        "factors": c.factors,
        "applied": c.applies,
        "why_not_applied": c.why_not,
        "fits": {
            "gemm": one(c.gemm),
            "all_to_all": one(c.a2a),
            "host_to_device": one(c.h2d),
            "offloaded_step": one(c.offload),
            "ttft": one(c.ttft),
            "tpot": one(c.tpot),
        },
        "calibrated": c.calibrated,
    }


def render(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    from moebench.plan.spec import human

    f = doc["factors"]
    lines = [f"calibration from results on {', '.join(doc['devices'])}", ""]
    summary = []
    names = {
        "gemm": "GEMM (rate R, r½)",
        "all_to_all": "all-to-all (α, β)",
        "host_to_device": "host-to-device (β)",
        "offloaded_step": "offloaded step (resident + copies / β)",
        "ttft": "TTFT, serve (a + b · model)",
        "tpot": "TPOT, serve (a + b · model)",
    }
    for key, fit_doc in doc["fits"].items():
        if not fit_doc["fitted"]:
            summary.append([names[key], "not fitted: " + fit_doc["reason"], "-", "-", "-"])
            continue
        if key == "gemm":
            value = f"R = {f.get('gemm_rate', 0) / 1e12:.4g} TFLOP/s, r½ = {f.get('gemm_half_rows', 0):.3g} rows"
        elif key in ("ttft", "tpot"):
            a, b = fit_doc["coefficients"]
            value = f"a = {human(a, 's')}, b = {b:.4g}"
        elif key in ("host_to_device", "offloaded_step"):
            value = f"β = {human(f.get('host_to_device_bandwidth'), 'B')}/s"
        else:
            value = f"α = {human(f.get('intra_node_latency'), 's')}, β = {human(f.get('intra_node_bandwidth'), 'B')}/s"
        median, worst = fit_doc["held_out_abs_error_median"], fit_doc["held_out_abs_error_max"]
        summary.append([names[key], value, len(fit_doc["runs"]), f"{median:.1%}", f"{worst:.1%}"])
    headers = ["fit", "fitted", "runs", "held-out |err| median", "max"]
    lines.append(tabulate(summary, headers=headers, tablefmt=fmt))
    rows = [
        [key, r["label"], human(r["measured_s"], "s"), human(r["held_out_prediction_s"], "s"),
         f"{r['held_out_error']:+.1%}"]
        for key, fit_doc in doc["fits"].items() if fit_doc["fitted"] for r in fit_doc["runs"]
    ]  # fmt: skip
    if rows:
        lines += ["", "each run predicted by a fit that left it out:", ""]
        lines.append(tabulate(rows, headers=["fit", "run", "measured", "predicted", "error"], tablefmt=fmt))
    lines.append("")
    lines.append("factors applied to the plan" if doc["applied"] else f"not applied: {doc['why_not_applied']}")
    for key, c in doc.get("calibrated", {}).items():
        lines.append(
            f"calibrated {key.upper()} of the plan (a + b · model, from serve runs): {human(c['calibrated_s'], 's')} "
            f"(the model with the fitted factors: {human(c['model_s'], 's')})"
        )
    if not doc["applied"] and any(doc["fits"][k]["fitted"] for k in ("ttft", "tpot")):
        lines.append("no calibrated TTFT or TPOT for the plan: its serve fits are not applied, for the same reason")
    return "\n".join(lines)
