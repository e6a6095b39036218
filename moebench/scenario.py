"""Scenario files: the TOML schema, its validation, and the expansion of sweeps into runs.

A scenario file (``scenarios/*.toml``, schema in ``scenarios/README.md``) has the sections
[scenario], [model], [routing], [parallel], [workload] and optionally [slo], [compare]
(the thresholds ``moebench compare`` uses for this scenario's metrics) and [alerts] (the deployment
plan's alerts, judged on per-step series; ``moebench/measure/alerts.py``). A list value in
[model], [parallel] or [workload] is a sweep: the file expands into one ``RunSpec`` per
combination, in the order the keys are listed in ``SCHEMA``.

Every problem raises ``ScenarioError`` with one line naming the file, the section and key, the
value (cut short when long) and what is accepted. The runtime's own validation (``MoEConfig``,
``ParallelConfig``, placement) runs here too, for every combination, so an impossible run fails
before anything runs; so do the limits of ``torch._grouped_mm`` and of a sweep's size.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from moebench import kinds
from moebench.kinds import fault as fault_kind  # its TYPES and ON_EXPERT_LOSS are [fault]'s choices
from moebench.measure.alerts import DEFAULTS as ALERT_DEFAULTS
from moebench.measure.eplb import check_eplb
from moebench.measure.offload import check_offload
from moebench.metrics import is_finite_number
from moebench.spec import (
    DECODER,
    EPLB_DEFAULTS,
    SLO_STATS,
    RunSpec,
    ScenarioError,
    Slo,
    _key,
    _show,
    _spell,
    check_table,
    read_toml,
)
from moebench.text import clip
from moebench.workload import trace as routing_trace
from moebench.workload.skew import target_shares
from moebench.workload.tokens import MAX_STEPS, SKEWS
from runtime import cache_policy
from runtime.config import ACTIVATIONS, DTYPES, EXPERT_BACKENDS, GRANULARITIES, SCORINGS
from runtime.experts import GROUPED_MM_ALIGN
from runtime.model import QK_NORM, RECOMPUTE
from runtime.offload import PREFETCH
from runtime.placement import place_experts
from runtime.training import OPTIMIZERS

KINDS = tuple(kinds.REGISTRY)
# The metrics each kind reports: the names an [slo] key may gate (``max_<name>`` / ``min_<name>``).
METRICS = {name: kind.metrics for name, kind in kinds.REGISTRY.items()}
SLO_ALIASES = {"imbalance": "imbalance_max_mean"}
# Gates a kind's runs get unless the file states them (e.g. load_balance's seed-plan gate).
DEFAULT_SLOS = {name: kind.default_slos for name, kind in kinds.REGISTRY.items() if kind.default_slos}

REQUIRED = object()
SWEEPABLE = ("model", "routing", "parallel", "workload", "eplb", "serve", "train", "offload", "fault")
# a flat list is one value there, not a sweep ([min, max]; [n_groups, top_groups])
RANGES = {("serve", "input_len"), ("serve", "output_len"), ("routing", "group_limited")}
MAX_RUNS = 10_000  # runs one file may expand to (a sweep typo should not run for days or fill memory)
NAME_LENGTH = 100  # characters of a scenario name: it names the result file


@dataclass(frozen=True)
class Key:
    """One key of the schema: its default (or ``REQUIRED``), a validity test and its wording."""

    default: object
    valid: object  # callable(value) -> bool
    accepted: str


def _int(minimum: int, maximum: int) -> tuple:
    def valid(v):
        return isinstance(v, int) and not isinstance(v, bool) and minimum <= v <= maximum

    return valid, f"an integer from {minimum} to {maximum}"


def _index(limit: int, bound: str) -> tuple:
    """An index whose range is the run's (``bound``, checked by the kind's ``validate`` with its value): here
    only an integer no larger than ``limit`` either way, so that a negative one gets the run's bound too."""

    def valid(v):
        return isinstance(v, int) and not isinstance(v, bool) and -limit <= v <= limit

    return valid, f"an integer from 0 to {bound}"


def _number(minimum: float, below: float | None = None) -> tuple:
    def valid(v):
        return is_finite_number(v) and v >= minimum and (below is None or v < below)

    return valid, f"a finite number >= {minimum:g}" + ("" if below is None else f" and < {below:g}")


def _choice(*choices: str) -> tuple:
    return (lambda v: v in choices), "one of " + ", ".join(f'"{c}"' for c in choices)


def _text(pattern: str = r"(?s).*", accepted: str = "a string") -> tuple:
    return (lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None), accepted


def _optional_int(minimum: int, maximum: int) -> tuple:
    valid, accepted = _int(minimum, maximum)
    return (lambda v: v is None or valid(v)), accepted


def _number_above(minimum: float) -> tuple:
    return (lambda v: is_finite_number(v) and v > minimum), f"a finite number > {minimum:g}"


def _rate() -> tuple:
    return (
        lambda v: (is_finite_number(v) and v > 0) or v in (math.inf, "inf")
    ), 'a number > 0 (requests/s), or inf (all at t = 0; the result records "inf")'


def _is_range(value: object) -> bool:
    """``[min, max]``: two integers >= 1, min <= max."""
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**24 for v in value)
        and value[0] <= value[1]
    )


def _length() -> tuple:
    valid, _ = _int(1, 2**24)
    accepted = "an integer from 1 to 16777216, or [min, max] (drawn per request; a sweep: [[64, 64], [128, 256]])"
    return (lambda v: valid(v) or _is_range(v)), accepted


def _is_sweep(section: str, key: str, value: object) -> bool:
    """A list is a sweep, except one ``[min, max]`` where a range is a value (``RANGES``); a sweep of
    ranges is a list of them."""
    if (section, key) in RANGES and isinstance(value, list) and value and not any(isinstance(v, list) for v in value):
        return False
    return isinstance(value, list)


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_OPTIONAL_POSITIVE = ((lambda v: v is None or (is_finite_number(v) and v > 0)), "a finite number > 0")
_OPTIONAL_NUMBER = ((lambda v: v is None or _number(0)[0](v)), "a finite number >= 0")
_GROUPS = (
    lambda v: isinstance(v, list) and len(v) == 2 and all(isinstance(g, int) and not isinstance(g, bool) for g in v),
    "[n_groups, top_groups], two integers (a sweep: [[4, 2], [8, 4]])",
)


SCHEMA: dict[str, dict[str, Key]] = {
    "scenario": {
        "name": Key(
            REQUIRED,
            *_text(
                rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NAME_LENGTH - 1}}}",
                f"at most {NAME_LENGTH} letters, digits, '-', '_', '.' (it names the result file)",
            ),
        ),
        "kind": Key(REQUIRED, *_choice(*KINDS)),
        "description": Key("", *_text()),
        "warmup": Key(3, *_int(0, 10**6)),
        "repeats": Key(10, *_int(1, 10**6)),
    },
    "model": {
        "hidden": Key(REQUIRED, *_int(1, 2**20)),
        "ffn_hidden": Key(REQUIRED, *_int(1, 2**20)),
        "num_experts": Key(REQUIRED, *_int(1, 2**16)),
        "top_k": Key(1, *_int(1, 2**16)),
        "activation": Key("gelu", *_choice(*ACTIVATIONS)),
        "dtype": Key("float32", *_choice(*DTYPES)),
        "layers": Key(1, *_int(1, 4096)),
        "expert_backend": Key("auto", *_choice(*EXPERT_BACKENDS)),
        # the decoder's (kind "serve"; moebench/kinds/serve.py): attention and what surrounds the experts
        "attention_heads": Key(None, *_optional_int(1, 4096)),
        "kv_heads": Key(None, *_optional_int(1, 4096)),  # absent: attention_heads (multi-head attention)
        "head_dim": Key(None, *_optional_int(2, 2**16)),  # absent: hidden / attention_heads
        "dense_layers": Key(0, *_int(0, 4096)),
        "shared_experts": Key(0, *_int(0, 4096)),
        "shared_expert_gate": Key(False, *_BOOL),  # Qwen2-MoE: the shared output × sigmoid(x · w_gate)
        "qk_norm": Key("none", *_choice(*QK_NORM)),  # RMSNorm on q and k before RoPE: "head" (Qwen3), "full" (OLMoE)
        "vocab": Key(0, *_int(0, 2**24)),
        "recompute": Key("none", *_choice(*RECOMPUTE)),  # kind "train": what backward recomputes
        # the MoE implementation under test (moebench/adapters/, docs/adapters.md)
        "impl": Key(
            "runtime", *_text(r"\S{1,512}", 'a string: "runtime", "hf:<family>" or "python:package.module:factory"')
        ),
    },
    "routing": {
        "capacity_factor": Key(0.0, *_number(0)),
        "aux_loss_coef": Key(0.01, *_number(0)),
        "z_loss_coef": Key(0.001, *_number(0)),
        "normalize_topk": Key(False, *_BOOL),
        "granularity": Key("token", *_choice(*GRANULARITIES)),  # "sequence": route each sequence's mean
        # the routers real models use (runtime/router.py); the defaults are the plain top-k softmax router
        "scoring": Key("softmax", *_choice(*SCORINGS)),
        "topk_before_softmax": Key(False, *_BOOL),
        "group_limited": Key(None, *_GROUPS),
        "score_bias": Key(0.0, *_number(0)),  # the scale s of the seeded choice bias s · N(0, 1) per expert
        "routed_scaling": Key(1.0, *_number_above(0)),
        "score_bias_update": Key(0.0, *_number(0)),  # γ of DeepSeek-V3's online bias update (kind train)
    },
    "parallel": {
        "world_size": Key(1, *_int(1, 2**16)),
        "placement": Key("round_robin", *_choice("round_robin", "contiguous")),
        "device": Key("auto", *_choice("auto", "cpu", "cuda")),
        "backend": Key("auto", *_choice("auto", "gloo", "nccl")),
        "threads_per_rank": Key(0, *_int(0, 4096)),
        "overlap_chunks": Key(None, *_int(1, 4096)),  # absent: serial, and no overlap timing
        "redundant_experts": Key(0, *_int(0, 2**16)),  # replicas (kind "fault"), or EPLB's spare slots ([eplb])
        "mode": Key("ep", *_choice("ep", "dp")),  # "dp": every rank holds every expert (kinds "serve", "train")
    },
    "workload": {
        "tokens_per_rank": Key(None, *_optional_int(1, 2**31)),  # required but by kind "serve" (_check_workload)
        "steps": Key(1, *_int(1, MAX_STEPS)),  # a decode-like stream of steps of tokens_per_rank tokens
        "correlation": Key(0.0, *_number(0, below=1)),  # ρ between a token at consecutive steps
        "skew": Key("uniform", *_choice(*SKEWS)),
        "skew_param": Key(None, *_OPTIONAL_NUMBER),
        "trace": Key("", *_text(r"(?s).{0,4096}", 'a path to a routing trace (.npz or .json), with skew = "trace"')),
        "seed": Key(0, *_int(0, 2**32 - 1)),
        "train": Key(False, *_BOOL),
        "drift_every": Key(0, *_int(0, MAX_STEPS)),  # redraw the skew's expert order every n steps ([eplb] passes)
        # granularity "sequence": tokens per sequence; absent = each rank's tokens are one sequence
        "seq_len": Key(None, *_optional_int(1, 2**31)),
    },
    "eplb": {  # expert re-placement from measured load (moebench/measure/eplb.py)
        "window": Key(EPLB_DEFAULTS["window"], *_int(1, 10**6)),
        "interval": Key(EPLB_DEFAULTS["interval"], *_int(0, 10**6)),  # 0: never (static placement)
        "nodes": Key(EPLB_DEFAULTS["nodes"], *_int(1, 2**16)),
    },
    "serve": {  # kind "serve" only (moebench/kinds/serve.py)
        "requests": Key(32, *_int(1, 10**6)),
        "request_rate": Key("inf", *_rate()),
        "burstiness": Key(1.0, *_number_above(0)),
        "input_len": Key(128, *_length()),
        "output_len": Key(32, *_length()),
        "max_running": Key(8, *_int(1, 2**16)),
        "max_batch_tokens": Key(512, *_int(1, 2**24)),
        "batching": Key("continuous", *_choice("continuous", "static")),
        "slo_ttft_s": Key(None, *_OPTIONAL_POSITIVE),
        "slo_tpot_s": Key(None, *_OPTIONAL_POSITIVE),
        "baseline_rounds": Key(0, *_int(0, 1000)),  # rounds of continuous vs static on the same requests
    },
    "train": {  # kind "train" only (moebench/kinds/train.py)
        "steps": Key(100, *_int(1, 10**6)),
        "optimizer": Key("adamw", *_choice(*OPTIMIZERS)),
        "lr": Key(3e-3, *_number_above(0)),
        "seq_len": Key(None, *_optional_int(1, 2**31)),  # absent: one sequence per rank (tokens_per_rank)
    },
    "offload": {  # absent cache_slots: every expert resident, no offload timing
        "cache_slots": Key(None, *_int(1, 2**16)),
        "policy": Key("lru", *_choice(*cache_policy.POLICIES)),
        "prefetch": Key("none", *_choice(*PREFETCH)),
    },
    "fault": {  # kind "fault" only (moebench/kinds/fault/kind.py)
        "type": Key(None, *_choice(*fault_kind.TYPES)),
        "rank": Key(0, *_index(2**16, "world_size - 1")),
        "layer": Key(0, *_index(4096, "layers - 1")),
        "expert": Key(0, *_index(2**16, "num_experts - 1")),
        "at_step": Key(3, *_index(10**6, "warmup + repeats - 1")),
        "slowdown": Key(3.0, *_number(1)),
        "detect_timeout_s": Key(10.0, *_number(0.5)),
        "on_expert_loss": Key("reroute", *_choice(*fault_kind.ON_EXPERT_LOSS)),
        "checkpoint_every": Key(None, *_int(1, 10**6)),  # with train = true: save, crash, resume
    },
    "alerts": {  # kinds "throughput" and "latency"; present (or [slo] max_alerts): record the series, judge
        "expert_overload": Key(ALERT_DEFAULTS["expert_overload"], *_number_above(0)),  # fraction of capacity
        "overload_for_s": Key(ALERT_DEFAULTS["overload_for_s"], *_number(0)),
        "memory_used": Key(ALERT_DEFAULTS["memory_used"], *_number_above(0)),  # fraction of memory
        "comm_delay_s": Key(ALERT_DEFAULTS["comm_delay_s"], *_number_above(0)),  # one all-to-all
        "min_tokens_per_s_per_gpu": Key(ALERT_DEFAULTS["min_tokens_per_s_per_gpu"], *_number(0)),
        "throughput_for_s": Key(ALERT_DEFAULTS["throughput_for_s"], *_number(0)),
        "capacity_factor": Key(ALERT_DEFAULTS["capacity_factor"], *_number_above(0)),  # a dropless model's C
    },
}
_RUNTIME_FIELDS = {
    "hidden_size": ("model", "hidden"),
    "ffn_hidden_size": ("model", "ffn_hidden"),
    "ep_size": ("parallel", "world_size"),
    **{k: ("model", k) for k in ("num_experts", "top_k", "activation", "dtype", "expert_backend")},
    **{k: ("routing", k) for k in ("capacity_factor", "aux_loss_coef", "z_loss_coef", "normalize_topk", "granularity")},
    **{k: ("routing", k) for k in ("scoring", "topk_before_softmax", "group_limited", "score_bias", "routed_scaling")},
    "score_bias_update": ("routing", "score_bias_update"),
    "shared_expert_gate": ("model", "shared_expert_gate"),
    "seq_len": ("workload", "seq_len"),
    "placement": ("parallel", "placement"),
}


# -------------------------------------------------------------------------------------------
# Loading


def _check_value(path: str, section: str, key: str, value: object, spec: Key, origin: str) -> None:
    if not spec.valid(value):
        raise ScenarioError(f"{path}: [{section}] {key} = {_show(value)}{origin} is invalid: accepted {spec.accepted}")


def _read_section(path: str, section: str, table: object, overridden: set) -> dict:
    """Validate one section's keys and values; fill defaults. Lists become sweeps where allowed."""
    schema = SCHEMA[section]
    check_table(path, section, table, schema)
    out = {}
    for key, spec in schema.items():
        if key not in table:
            if spec.default is REQUIRED:
                raise ScenarioError(f"{path}: [{section}] {key} is missing: accepted {spec.accepted}")
            out[key] = spec.default
            continue
        value = table[key]
        if (section, key) == ("serve", "request_rate"):  # JSON has no inf: results record "inf"
            value = ["inf" if v == math.inf else v for v in value] if isinstance(value, list) else value
            value = "inf" if value == math.inf else value
        origin = " (from the command line)" if (section, key) in overridden else ""
        if _is_sweep(section, key, value):
            if section not in SWEEPABLE:
                raise ScenarioError(
                    f"{path}: [{section}] {key} = {_show(value)} is invalid: accepted {spec.accepted} "
                    f"(lists sweep only in {', '.join(f'[{s}]' for s in SWEEPABLE)})"
                )
            if not value or len(set(map(_spell, value))) != len(value):
                raise ScenarioError(
                    f"{path}: [{section}] {key} = {_show(value)} is invalid: accepted a non-empty list of "
                    f"distinct values, each {spec.accepted}"
                )
            for item in value:
                _check_value(path, section, key, item, spec, origin)
        else:
            _check_value(path, section, key, value, spec, origin)
        out[key] = value
    return out


def _read_slos(path: str, kind: str, table: object) -> tuple[Slo, ...]:
    if not isinstance(table, dict):
        raise ScenarioError(f"{path}: [slo] = {_show(table)} is invalid: accepted a table of max_<metric> = number")
    names = METRICS[kind]
    accepted = (
        f"max_<metric> or min_<metric>, optionally ending _p90, _p99, _min or _max, with <metric> one of "
        f"{', '.join(names)}"
    )
    slos = []
    for key, limit in table.items():
        parsed = _parse_slo_key(key, names)
        if parsed is None:
            gate = f"[slo] {_key(key)} is not a known gate for kind = {_show(kind)}"
            raise ScenarioError(f"{path}: {gate}: accepted {accepted}")
        if not is_finite_number(limit):
            raise ScenarioError(f"{path}: [slo] {_key(key)} = {_show(limit)} is invalid: accepted a finite number")
        op, metric, stat = parsed
        slos.append(Slo(metric, op, float(limit), "scenario", stat))
    for key, limit in DEFAULT_SLOS.get(kind, {}).items():
        op, _, metric = key.partition("_")
        if not any(s.metric == metric and s.op == op and s.stat == "median" for s in slos):
            slos.append(Slo(metric, op, limit, "default: the seed plan's gate"))
    return tuple(slos)


def _read_compare(path: str, kind: str, table: object) -> dict:
    """[compare]: ``alpha``, a default ``min_effect``, and ``<metric> = min effect`` per metric."""
    names = METRICS[kind]
    if not isinstance(table, dict):
        raise ScenarioError(f"{path}: [compare] = {_show(table)} is invalid: accepted a table of <metric> = fraction")
    for key, value in table.items():
        if key not in ("alpha", "min_effect", *names):
            accepted = f"alpha, min_effect or a metric of kind = {_show(kind)}: {', '.join(names)}"
            raise ScenarioError(f"{path}: [compare] {_key(key)} is not a known key: accepted {accepted}")
        number = is_finite_number(value)
        if key == "alpha" and not (number and 0 < value < 1):
            raise ScenarioError(f"{path}: [compare] alpha = {_show(value)} is invalid: accepted a number in (0, 1)")
        if key != "alpha" and not (number and 0 <= value <= 100):
            raise ScenarioError(
                f"{path}: [compare] {key} = {_show(value)} is invalid: accepted a fraction from 0 to 100 (0.05 = 5 %)"
            )
    return dict(table)


def _parse_slo_key(key: str, names: tuple[str, ...]) -> tuple[str, str, str] | None:
    """ "max_step_time_s_p99" -> ("max", "step_time_s", "p99"); None when it names no gate."""
    op, _, rest = key.partition("_")
    if op not in ("max", "min"):
        return None
    if SLO_ALIASES.get(rest, rest) in names:
        return op, SLO_ALIASES.get(rest, rest), "median"
    base, _, stat = rest.rpartition("_")
    if stat in SLO_STATS and SLO_ALIASES.get(base, base) in names:
        return op, SLO_ALIASES.get(base, base), stat
    return None


def _runtime_error(path: str, params: dict, err: ValueError, overridden: set) -> ScenarioError:
    """Reword a runtime config error ("MoEConfig.top_k = 3 is invalid: ...") in the file's terms."""
    message = str(err)
    match = re.match(r"(MoEConfig|ParallelConfig)\.(\w+)( = [^ ]+)?", message)
    if match and match.group(2) in _RUNTIME_FIELDS:
        section, key = _RUNTIME_FIELDS[match.group(2)]
        origin = " (from the command line)" if (section, key) in overridden else ""
        message = f"[{section}] {key}{match.group(3) or ''}{origin}" + message[match.end() :]
        for field, (_, name) in _RUNTIME_FIELDS.items():  # the runtime's field names in the file's terms
            message = re.sub(rf"\b{field}\b", name, message)
    where = f" (run {_show(params)})" if params else ""
    return ScenarioError(f"{path}{where}: {message}")


def _check_sweep_size(path: str, doc: dict) -> None:
    """Refuse a file whose sweeps expand to more than MAX_RUNS runs, counted before expanding them."""
    swept = [
        (section, key, len(value))
        for section in SWEEPABLE
        if isinstance(doc.get(section), dict)
        for key, value in doc[section].items()
        if _is_sweep(section, key, value)
    ]
    count = math.prod(n for _, _, n in swept)
    if count > MAX_RUNS:
        factors = " × ".join(f"[{section}] {_key(key)} ({n:,})" for section, key, n in swept)
        raise ScenarioError(
            f"{path}: the sweeps expand to {clip(f'{count:,}')} runs ({clip(factors, 200)}): "
            f"accepted at most {MAX_RUNS:,} runs per file"
        )


def _check_grouped_mm(model: dict) -> None:
    """``torch._grouped_mm`` needs rows of whole 16-byte units: hidden and ffn_hidden × the element size."""
    if model["expert_backend"] != "grouped_mm":
        return
    multiple = GROUPED_MM_ALIGN // DTYPES[model["dtype"]].itemsize
    for key in ("hidden", "ffn_hidden"):
        if model[key] % multiple:
            raise ValueError(
                f'[model] {key} = {model[key]} is invalid with expert_backend = "grouped_mm" and dtype = '
                f'"{model["dtype"]}": accepted a multiple of {multiple} (torch._grouped_mm needs rows of '
                f'{GROUPED_MM_ALIGN} bytes), or expert_backend "loop" or "bmm"'
            )


def _expand(sections: dict) -> list[tuple[dict, dict]]:
    """All combinations of the swept keys: [(per-section values, params), ...]."""
    swept = [(s, k) for s in SWEEPABLE for k, v in sections[s].items() if _is_sweep(s, k, v)]
    runs = []
    for values in itertools.product(*(sections[s][k] for s, k in swept)):
        resolved = {s: dict(table) for s, table in sections.items()}
        for (s, k), v in zip(swept, values, strict=True):
            resolved[s][k] = v
        runs.append((resolved, {k: v for (_, k), v in zip(swept, values, strict=True)}))
    return runs


@dataclass(frozen=True)
class Scenario:
    """One loaded scenario file: its sections with defaults filled (sweeps still lists), its runs."""

    path: str
    sections: dict
    runs: list[RunSpec]

    @property
    def name(self) -> str:
        return self.sections["scenario"]["name"]


def _kinds_listed(path: str, doc: dict) -> list[str] | None:
    """A file's ``[scenario] kind`` when it lists several kinds (each distinct and known), else None."""
    table = doc.get("scenario")
    listed = table.get("kind") if isinstance(table, dict) else None
    if not isinstance(listed, list):
        return None
    if not listed or not all(isinstance(k, str) and k in KINDS for k in listed) or len(set(listed)) != len(listed):
        raise ScenarioError(
            f"{path}: [scenario] kind = {_show(listed)} is invalid: accepted one kind, or a list of distinct kinds "
            f"(each of {', '.join(KINDS)})"
        )
    return listed


def load_file(path: str | Path, overrides: dict | None = None) -> list[Scenario]:
    """Every scenario one file holds: one, or with ``[scenario] kind`` a list, one per kind (the same
    sections run through each kind, named ``<name>-<kind>``: e.g. an implementation's equivalence and its
    timing from one file)."""
    listed = _kinds_listed(str(path), read_toml(str(path)))
    if listed is None:
        return [load(path, overrides)]
    return [load(path, overrides, kind=kind) for kind in listed]


def load(path: str | Path, overrides: dict | None = None, kind: str | None = None) -> Scenario:
    """Parse, validate and expand one scenario file. ``overrides``: {(section, key): value}
    applied before validation (the CLI's --device, --repeats, --world-size). ``kind``: which of the
    kinds a file lists to load (``load_file`` loads them all); a file listing several needs it."""
    path = str(path)
    doc = read_toml(path)
    listed = _kinds_listed(path, doc)
    if listed is None:
        table = doc.get("scenario") if isinstance(doc.get("scenario"), dict) else {}
        if kind is not None and table.get("kind") != kind:
            raise ScenarioError(f"{path}: [scenario] kind = {_show(table.get('kind'))}: asked to load kind {kind!r}")
        return _load(path, doc, overrides)
    if kind not in listed:
        raise ScenarioError(
            f"{path}: [scenario] kind = {_show(listed)} lists several kinds: load one of them "
            f"(moebench run and list load them all)"
        )
    table = doc["scenario"]
    named = f"{table['name']}-{kind}" if isinstance(table.get("name"), str) else table.get("name")
    doc["scenario"] = {**table, "kind": kind, "name": named}
    try:
        return _load(path, doc, overrides)
    except ScenarioError as err:  # say which of the listed kinds refused, and the name it was loaded under
        raise ScenarioError(
            f"{err} (the file lists kind = {_show(listed)}: every key must suit each kind; this is its {kind} "
            f"scenario, {named!r})"
        ) from None


def _load(path: str, doc: dict, overrides: dict | None) -> Scenario:
    """``load`` of one kind's document."""
    if "plan" in doc and "scenario" not in doc:
        raise ScenarioError(
            f"{path}: this is a deployment-plan file ([plan]), not a scenario: validate it with moebench plan"
        )
    known = (*SCHEMA, "slo", "compare")
    for section in doc:
        if section not in known:
            raise ScenarioError(f"{path}: [{_key(section)}] is not a known section: accepted {', '.join(known)}")
    serving = isinstance(doc.get("scenario"), dict) and doc["scenario"].get("kind") == "serve"
    for section in ("scenario", "model") if serving else ("scenario", "model", "workload"):
        if section not in doc:
            raise ScenarioError(f"{path}: [{section}] is missing: accepted a file with [scenario], [model], [workload]")
    for (section, key), value in (overrides or {}).items():
        if isinstance(doc.setdefault(section, {}), dict):  # a non-table section is reported below
            doc[section][key] = value
    overridden = set(overrides or {})
    _check_sweep_size(path, doc)
    sections = {s: _read_section(path, s, doc.get(s, {}), overridden) for s in SCHEMA}
    _check_offload_keys(path, doc.get("offload", {}))
    _check_decoder_keys(path, doc, sections["scenario"]["kind"])
    if sections["scenario"]["kind"] != fault_kind.NAME:  # the fault kind says its type is missing
        _check_fault_keys(path, doc.get("fault", {}))
    slos = _read_slos(path, sections["scenario"]["kind"], doc.get("slo", {}))
    if "alerts" not in doc and not any(s.metric == "alerts" for s in slos):
        sections["alerts"] = {}  # no [alerts] and no gate on them: no series recorded, no alerts judged
    thresholds = _read_compare(path, sections["scenario"]["kind"], doc.get("compare", {}))
    specs = []
    for resolved, params in _expand(sections):
        spec = RunSpec(path, slos=slos, params=params, **resolved)
        try:
            place_experts(spec.moe_config(), spec.parallel_config())
            _check_device(spec.parallel)
            _check_features(spec)
            _check_grouped_mm(spec.model)
            _check_workload(spec)
        except ValueError as err:
            raise _runtime_error(path, params, err, overridden) from None
        specs.append(spec)
    sections["slo"] = {s.key: s.limit for s in slos}
    sections["compare"] = thresholds
    return Scenario(path, sections, specs)


def _check_offload_keys(path: str, table: dict) -> None:
    """[offload] policy or prefetch without cache_slots: read, then ignored (no expert is offloaded)."""
    for key in ("policy", "prefetch"):
        if key in table and "cache_slots" not in table:
            raise ScenarioError(
                f"{path}: [offload] {key} = {_show(table[key])} without cache_slots is invalid: accepted it with "
                "cache_slots = N (the device slots per layer that turn offload on), or no [offload] (all resident)"
            )


def _check_decoder_keys(path: str, doc: dict, kind: str) -> None:
    """The decoder's [model] keys belong to the kinds that run a decoder (feature "decoder"); [serve] and
    [train] to their kind."""
    if "decoder" in kinds.get(kind).features:
        _check_kind_section(path, doc, kind)
        return
    accepted = " or ".join(f'"{k}"' for k in kinds.accepting("decoder"))
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    impl = model.get("impl", "runtime")
    if kind == "equivalence" and all(isinstance(v, str) and v.startswith("hf:") for v in _values(impl)):
        _check_decoder_equivalence(path, model)  # a Hugging Face decoder model against reference_decoder
        _check_kind_section(path, doc, kind)
        return
    for key in DECODER:
        if key in model:
            if kind == "equivalence":
                raise ScenarioError(
                    f'{path}: [model] {key} = {_show(model[key])} is invalid for kind = "equivalence" with [model] '
                    f'impl = {_show(impl)}: accepted only with impl = "hf:<family>" (a Hugging Face decoder model '
                    f"checked against the fp64 reference decoder) or with kind {accepted}"
                )
            raise ScenarioError(
                f"{path}: [model] {key} = {_show(model[key])} is invalid for kind = {_show(kind)}: accepted only "
                f"with kind {accepted} (a decoder; other kinds run a stack of MoE layers)"
            )
    _check_kind_section(path, doc, kind)


def _values(value: object) -> list:
    """A key's values: a sweep's list, or the one value."""
    return value if isinstance(value, list) else [value]


def _check_decoder_equivalence(path: str, model: dict) -> None:
    """Kind equivalence of an hf: impl takes the decoder keys (attention_heads required once any is set), not
    recompute (no backward)."""
    written = [key for key in DECODER if key in model]
    if written and "attention_heads" not in model:
        raise ScenarioError(
            f"{path}: [model] {written[0]} = {_show(model[written[0]])} without attention_heads is invalid for kind "
            '"equivalence": accepted with attention_heads (a whole decoder), or no decoder keys (one MoE block)'
        )
    if model.get("recompute", "none") != "none":
        raise ScenarioError(
            f'{path}: [model] recompute = {_show(model["recompute"])} is invalid for kind "equivalence": accepted '
            '"none" (a forward only)'
        )


def _check_kind_section(path: str, doc: dict, kind: str) -> None:
    """[serve] and [train] belong to the kind of that name."""
    for section in ("serve", "train"):
        if section in doc and kind != section:
            table = doc[section] if isinstance(doc[section], dict) else {}
            named = next((f" {_key(k)} = {_show(v)}" for k, v in table.items()), "")  # the first key, if any
            raise ScenarioError(
                f'{path}: [{section}]{named} is invalid for kind = {_show(kind)}: accepted only with kind "{section}"'
            )


def _check_fault_keys(path: str, table: dict) -> None:
    """[fault] keys without type, for another kind: read, then ignored (no fault is injected)."""
    for key in table:
        if key != "type" and "type" not in table:
            raise ScenarioError(
                f"{path}: [fault] {_key(key)} = {_show(table[key])} without type is invalid: accepted it with "
                f'type = one of {", ".join(fault_kind.TYPES)} (kind "fault"), or no [fault]'
            )


def _features(spec: RunSpec) -> dict[str, object]:
    """The features this run asks for (``kinds.FEATURES``) and the value of the key that asks."""
    asked = {
        "overlap": spec.parallel["overlap_chunks"],
        "offload": spec.offload.get("cache_slots"),
        "stream": spec.workload["steps"] if spec.workload["steps"] > 1 else None,
        "fault": spec.fault.get("type"),
        "redundancy": None if spec.eplb["interval"] else spec.parallel.get("redundant_experts") or None,
        "eplb": spec.eplb["interval"] or None,
        "dp": spec.parallel["mode"] if spec.parallel["mode"] == "dp" else None,
        "alerts": spec.alerts or None,
        "impl": None if spec.model.get("impl", "runtime") == "runtime" else spec.model["impl"],
        "bias_update": spec.routing.get("score_bias_update") or None,
    }
    return {feature: value for feature, value in asked.items() if value is not None}


def _check_features(spec: RunSpec) -> None:
    """Each feature the run asks for must be one its kind accepts; then the feature's own rules and
    the kind's (``validate``)."""
    kind = kinds.get(spec.kind)
    for feature, value in _features(spec).items():
        if feature not in kind.features:
            accepted = " or ".join(f'"{k}"' for k in kinds.accepting(feature))
            raise ValueError(
                f'{kinds.FEATURES[feature]} = {_show(value)} is invalid for kind = "{spec.kind}": '
                f"accepted only with kind {accepted}"
            )
    check_offload(spec)
    check_eplb(spec)
    if kind.validate is not None:
        kind.validate(spec)


def _check_workload(spec: RunSpec) -> None:
    """The skew must be a routing the run can produce: its target shares, or a trace it can replay;
    a stream of steps is a forward-only workload (which kinds accept one: ``_check_features``)."""
    wl, moe = spec.workload, spec.moe_config()
    if wl["tokens_per_rank"] is None and spec.kind != "serve":
        raise ValueError("[workload] tokens_per_rank is missing: accepted an integer from 1 to 2147483648")
    _check_sequences(spec)
    _check_router_variants(spec)
    if wl["steps"] > 1 and wl["train"]:
        raise ValueError(f"[workload] steps = {wl['steps']} is invalid with train = true: accepted steps = 1")
    if wl["skew"] != "trace":
        if wl["trace"] and "skew" not in spec.params:  # a swept skew may set a trace for its "trace" runs
            raise ValueError(
                f"[workload] trace = {_show(wl['trace'])} is invalid with skew = {_show(wl['skew'])}: "
                'accepted a trace only with skew = "trace"'
            )
        try:
            order = torch.arange(moe.num_experts)
            target_shares(wl["skew"], wl["skew_param"], moe.num_experts, moe.top_k, order)
        except ValueError as err:
            raise ValueError(f"[workload] {err}") from None
        return
    if spec.kind == "equivalence":
        raise ValueError('[workload] skew = "trace" is invalid for kind = "equivalence": accepted a skew of routing')
    if not wl["trace"]:
        raise ValueError('[workload] trace is missing: accepted trace = "path/to/routes.npz" with skew = "trace"')
    found = routing_trace.load(routing_trace.trace_file(spec.path, wl["trace"]))
    needed = wl["tokens_per_rank"] * spec.world_size
    routing_trace.check(found, num_experts=moe.num_experts, top_k=moe.top_k, layers=spec.model["layers"],
                        tokens_needed=needed)  # fmt: skip


def _check_sequences(spec: RunSpec) -> None:
    """[workload] seq_len cuts each rank's tokens into whole sequences, in the kinds that route a stack of
    layers (the decoder kinds' sequences are their requests and [train] seq_len); a trace replays tokens."""
    wl, granularity = spec.workload, spec.routing["granularity"]
    if wl["seq_len"] is not None and spec.kind in ("serve", "train"):
        where = "the requests" if spec.kind == "serve" else "[train] seq_len"
        raise ValueError(
            f"[workload] seq_len = {wl['seq_len']} is invalid for kind {spec.kind}: accepted none "
            f"(its sequences are {where})"
        )
    if wl["seq_len"] is not None and wl["tokens_per_rank"] % wl["seq_len"]:
        raise ValueError(
            f"[workload] seq_len = {wl['seq_len']} is invalid with tokens_per_rank = "
            f"{wl['tokens_per_rank']}: accepted a divisor of tokens_per_rank (whole sequences per rank)"
        )
    longest = (
        max(spec.serve["input_len"]) if isinstance(spec.serve.get("input_len"), list) else spec.serve.get("input_len")
    )
    if spec.kind == "serve" and granularity == "sequence" and longest > spec.serve["max_batch_tokens"]:
        raise ValueError(
            f"[serve] input_len = {_show(spec.serve['input_len'])} is invalid with [routing] granularity = "
            f'"sequence" and max_batch_tokens = {spec.serve["max_batch_tokens"]}: accepted prompts of at most '
            "max_batch_tokens (a prompt is routed, so computed, whole)"
        )
    if granularity == "sequence" and wl["skew"] == "trace":
        raise ValueError(
            '[routing] granularity = "sequence" is invalid with [workload] skew = "trace": accepted '
            '"token" (a trace replays each token\'s recorded experts)'
        )


def _check_router_variants(spec: RunSpec) -> None:
    """A router variant (runtime/router.py ``gate``) where the run re-picks experts by the plain softmax rule:
    a trace's replay and a fault's reroute compute their weights from softmax probabilities."""
    if spec.moe_config().plain_routing:
        return
    if spec.workload["skew"] == "trace":
        raise ValueError(
            '[workload] skew = "trace" is invalid with a [routing] router variant (scoring, topk_before_softmax, '
            "group_limited, score_bias, routed_scaling): accepted a skew of routing (a replay reweights by softmax)"
        )
    if spec.kind == "fault" and spec.fault.get("on_expert_loss") == "reroute":
        raise ValueError(
            '[fault] on_expert_loss = "reroute" is invalid with a [routing] router variant: accepted "drop" '
            "(a reroute re-picks by softmax probabilities)"
        )


def _check_device(parallel: dict) -> None:
    if parallel["backend"] == "nccl" and parallel["device"] == "cpu":
        raise ValueError('[parallel] backend = "nccl" with device = "cpu" is invalid: accepted backend "gloo" on CPU')


def discover(paths: list[str | Path]) -> list[Path]:
    """Scenario files named directly, and the ``*.toml`` directly inside named folders, sorted."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.toml"))
            if not found:
                raise ScenarioError(f"{p}: no scenario files (*.toml) in this folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ScenarioError(f"{p}: no such file or folder")
    return files
