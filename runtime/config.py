"""Configuration of one MoE layer and of its expert-parallel layout, validated on construction.

Every impossible value raises ``ValueError`` naming the field, the value and what is accepted,
so that a scenario loader can turn it into a one-line message for the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ACTIVATIONS = ("gelu", "swiglu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PLACEMENTS = ("round_robin", "contiguous", "load_balanced", "custom")
EXPERT_BACKENDS = ("auto", "grouped_mm", "bmm", "loop")
GRANULARITIES = ("token", "sequence")  # what the router routes on: each token, or its sequence's mean
SCORINGS = ("softmax", "sigmoid")  # expert scores from logits: softmax over experts, or each expert's sigmoid


def _fail(cls: str, name: str, value: object, accepted: str) -> None:
    raise ValueError(f"{cls}.{name} = {value!r} is invalid: accepted {accepted}")


def _positive_int(cls: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(cls, name, value, "an integer >= 1")


def _non_negative_number(cls: str, name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        _fail(cls, name, value, "a finite number >= 0")


def _one_of(cls: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(cls, name, value, "one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of one MoE layer (the same on every rank)."""

    hidden_size: int  # D: model width, the size of each token vector
    ffn_hidden_size: int  # F: hidden width of each expert's FFN
    num_experts: int  # E: experts in the layer, over all ranks
    top_k: int = 1  # K: experts each token is sent to, 1 <= K <= E
    activation: str = "gelu"  # "gelu": W_down·gelu(W_up·x); "swiglu": W_down·(silu(W_gate·x)⊙W_up·x)
    capacity_factor: float = 0.0  # 0 = dropless; else capacity = ceil(cf·N·K/E) per expert
    aux_loss_coef: float = 0.0  # weight of the Switch/GShard load-balancing loss in router_loss
    z_loss_coef: float = 0.0  # weight of the ST-MoE router z-loss in router_loss
    normalize_topk: bool = False  # True: top-k weights renormalised to sum to 1; False: raw softmax
    dtype: str = "float32"  # expert compute and activations dtype; the router always runs in fp32
    expert_backend: str = "auto"  # grouped expert GEMM: "grouped_mm", "bmm" (padded), "loop", "auto"
    granularity: str = "token"  # "sequence": every token of a sequence goes where its mean hidden state is routed
    seq_len: int | None = None  # "sequence": rows per sequence when a forward names none; None = one sequence
    # Routers real models use (runtime/router.py): all at their defaults, the plain top-k softmax router.
    scoring: str = "softmax"  # "sigmoid": scores = sigmoid(logits) (DeepSeek-V3)
    topk_before_softmax: bool = False  # Mixtral's order: top-k on the logits, softmax over the chosen K
    group_limited: tuple[int, int] | None = None  # (n_groups, top_groups): DeepSeek-V3's group-limited choice
    score_bias: float = 0.0  # > 0: a per-expert bias (MoEWeights.score_bias_E, drawn by init_weights as
    #   score_bias · N(0, 1)) moves the choice, not the weights (DeepSeek-V3's aux-loss-free balancing)
    routed_scaling: float = 1.0  # a factor on the routed output (DeepSeek-V3's routed_scaling_factor)
    score_bias_update: float = 0.0  # γ > 0: after each training step b_e += γ · sign(mean load − load_e)
    #   (DeepSeek-V3's online bias update; runtime/training.py); the bias buffer exists, zero when score_bias = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            _positive_int(name, field, getattr(self, field))
        if self.top_k > self.num_experts:
            _fail(name, "top_k", self.top_k, f"1 <= top_k <= num_experts ({self.num_experts})")
        _one_of(name, "activation", self.activation, ACTIVATIONS)
        for field in ("capacity_factor", "aux_loss_coef", "z_loss_coef"):
            _non_negative_number(name, field, getattr(self, field))
        if not isinstance(self.normalize_topk, bool):
            _fail(name, "normalize_topk", self.normalize_topk, "true or false")
        _one_of(name, "dtype", self.dtype, tuple(DTYPES))
        _one_of(name, "expert_backend", self.expert_backend, EXPERT_BACKENDS)
        _one_of(name, "granularity", self.granularity, GRANULARITIES)
        if self.seq_len is not None:
            _positive_int(name, "seq_len", self.seq_len)
            if self.granularity != "sequence":
                _fail(name, "seq_len", self.seq_len, "None with granularity 'token' (it cuts sequences to route on)")
        self._check_gating(name)

    def _check_gating(self, name: str) -> None:
        """The router variants' fields, each alone and together."""
        _one_of(name, "scoring", self.scoring, SCORINGS)
        if not isinstance(self.topk_before_softmax, bool):
            _fail(name, "topk_before_softmax", self.topk_before_softmax, "true or false")
        _non_negative_number(name, "score_bias", self.score_bias)
        _non_negative_number(name, "score_bias_update", self.score_bias_update)
        scaling = self.routed_scaling
        if (
            isinstance(scaling, bool)
            or not isinstance(scaling, (int, float))
            or not math.isfinite(scaling)
            or scaling <= 0
        ):
            _fail(name, "routed_scaling", scaling, "a finite number > 0")
        if self.group_limited is not None:
            groups = self.group_limited
            if not (isinstance(groups, (tuple, list)) and len(groups) == 2) or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in groups
            ):
                _fail(name, "group_limited", groups, "[n_groups, top_groups], two integers >= 1")
            n_groups, top_groups = groups
            e, k = self.num_experts, self.top_k
            if e % n_groups or e // n_groups < 2:
                _fail(name, "group_limited", groups, f"n_groups dividing num_experts ({e}) into groups of >= 2 experts")
            if top_groups > n_groups or top_groups * (e // n_groups) < k:
                _fail(name, "group_limited", groups, f"top_groups <= n_groups holding >= top_k ({k}) experts")
            object.__setattr__(self, "group_limited", (n_groups, top_groups))
        if self.topk_before_softmax and (self.scoring != "softmax" or self.group_limited or self.has_score_bias):
            _fail(
                name,
                "topk_before_softmax",
                True,
                "true only with scoring 'softmax', no group_limited, no score_bias and no score_bias_update "
                "(Mixtral's router)",
            )

    @property
    def plain_routing(self) -> bool:
        """The top-k softmax router: no variant of runtime/router.py's ``gate`` is on."""
        return (
            self.scoring == "softmax"
            and not self.topk_before_softmax
            and self.group_limited is None
            and not self.has_score_bias
            and self.routed_scaling == 1
        )

    @property
    def has_score_bias(self) -> bool:
        """The router holds the choice bias ``score_bias_E``: drawn (score_bias > 0) or updated in training
        (score_bias_update > 0; it then starts at zero when score_bias = 0)."""
        return self.score_bias > 0 or self.score_bias_update > 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dropless(self) -> bool:
        return self.capacity_factor == 0


MAX_CHUNKS = 4096  # overlap_chunks' bound: runtime/permute.py sorts chunk indices as 16-bit keys


@dataclass(frozen=True)
class ParallelConfig:
    """How the experts of a layer are spread over the expert-parallel (EP) group."""

    ep_size: int = 1  # W: ranks in the EP group; each owns a disjoint subset of the experts
    placement: str = "round_robin"  # expert -> rank strategy, see runtime/placement.py
    max_experts_per_rank: int | None = None  # slot limit per rank; None = ceil(E / W)
    expert_loads: tuple[float, ...] | None = None  # per-expert load, required by "load_balanced"
    expert_to_rank: tuple[int, ...] | None = None  # explicit map, required by "custom"
    overlap_chunks: int = 1  # C: chunks the layer pipelines its all-to-alls over; 1 = serial; ≤ MAX_CHUNKS

    def __post_init__(self) -> None:
        name = type(self).__name__
        _positive_int(name, "ep_size", self.ep_size)
        _one_of(name, "placement", self.placement, PLACEMENTS)
        _positive_int(name, "overlap_chunks", self.overlap_chunks)
        if self.overlap_chunks > MAX_CHUNKS:
            _fail(name, "overlap_chunks", self.overlap_chunks, f"an integer from 1 to {MAX_CHUNKS}")
        if self.max_experts_per_rank is not None:
            _positive_int(name, "max_experts_per_rank", self.max_experts_per_rank)
        if self.placement == "load_balanced" and self.expert_loads is None:
            _fail(name, "expert_loads", None, "a per-expert load vector when placement = 'load_balanced'")
        if self.placement == "custom" and self.expert_to_rank is None:
            _fail(name, "expert_to_rank", None, "an expert -> rank list when placement = 'custom'")
        if self.expert_loads is not None:
            loads = tuple(self.expert_loads)
            if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in loads):
                _fail(name, "expert_loads", self.expert_loads, "finite numbers >= 0")
            object.__setattr__(self, "expert_loads", tuple(float(v) for v in loads))
        if self.expert_to_rank is not None:
            ranks = tuple(self.expert_to_rank)
            if not all(isinstance(r, int) and not isinstance(r, bool) and 0 <= r < self.ep_size for r in ranks):
                _fail(name, "expert_to_rank", self.expert_to_rank, f"ranks in [0, {self.ep_size - 1}]")
            object.__setattr__(self, "expert_to_rank", ranks)
