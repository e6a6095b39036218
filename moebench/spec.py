"""The run specification the kinds receive, and the reading helpers every input file shares.

``RunSpec`` is one run of a scenario, every key resolved (``moebench/scenario.py`` builds it from a
file); ``ScenarioError`` is a scenario that cannot run, with a one-line message for the user. The
helpers read a TOML file and check a table's keys and values, each problem a one-line error naming
the file, the key, the value (cut short when long) and what is accepted. This module sits below the
kinds: it imports none of them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import tomllib

from moebench.text import clip
from runtime import DecoderConfig, MoEConfig, ParallelConfig


class ScenarioError(ValueError):
    """A scenario that cannot run; the message is one line for the user."""


def _show(value: object) -> str:
    """A value as TOML would spell it, for a message: cut short when long (``text.clip``)."""
    return clip(_spell(value))


def _spell(value: object) -> str:
    """A value as TOML would spell it, whole."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # escapes quotes and newlines as TOML does
    if isinstance(value, list):
        return "[" + ", ".join(_spell(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_spell(v)}" for k, v in value.items()) + "}"
    return repr(value)


# [model] keys only a decoder reads (kinds "serve", "train"); other kinds' result files do not record them
DECODER = (
    "attention_heads", "kv_heads", "head_dim", "dense_layers", "shared_experts", "shared_expert_gate", "vocab",
    "recompute", "qk_norm",
)  # fmt: skip
# [routing] keys of the router variants and their defaults: a result file records them only when set
ROUTER_VARIANTS = {
    "scoring": "softmax", "topk_before_softmax": False, "group_limited": None, "score_bias": 0.0, "routed_scaling": 1.0,
    "score_bias_update": 0.0,
}  # fmt: skip
DECODER_KINDS = ("serve", "train")
SLO_STATS = ("median", "p90", "p99", "min", "max")


def _key(name: str) -> str:
    """A key as TOML would spell it: bare when it can be, quoted (newlines escaped) otherwise; cut short."""
    return clip(name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name, ensure_ascii=False))


@dataclass(frozen=True)
class Slo:
    metric: str
    op: str  # "max": value must be <= limit; "min": value must be >= limit
    limit: float
    source: str  # "scenario" or "default (...)"
    stat: str = "median"  # which summary of the metric is judged

    @property
    def key(self) -> str:
        """The [slo] key that states this gate, e.g. max_step_time_s_p99."""
        return f"{self.op}_{self.metric}" + ("" if self.stat == "median" else f"_{self.stat}")


EPLB_DEFAULTS = {"window": 1000, "interval": 0, "nodes": 1}  # [eplb]: vLLM's window; interval 0 = never re-place


@dataclass(frozen=True)
class RunSpec:
    """One run of a scenario: every key resolved, sweeps expanded to single values."""

    path: str
    scenario: dict
    model: dict
    routing: dict
    parallel: dict
    workload: dict
    slos: tuple[Slo, ...]
    params: dict = field(default_factory=dict)  # the swept keys and their values in this run
    offload: dict = field(default_factory=dict)  # [offload]; empty or cache_slots None: no offload
    fault: dict = field(default_factory=dict)  # [fault]; kind "fault" only
    serve: dict = field(default_factory=dict)  # [serve]; kind "serve" only
    train: dict = field(default_factory=dict)  # [train]; kind "train" only
    alerts: dict = field(default_factory=dict)  # [alerts]; empty: no series, no alerts (throughput, latency)
    eplb: dict = field(default_factory=lambda: dict(EPLB_DEFAULTS))  # [eplb]
    record_routing: bool = False  # ranks also return their expert choices (moebench run --record-routing)
    trace_dir: str | None = None  # ranks also write a profiler trace here (moebench run --trace)

    @property
    def name(self) -> str:
        return self.scenario["name"]

    @property
    def kind(self) -> str:
        return self.scenario["kind"]

    @property
    def world_size(self) -> int:
        return self.parallel["world_size"]

    def moe_config(self) -> MoEConfig:
        m, r = self.model, self.routing
        return MoEConfig(
            hidden_size=m["hidden"],
            ffn_hidden_size=m["ffn_hidden"],
            num_experts=m["num_experts"],
            top_k=m["top_k"],
            activation=m["activation"],
            capacity_factor=float(r["capacity_factor"]),
            aux_loss_coef=float(r["aux_loss_coef"]),
            z_loss_coef=float(r["z_loss_coef"]),
            normalize_topk=r["normalize_topk"],
            dtype=m["dtype"],
            expert_backend=self._expert_backend(),
            granularity=r.get("granularity", "token"),
            seq_len=self.workload.get("seq_len") if r.get("granularity") == "sequence" else None,
            scoring=r.get("scoring", "softmax"),
            topk_before_softmax=r.get("topk_before_softmax", False),
            group_limited=None if r.get("group_limited") is None else tuple(r["group_limited"]),
            score_bias=float(r.get("score_bias", 0.0)),
            routed_scaling=float(r.get("routed_scaling", 1.0)),
            score_bias_update=float(r.get("score_bias_update", 0.0)),
        )

    def _expert_backend(self) -> str:
        """The model's; with ``[offload]``, "auto" is "loop": the backend the offloaded layer computes
        with, so its resident counterpart does the same arithmetic (bitwise equal outputs)."""
        if self.offload.get("cache_slots") is not None and self.model["expert_backend"] == "auto":
            return "loop"
        return self.model["expert_backend"]

    def decoder_config(self) -> DecoderConfig:
        """The decoder of a serve or train run ([model]'s attention keys; kv_heads defaults to attention_heads,
        head_dim to hidden / attention_heads)."""
        m = self.model
        heads = m["attention_heads"]
        return DecoderConfig(
            self.moe_config(),
            layers=m["layers"],
            attention_heads=heads,
            kv_heads=m["kv_heads"] or heads,
            head_dim=m["head_dim"] or 0,
            dense_layers=m["dense_layers"],
            shared_experts=m["shared_experts"],
            shared_expert_gate=m.get("shared_expert_gate", False),
            vocab=m["vocab"],
            qk_norm=m.get("qk_norm", "none"),
        )

    def parallel_config(self) -> ParallelConfig:
        par = self.parallel
        chunks = par.get("overlap_chunks") or 1
        ep = 1 if par.get("mode") == "dp" else par["world_size"]  # dp: every rank holds every expert
        return ParallelConfig(ep_size=ep, placement=par["placement"], overlap_chunks=chunks)

    def resolved(self) -> dict:
        """The run's full configuration, as the result file records it."""
        slo = {s.key: s.limit for s in self.slos}
        serving = self.kind in DECODER_KINDS  # the decoder's keys and mode: recorded for the kinds that read them
        decoder = serving or self.model.get("attention_heads") is not None  # also an hf: decoder's equivalence
        return {
            "scenario": self.scenario,
            "model": self.model if decoder else {k: v for k, v in self.model.items() if k not in DECODER},
            "routing": {k: v for k, v in self.routing.items() if k not in ROUTER_VARIANTS or v != ROUTER_VARIANTS[k]},
            "parallel": self.parallel if serving else {k: v for k, v in self.parallel.items() if k != "mode"},
            "workload": self.workload,
            **({"offload": self.offload} if self.offload.get("cache_slots") is not None else {}),
            **({"fault": self.fault} if self.fault.get("type") is not None else {}),
            **({"serve": self.serve} if self.kind == "serve" else {}),
            **({"train": self.train} if self.kind == "train" else {}),
            **({"alerts": self.alerts} if self.alerts else {}),
            **({"eplb": self.eplb} if self.eplb.get("interval") else {}),
            "slo": slo,
        }


def check_decoder(spec: RunSpec) -> None:
    """The decoder keys of a serve or train run: attention heads given, a head size that follows, and the
    runtime's own checks of ``DecoderConfig`` reworded in the file's terms."""
    m = spec.model
    if m["attention_heads"] is None:
        raise ValueError(f"[model] attention_heads is missing: accepted an integer from 1 to 4096 (kind {spec.kind})")
    if m["head_dim"] is None and m["hidden"] % m["attention_heads"]:
        raise ValueError(
            f"[model] head_dim is missing: accepted an even integer when hidden ({m['hidden']}) is not a multiple "
            f"of attention_heads ({m['attention_heads']})"
        )
    try:
        spec.decoder_config()
    except ValueError as err:  # "DecoderConfig.kv_heads = 3 is invalid: ..." in the file's terms
        raise ValueError(str(err).replace("DecoderConfig.", "[model] ", 1)) from None


def check_table(path: str, section: str, table: object, known, error: type[ValueError] = ScenarioError) -> None:
    """A TOML section must be a table whose keys are all ``known``; else ``error``, one line naming the file."""
    if not isinstance(table, dict):
        raise error(f"{path}: [{section}] = {_show(table)} is invalid: accepted a table of keys")
    for key in table:
        if key not in known:
            raise error(f"{path}: [{section}] {_key(key)} is not a known key: accepted {', '.join(known)}")


def read_toml(path: str, error: type[ValueError] = ScenarioError) -> dict:
    """A TOML file's top table; any way it cannot be read is a one-line ``error`` naming the file."""
    data = b""
    try:
        with open(path, "rb") as f:
            data = f.read()
        return tomllib.loads(data.decode("utf-8"))
    except OSError as err:
        raise error(f"{path}: cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        byte = f"byte 0x{data[err.start]:02x} at offset {err.start}"
        raise error(f"{path}: not UTF-8 text ({byte}): accepted a UTF-8 TOML file") from None
    except tomllib.TOMLDecodeError as err:
        raise error(f"{path}: not valid TOML: {err}") from None
    except RecursionError:
        raise error(f"{path}: not valid TOML here: arrays or tables nested too deeply to read") from None
