"""A ``serve`` result run as a plan: the deployment the run measured, on the calibrating plan's hardware,
and the plan model's TTFT and TPOT for it (what ``moebench plan --calibrate`` fits measured times to).

A run maps onto a ``Plan`` by keeping the calibrating plan's hardware (and its SLOs and claims, which
the model does not read) and replacing the model, the parallel degrees and the workload with the run's:

- model: the run's ``config.model`` (``num_experts`` → experts, ``attention_heads`` → heads, ``dtype`` →
  precision, ``vocab`` → an untied LM head), with the decoder's (``runtime/model.py``) FFN layout:
  ``dense_layers`` → first_k_dense with a dense FFN of width top_k·F (dense_ffn_hidden), timed as dense
  layers (no router, no all-to-all); ``shared_experts`` n → n shared experts of width F (the decoder's one
  FFN of width n·F: the same matrices and FLOPs); ``config.routing.scoring`` → scoring (the same
  parameters and time either way); ``qk_norm`` → qk_norm (the same names). The decoder has GQA
  attention without biases or sinks, no MLA and no expert or router biases, so the plan's keys for those
  stay at their defaults: exact, not an approximation. Left out: ``shared_expert_gate`` (d weights and
  one d-long dot product per token and MoE layer), the router's other variants (group_limited,
  score_bias: a choice among the same experts, no extra work the model counts).
- parallel: mode "ep" is EP = world size, mode "dp" is DP = world size (EP = 1); TP = PP = 1; the
  capacity factor is ``config.routing.capacity_factor`` (0: dropless); no offload.
- workload, per phase: prefill is the idle-engine TTFT, one prompt of ``details.idle_prompt_len`` tokens
  on every rank (batch = world size); decode is ``round(details.engine.mean_decode_batch · world size)``
  sequences (at least 1) at the run's mean prompt length S and mean output length O (the model reads
  the context S + O/2). One micro-batch. Routing skew 1 (the busiest expert at the mean): the run's
  named skew distribution is not translated.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

from moebench.plan.model import decode, prefill
from moebench.plan.spec import SCHEMA, Parallel, Plan, Workload
from moebench.text import clip

PRECISION = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # config.model.dtype -> plan precision
PHASES = ("prefill", "decode")


def _bad(where: str, value, accepted: str) -> ValueError:
    return ValueError(f"{where} = {clip(json.dumps(value))} is invalid: accepted {accepted}")


def _count(where: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _bad(where, value, f"an integer >= {low}")
    return value


def _positive(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise _bad(where, value, "a finite number > 0")
    return float(value)


# The plan model's [model] keys a run's config does not set, at their defaults (a plain MoE).
MODEL_DEFAULTS = {
    key: spec.default
    for key, spec in SCHEMA["model"].items()
    if key not in ("layers", "hidden", "heads", "head_dim", "kv_heads", "ffn_hidden", "experts", "top_k", "vocab",
                   "tie_embeddings", "activation", "precision", "params", "shared_experts", "shared_ffn_hidden",
                   "first_k_dense", "dense_ffn_hidden", "scoring", "qk_norm")
}  # fmt: skip


def _model(base: Plan, cfg: dict, where: str):
    m = cfg.get("model") or {}
    at = f"{where}.config.model"
    heads = _count(f"{at}.attention_heads", m.get("attention_heads"))
    hidden = _count(f"{at}.hidden", m.get("hidden"))
    dtype = m.get("dtype", "float32")
    if dtype not in PRECISION:
        raise _bad(f"{at}.dtype", dtype, "one of " + ", ".join(f'"{d}"' for d in PRECISION))
    activation = m.get("activation", "gelu")
    if activation not in ("gelu", "swiglu"):
        raise _bad(f"{at}.activation", activation, 'one of "gelu", "swiglu"')
    scoring = (cfg.get("routing") or {}).get("scoring", "softmax")
    if scoring not in ("softmax", "sigmoid"):
        raise _bad(f"{where}.config.routing.scoring", scoring, 'one of "softmax", "sigmoid"')
    layers = _count(f"{at}.layers", m.get("layers"))
    dense_layers = _count(f"{at}.dense_layers", m.get("dense_layers", 0), low=0)
    if dense_layers > layers:
        raise _bad(f"{at}.dense_layers", dense_layers, f"an integer from 0 to layers = {layers}")
    ffn_hidden = _count(f"{at}.ffn_hidden", m.get("ffn_hidden"))
    top_k = _count(f"{at}.top_k", m.get("top_k", 1))
    shared = _count(f"{at}.shared_experts", m.get("shared_experts", 0), low=0)
    qk_norm = m.get("qk_norm", "none")
    if qk_norm not in ("none", "head", "full"):
        raise _bad(f"{at}.qk_norm", qk_norm, 'one of "none", "head", "full"')
    return replace(
        base.model,
        layers=layers,
        hidden=hidden,
        heads=heads,
        head_dim=_count(f"{at}.head_dim", m.get("head_dim") or hidden // heads),
        kv_heads=_count(f"{at}.kv_heads", m.get("kv_heads") or heads),
        ffn_hidden=ffn_hidden,
        experts=_count(f"{at}.num_experts", m.get("num_experts")),
        top_k=top_k,
        vocab=_count(f"{at}.vocab", m.get("vocab", 0), low=0),  # 0: no LM head, as in a plan
        tie_embeddings=False,
        activation=activation,
        precision=PRECISION[dtype],
        params=None,
        shared_experts=shared,
        shared_ffn_hidden=ffn_hidden,  # the decoder's shared FFN is n·F wide: n experts of width F
        first_k_dense=dense_layers,
        dense_ffn_hidden=top_k * ffn_hidden if dense_layers else 0,  # the decoder's dense FFN: top_k·F wide
        scoring=scoring,
        qk_norm=qk_norm,  # the decoder's and the plan's names agree: "none", "head" (Qwen3), "full" (OLMoE)
        **MODEL_DEFAULTS,  # the decoder has none of the rest (MLA, biases, sinks): their defaults
    )


def _parallel(cfg: dict, world: int, where: str) -> Parallel:
    mode = (cfg.get("parallel") or {}).get("mode", "ep")
    if mode not in ("ep", "dp"):
        raise _bad(f"{where}.config.parallel.mode", mode, 'one of "ep", "dp"')
    cf = (cfg.get("routing") or {}).get("capacity_factor", 0.0)
    if cf != 0:
        cf = _positive(f"{where}.config.routing.capacity_factor", cf)
    ep, dp = (world, 1) if mode == "ep" else (1, world)
    return Parallel(ep=ep, tp=1, pp=1, dp=dp, capacity_factor=cf, offload_cache_slots=0)


def _mean_length(run: dict, key: str, where: str) -> float | None:
    """The mean ``input_len`` or ``output_len`` of the run's requests (``details.requests``); without
    them, the mean of ``config.serve``'s length (a number, or [min, max] drawn uniformly); None: neither."""
    requests = (run.get("details") or {}).get("requests")
    if isinstance(requests, list) and requests:
        lengths = []
        for r, request in enumerate(requests):
            value = request.get(key) if isinstance(request, dict) else None
            lengths.append(_count(f"{where}.details.requests[{r}].{key}", value))
        return sum(lengths) / len(lengths)
    spec = ((run.get("config") or {}).get("serve") or {}).get(key)
    if spec is None:
        return None
    at = f"{where}.config.serve.{key}"
    if isinstance(spec, list):
        if len(spec) != 2:
            raise _bad(at, spec, "an integer >= 1 or [min, max]")
        return (_count(f"{at}[0]", spec[0]) + _count(f"{at}[1]", spec[1])) / 2
    return float(_count(at, spec))


def plan_for_serve_run(base: Plan, run: dict, phase: str, where: str = "run") -> Plan | None:
    """The plan of one serve run's ``phase`` ("prefill": the idle-engine TTFT; "decode": the TPOT) on
    ``base``'s hardware (see the module docstring); None when the run lacks the details that phase
    needs. A ``ValueError`` naming ``where`` and the field for a value no serve run writes."""
    if phase not in PHASES:
        raise ValueError(f'phase = "{phase}" is invalid: accepted one of "prefill", "decode"')
    details, cfg = run.get("details") or {}, run.get("config") or {}
    world = _count(f"{where}.world_size", run.get("world_size"))
    if phase == "prefill":
        prompt = details.get("idle_prompt_len")
        if prompt is None:
            return None
        batch, seq_len, output = world, _count(f"{where}.details.idle_prompt_len", prompt), 1  # O: unused by prefill
    else:
        per_rank = (details.get("engine") or {}).get("mean_decode_batch")
        mean_in, mean_out = _mean_length(run, "input_len", where), _mean_length(run, "output_len", where)
        if per_rank is None or mean_in is None or mean_out is None:
            return None
        per_rank = _positive(f"{where}.details.engine.mean_decode_batch", per_rank)
        batch, seq_len, output = max(1, round(per_rank * world)), max(1, round(mean_in)), max(1, round(mean_out))
    workload = Workload(
        batch=batch,
        seq_len_min=seq_len,
        seq_len_max=seq_len,
        output_tokens=output,
        routing_skew=1.0,
        microbatches=1,
        offload_hit_rate=None,
    )
    return replace(
        base, model=_model(base, cfg, where), parallel=_parallel(cfg, world, where), workload=workload, written={}
    )


def predicted(base: Plan, run: dict, phase: str, where: str = "run") -> float | None:
    """The plan model's idle TTFT ("prefill") or TPOT ("decode") of a serve run, s; None as above."""
    p = plan_for_serve_run(base, run, phase, where)
    if p is None:
        return None
    return prefill(p).total if phase == "prefill" else decode(p).total
