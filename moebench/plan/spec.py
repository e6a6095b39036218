"""The deployment-plan file: its schema, units, and a loader that turns TOML into a frozen ``Plan``.

Every quantity with a unit may be written as a bare number in the key's canonical unit
(``ttft = 10`` is 10 s) or as a string with its unit, the way the source document wrote it
(``ttft = "10 s"``, ``throughput_per_gpu = "100 tokens/ms"``). The loader converts to canonical
units (s, B, B/s, FLOP/s, FLOP, tokens/s) and keeps the text as written, so the report can quote
a claim in its own units. The schema is documented in ``scenarios/plans/README.md``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields, replace

from moebench.metrics import is_finite_number
from moebench.spec import _key, _show, check_table, read_toml


class PlanError(ValueError):
    """A plan file that cannot be read; the message is one line for the user."""


# Units: dimension -> {spelling: factor to the canonical unit}. Matching ignores case only where
# no two spellings differ by case alone (bytes: MB is not Mb).
UNITS: dict[str, dict[str, float]] = {
    "time": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "min": 60.0},
    "bytes": {
        "B": 1.0,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KiB": 2.0**10,
        "MiB": 2.0**20,
        "GiB": 2.0**30,
        "TiB": 2.0**40,
    },
    "bandwidth": {
        "B/s": 1.0,
        "MB/s": 1e6,
        "GB/s": 1e9,
        "TB/s": 1e12,
        "GBps": 1e9,
        "TBps": 1e12,
        "Gbit/s": 1.25e8,
        "Gb/s": 1.25e8,
        "Gbps": 1.25e8,
        "Tbit/s": 1.25e11,
    },
    "flop_rate": {"flop/s": 1.0, "gflop/s": 1e9, "tflop/s": 1e12, "pflop/s": 1e15, "tflops": 1e12, "pflops": 1e15},
    "flops": {"flop": 1.0, "mflop": 1e6, "gflop": 1e9, "tflop": 1e12, "mflops": 1e6, "gflops": 1e9},
    "token_rate": {"tokens/s": 1.0, "tokens/ms": 1e3},
}
CANONICAL = {
    "time": "s",
    "bytes": "B",
    "bandwidth": "B/s",
    "flop_rate": "FLOP/s",
    "flops": "FLOP",
    "token_rate": "tokens/s",
}
_CASELESS = {"flop_rate", "flops", "token_rate", "time"}
_QUANTITY = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(\S+)\s*")
# Every number a plan states (in canonical units) lies in this range, or is 0 where 0 means "none":
# nothing real is outside it, and inside it no product or ratio the model forms overflows or
# underflows a float (a 310-digit integer or a 1e-320 s claim is a typo, not a plan).
SMALLEST, LARGEST = 1e-30, 1e30
INT_MAX = 10**9

REQUIRED = object()


@dataclass(frozen=True)
class Spec:
    """One key: default (``REQUIRED`` or None for optional), type, bounds, unit dimension."""

    default: object
    kind: str  # "int", "number", "fraction", "bool", "text", "choice", "quantity", "list"
    low: float = 0  # int: the smallest; number: 0 (0 or SMALLEST..LARGEST) or the smallest above 0
    dim: str = ""  # for quantities: a key of UNITS
    choices: tuple = ()

    def accepted(self) -> str:
        if self.kind == "int":
            return f"an integer from {self.low:g} to {_g(INT_MAX)}"
        if self.kind == "number":
            return f"{'0 or ' if self.low == 0 else ''}a number from {_g(max(self.low, SMALLEST))} to {_g(LARGEST)}"
        if self.kind == "fraction":
            return f"a number from {_g(SMALLEST)} to 1"
        if self.kind == "bool":
            return "true or false"
        if self.kind == "choice":
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.kind == "list":
            return 'a list of "section.key" strings naming keys of this file'
        if self.kind == "quantity":
            units = ", ".join(UNITS[self.dim])
            return (
                f"a number from {_g(SMALLEST)} to {_g(LARGEST)} in {CANONICAL[self.dim]}, or a string "
                f'"<number> <unit>" with unit one of {units}'
            )
        return "a string"


def _g(x: float) -> str:
    mantissa, _, exponent = f"{x:g}".partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa  # 1e30, 1e9, 1e-30: not 1e+30, 1e+09


def _i(default=REQUIRED, low=1):
    return Spec(default, "int", low)


def _q(dim, default=REQUIRED):
    return Spec(default, "quantity", dim=dim)


ATTENTION = ("gqa", "mla")
MLA_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
MLA_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")  # q_lora_rank 0: a full W_q

SCHEMA: dict[str, dict[str, Spec]] = {
    "plan": {"name": Spec(REQUIRED, "text"), "description": Spec("", "text"), "source": Spec("", "text"),
             "assumed": Spec((), "list")},
    "model": {
        "layers": _i(), "hidden": _i(), "heads": _i(), "head_dim": _i(None), "kv_heads": _i(None),
        "ffn_hidden": _i(), "experts": _i(), "top_k": _i(1), "vocab": _i(0, low=0),
        "tie_embeddings": Spec(False, "bool"), "activation": Spec("gelu", "choice", choices=("gelu", "swiglu")),
        "precision": Spec(REQUIRED, "choice", choices=("fp32", "bf16", "fp16", "fp8")),
        "params": Spec(None, "number", low=1),
        "shared_experts": _i(0, low=0), "shared_ffn_hidden": _i(0, low=0),
        "first_k_dense": _i(0, low=0), "dense_ffn_hidden": _i(0, low=0),
        "attention": Spec("gqa", "choice", choices=ATTENTION),
        "q_lora_rank": _i(0, low=0), "kv_lora_rank": _i(0, low=0), "qk_nope_head_dim": _i(0, low=0),
        "qk_rope_head_dim": _i(0, low=0), "v_head_dim": _i(0, low=0),
        "attention_bias": Spec("none", "choice", choices=("none", "qkv", "qkvo")),
        "attention_sinks": Spec(False, "bool"), "qk_norm": Spec("none", "choice", choices=("none", "head", "full")),
        "scoring": Spec("softmax", "choice", choices=("softmax", "sigmoid")),
        "router_bias": Spec(False, "bool"), "expert_bias": Spec(False, "bool"),
    },
    "hardware": {
        "name": Spec("", "text"), "peak_flops": _q("flop_rate"), "mfu": Spec(REQUIRED, "fraction"),
        "memory_bandwidth": _q("bandwidth"), "memory_bandwidth_efficiency": Spec(REQUIRED, "fraction"),
        "memory": _q("bytes"), "gpus_per_node": _i(8),
        "intra_node_bandwidth": _q("bandwidth"), "intra_node_latency": _q("time"),
        "inter_node_bandwidth": _q("bandwidth"), "inter_node_latency": _q("time"),
        "host_to_device_bandwidth": _q("bandwidth", None), "gemm_half_rows": Spec(0.0, "number"),
    },
    "workload": {
        "batch": _i(), "seq_len_min": _i(None), "seq_len_max": _i(), "output_tokens": _i(),
        "routing_skew": Spec(1.0, "number", low=1), "microbatches": _i(0, low=0),
        "offload_hit_rate": Spec(None, "fraction"),
    },
    "parallel": {"ep": _i(1), "tp": _i(1), "pp": _i(1), "dp": _i(1), "capacity_factor": Spec(0.0, "number"),
                 "offload_cache_slots": _i(0, low=0)},
    "slo": {
        "ttft": _q("time", None), "tpot": _q("time", None), "throughput_per_gpu": _q("token_rate", None),
        "throughput_counts": Spec("total", "choice", choices=("total", "prefill", "decode")),
        "max_load_cv": Spec(None, "number"),
    },
    "claims": {
        "gpus": _i(None), "memory_per_gpu": _q("bytes", None), "weights_per_gpu": _q("bytes", None),
        "weights_total": _q("bytes", None), "flops_per_token": _q("flops", None),
        "expert_flops_per_token": _q("flops", None), "compute_bound_throughput_per_gpu": _q("token_rate", None),
        "throughput_per_gpu": _q("token_rate", None), "ttft": _q("time", None), "tpot": _q("time", None),
    },
}  # fmt: skip
REQUIRED_SECTIONS = ("plan", "model", "hardware", "workload", "parallel")
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True)
class Model:
    layers: int
    hidden: int  # d, the residual stream width
    heads: int
    head_dim: int  # a query/key head's width (MLA: qk_nope_head_dim + qk_rope_head_dim)
    kv_heads: int
    ffn_hidden: int  # F, each expert's hidden width
    experts: int  # E, routed experts per layer
    top_k: int
    vocab: int  # 0: not stated; embedding and LM head left out
    tie_embeddings: bool
    activation: str  # "gelu": 2 matrices per expert; "swiglu": 3
    precision: str
    params: float | None  # the plan's declared parameter count
    shared_experts: int = 0  # n: always-active experts per MoE layer, each of width shared_ffn_hidden
    shared_ffn_hidden: int = 0  # Fs (0 in the file: ffn_hidden)
    first_k_dense: int = 0  # Ld: the first layers have a dense FFN of width dense_ffn_hidden, no experts
    dense_ffn_hidden: int = 0  # Fd
    attention: str = "gqa"  # "gqa" (multi-head, grouped-query with kv_heads) or "mla" (DeepSeek's latent attention)
    q_lora_rank: int = 0  # MLA: the query's low rank (0: a full d × h·(nope + rope) projection)
    kv_lora_rank: int = 0  # MLA: the cached key/value latent's width
    qk_nope_head_dim: int = 0  # MLA: the part of a query/key head without RoPE
    qk_rope_head_dim: int = 0  # MLA: the RoPE part (its key part is shared by the heads and cached)
    v_head_dim: int = 0  # MLA: a value head's width
    attention_bias: str = "none"  # "none", "qkv" (Qwen2), "qkvo" (gpt-oss)
    attention_sinks: bool = False  # one learned logit per head (gpt-oss)
    qk_norm: str = "none"  # "head": an RMSNorm of head_dim on q and on k (Qwen3); "full": on all of q and k (OLMoE)
    scoring: str = "softmax"  # the router's "softmax" or "sigmoid" (DeepSeek-V3): the same parameters
    router_bias: bool = False  # E more per router (gpt-oss's bias; DeepSeek-V3's e_score_correction_bias)
    expert_bias: bool = False  # biases in each expert's matrices (gpt-oss): (m − 1)·F + d more per expert

    @property
    def moe_layers(self) -> int:
        return self.layers - self.first_k_dense

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def bytes_per_param(self) -> int:
        return BYTES_PER_PARAM[self.precision]

    @property
    def expert_matrices(self) -> int:
        return 3 if self.activation == "swiglu" else 2


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_flops: float  # FLOP/s per GPU at this precision
    mfu: float  # expected fraction of peak reached by large GEMMs
    memory_bandwidth: float  # B/s
    memory_bandwidth_efficiency: float
    memory: float  # B per GPU
    gpus_per_node: int
    intra_node_bandwidth: float  # B/s per GPU, one direction
    intra_node_latency: float  # s per collective
    inter_node_bandwidth: float  # B/s per GPU, one direction
    inter_node_latency: float
    host_to_device_bandwidth: float | None
    gemm_half_rows: float  # rows per GEMM at which it reaches half of mfu (0: no shape dependence)


@dataclass(frozen=True)
class Workload:
    batch: int  # sequences in flight over the whole deployment
    seq_len_min: int
    seq_len_max: int
    output_tokens: int
    routing_skew: float  # tokens of the busiest expert / mean tokens per expert
    microbatches: int  # per pipeline; resolved to pp when the file gives 0
    offload_hit_rate: float | None = None  # with offload: share of the experts a step reads already on the GPU


@dataclass(frozen=True)
class Parallel:
    ep: int
    tp: int
    pp: int
    dp: int
    capacity_factor: float  # 0: no capacity limit (dropless)
    offload_cache_slots: int = 0  # experts per layer kept on each GPU, the rest in host memory; 0: no offload

    @property
    def gpus(self) -> int:
        return self.ep * self.tp * self.pp * self.dp


@dataclass(frozen=True)
class Slo:
    ttft: float | None
    tpot: float | None
    throughput_per_gpu: float | None
    throughput_counts: str
    max_load_cv: float | None


@dataclass(frozen=True)
class Claims:
    gpus: int | None = None
    memory_per_gpu: float | None = None
    weights_per_gpu: float | None = None
    weights_total: float | None = None
    flops_per_token: float | None = None
    expert_flops_per_token: float | None = None
    compute_bound_throughput_per_gpu: float | None = None
    throughput_per_gpu: float | None = None
    ttft: float | None = None
    tpot: float | None = None


@dataclass(frozen=True)
class Plan:
    path: str
    name: str
    description: str
    source: str
    assumed: tuple[str, ...]
    model: Model
    hardware: Hardware
    workload: Workload
    parallel: Parallel
    slo: Slo
    claims: Claims
    written: dict = field(default_factory=dict, compare=False)  # "section.key" -> value as written

    def with_parallel(self, **degrees) -> Plan:
        """The same plan with other degrees; microbatches follow pp unless the file fixed them."""
        par = replace(self.parallel, **degrees)
        wl = self.workload
        if "microbatches" not in self.written.get("workload", {}):
            wl = replace(wl, microbatches=par.pp)
        return replace(self, parallel=par, workload=wl)

    def with_hardware(self, **values) -> Plan:
        return replace(self, hardware=replace(self.hardware, **values))


# -------------------------------------------------------------------------------------------
# Loading


def in_range(value: object, zero: bool = False) -> bool:
    """A number (not a bool) from SMALLEST to LARGEST, or 0 when ``zero``; never raises (huge ints)."""
    if not is_finite_number(value):
        return False
    return (zero and value == 0) or SMALLEST <= value <= LARGEST


def parse_quantity(value: object, dim: str) -> float | None:
    """``value`` in the canonical unit of ``dim``, or None when it is not a valid quantity."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str) and (m := _QUANTITY.fullmatch(value)):
        units = UNITS[dim]
        unit = m.group(2)
        if dim in _CASELESS:
            unit = unit.lower()
            units = {k.lower(): v for k, v in units.items()}
        if unit not in units:
            return None
        number = float(m.group(1)) * units[unit]
    else:
        return None
    return float(number) if in_range(number) else None


def _value(path: str, section: str, key: str, value: object, spec: Spec) -> object:
    def bad():
        return PlanError(f"{path}: [{section}] {key} = {_show(value)} is invalid: accepted {spec.accepted()}")

    if spec.kind == "quantity":
        number = parse_quantity(value, spec.dim)
        if number is None:
            raise bad()
        return number
    is_int = isinstance(value, int) and not isinstance(value, bool)
    if spec.kind == "int" and not (is_int and spec.low <= value <= INT_MAX):
        raise bad()
    if spec.kind == "number" and not (in_range(value, zero=spec.low == 0) and value >= spec.low):
        raise bad()
    if spec.kind == "fraction" and not (in_range(value) and value <= 1):
        raise bad()
    if spec.kind == "bool" and not isinstance(value, bool):
        raise bad()
    if spec.kind == "text" and not isinstance(value, str):
        raise bad()
    if spec.kind == "choice" and value not in spec.choices:
        raise bad()
    if spec.kind == "list":
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise bad()
        return tuple(value)
    return float(value) if spec.kind in ("number", "fraction") else value


def _section(path: str, section: str, table: object) -> dict:
    schema = SCHEMA[section]
    check_table(path, section, table, schema, PlanError)
    out = {}
    for key, spec in schema.items():
        if key in table:
            out[key] = _value(path, section, key, table[key], spec)
        elif spec.default is REQUIRED:
            raise PlanError(f"{path}: [{section}] {key} is missing: accepted {spec.accepted()}")
        else:
            out[key] = spec.default
    return out


def _consistency(path: str, s: dict) -> None:
    """Values that cannot describe any deployment (as opposed to a poor plan, which is a finding)."""
    m, w, p = s["model"], s["workload"], s["parallel"]
    checks = [
        ("model", "top_k", m["top_k"], m["top_k"] <= m["experts"], f"at most experts = {m['experts']}"),
        ("model", "kv_heads", m["kv_heads"], m["heads"] % m["kv_heads"] == 0, f"a divisor of heads = {m['heads']}"),
        ("model", "first_k_dense", m["first_k_dense"], m["first_k_dense"] < m["layers"],
         f"0 to layers − 1 = {m['layers'] - 1} (at least one MoE layer)"),
        ("workload", "seq_len_min", w["seq_len_min"], w["seq_len_min"] <= w["seq_len_max"],
         f"at most seq_len_max = {w['seq_len_max']}"),
        ("parallel", "capacity_factor", p["capacity_factor"], p["capacity_factor"] <= m["experts"] / m["top_k"],
         f"0 (dropless) or at most experts / top_k = {m['experts'] / m['top_k']:g}"),
    ]  # fmt: skip
    slots = p["offload_cache_slots"]
    if slots:
        local = m["experts"] // p["ep"]
        checks.append(
            ("parallel", "offload_cache_slots", slots, slots <= local, f"0 (no offload) or 1 to experts / ep = {local}")
        )
        needed = [
            ("workload", "offload_hit_rate", "a fraction in (0, 1]: the share of the experts a decode step reads that "
             "are already on the GPU (moebench's offload runs without prefetch measure it: cache_hit_rate)"),
            ("hardware", "host_to_device_bandwidth", "a bandwidth (plan --calibrate fits it from offload runs)"),
        ]  # fmt: skip
        for section, key, accepted in needed:
            if s[section][key] is None:
                where = f"{path}: [{section}] {key} is missing with offload_cache_slots = {slots}"
                raise PlanError(f"{where}: accepted {accepted}")
    for section, key, value, ok, accepted in checks:
        if not ok:
            raise PlanError(f"{path}: [{section}] {key} = {_show(value)} is invalid: accepted {accepted}")
    for name in s["plan"]["assumed"]:
        section, _, key = name.partition(".")
        if key not in s.get(section, {}):
            raise PlanError(
                f"{path}: [plan] assumed names {_show(name)}, which is not a key of this file: "
                'accepted "section.key" of a key in [model], [hardware], [workload], [parallel], [slo] or [claims]'
            )


def _model_keys(path: str, m: dict) -> None:
    """Keys that are required or refused depending on others; fills in the widths that default to others."""

    def missing(key: str, why: str, accepted: str = "an integer from 1 to 1e9") -> PlanError:
        return PlanError(f"{path}: [model] {key} is missing {why}: accepted {accepted}")

    if m["attention"] == "mla":
        for key in MLA_REQUIRED:
            if m[key] == 0:
                raise missing(key, 'with attention = "mla"')
        qk = m["qk_nope_head_dim"] + m["qk_rope_head_dim"]
        if m["head_dim"] is not None and m["head_dim"] != qk:
            raise PlanError(
                f'{path}: [model] head_dim = {m["head_dim"]} is invalid with attention = "mla": accepted '
                f"qk_nope_head_dim + qk_rope_head_dim = {qk}, or leave it out"
            )
        m["head_dim"] = qk
        # MLA has no per-head q/k/v projection to bias or norm: its own RMSNorms sit on the query and key/value
        # latents (q_lora_rank + kv_lora_rank, counted with them), as in DeepSeek-V2/V3
        for key, none in (("attention_bias", "none"), ("qk_norm", "none")):
            if m[key] != none:
                raise PlanError(
                    f'{path}: [model] {key} = "{m[key]}" is invalid with attention = "mla": accepted "none" (MLA '
                    "norms its query and key/value latents, counted from q_lora_rank and kv_lora_rank)"
                )
    else:
        for key in MLA_KEYS:
            if m[key]:
                raise PlanError(
                    f'{path}: [model] {key} = {m[key]} is invalid with attention = "gqa": accepted only with '
                    'attention = "mla" (leave it out)'
                )
        if m["head_dim"] is None:
            raise missing("head_dim", 'with attention = "gqa"')
    if m["first_k_dense"] and not m["dense_ffn_hidden"]:
        raise missing("dense_ffn_hidden", f"with first_k_dense = {m['first_k_dense']}")
    m["shared_ffn_hidden"] = m["shared_ffn_hidden"] or m["ffn_hidden"]


def _build(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in fields(cls)})


def load_plan(path: str) -> Plan:
    """Read and validate a plan file; every problem is a one-line ``PlanError``."""
    doc = read_toml(path, PlanError)
    if "scenario" in doc and "plan" not in doc:
        raise PlanError(f"{path}: this is a scenario file ([scenario]), not a plan: run it with moebench run")
    for section in doc:
        if section not in SCHEMA:
            raise PlanError(f"{path}: [{_key(section)}] is not a known section: accepted {', '.join(SCHEMA)}")
    for section in REQUIRED_SECTIONS:
        if section not in doc:
            raise PlanError(f"{path}: [{section}] is missing: accepted a file with [{'], ['.join(REQUIRED_SECTIONS)}]")
    s = {section: _section(path, section, doc.get(section, {})) for section in SCHEMA}
    _model_keys(path, s["model"])
    s["model"]["kv_heads"] = s["model"]["kv_heads"] or s["model"]["heads"]
    s["workload"]["seq_len_min"] = s["workload"]["seq_len_min"] or s["workload"]["seq_len_max"]
    s["workload"]["microbatches"] = s["workload"]["microbatches"] or s["parallel"]["pp"]
    _consistency(path, s)
    return Plan(
        path=str(path),
        name=s["plan"]["name"],
        description=s["plan"]["description"],
        source=s["plan"]["source"],
        assumed=s["plan"]["assumed"],
        model=_build(Model, s["model"]),
        hardware=_build(Hardware, s["hardware"]),
        workload=_build(Workload, s["workload"]),
        parallel=_build(Parallel, s["parallel"]),
        slo=_build(Slo, s["slo"]),
        claims=_build(Claims, s["claims"]),
        written={section: dict(table) for section, table in doc.items() if isinstance(table, dict)},
    )


# -------------------------------------------------------------------------------------------
# Display


_PREFIXES = {
    "B": [(1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB"), (1, "B")],
    "s": [(1, "s"), (1e-3, "ms"), (1e-6, "us"), (1e-9, "ns")],
    "FLOP": [(1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP"), (1, "FLOP")],
    "params": [(1e9, "B params"), (1e6, "M params"), (1, "params")],
    "tokens/s": [(1e3, "tokens/ms"), (1, "tokens/s")],
}


def human(value: float | None, unit: str) -> str:
    """A value with a readable prefix: 4.23 MB, 21.2 ms, 12.3 tokens/ms."""
    if value is None:
        return "-"
    for scale, name in _PREFIXES.get(unit, []):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {name}"
    if unit in _PREFIXES:
        scale, name = _PREFIXES[unit][-1]
        return f"{value / scale:.3g} {name}"
    if unit == "fraction":
        return f"{value:.1%}"
    return f"{value:.4g} {unit}".strip()


def in_unit_of(value: float, written: object, dim: str) -> str:
    """``value`` in the unit ``written`` used (so a claim and its check read alike)."""
    if isinstance(written, str) and parse_quantity(written, dim) is not None:
        unit = written.split()[-1] if " " in written.strip() else None
        if unit:
            factor = {k.lower(): v for k, v in UNITS[dim].items()}.get(unit.lower())
            if factor:
                return f"{value / factor:.4g} {unit}"
    return ""
