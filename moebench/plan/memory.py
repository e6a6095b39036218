"""The training-memory model: bytes of parameters, gradients, optimizer state and activations that one rank of
the reference decoder (``runtime/model.py``) holds during a training step, as pure functions of its shape.

Symbols: T tokens on the rank, L layers (L_moe of them MoE blocks, L_dense = dense_layers), D hidden,
F expert FFN hidden, E experts, K top_k, n shared experts, H heads, G KV heads, Dh head dim, V vocab,
W the EP degree (1 for data parallelism), b bytes per element of the model's dtype, m matrices per FFN
(2 gelu, 3 swiglu: the fused [gate | up] is 2F wide), P = T·K token copies a rank sends and R = T·K rows it
receives (uniform routing, nothing dropped).

Parameters (exact; what ``MoEDecoder`` allocates). In b bytes: attention 2·D·Dh·(H + G) per block, the
routed experts ⌈E/W⌉·m·D·F per MoE block (the busiest rank under round-robin placement), the shared FFN
n·m·D·F per MoE block, the dense FFN K·m·D·F per dense block, embedding and LM head 2·V·D when V > 0.
In fp32 whatever the dtype: the router E·D per MoE block (``runtime/router.py`` runs in fp32) and the
RMSNorm scales, 2·D per block and D for the final norm (``MoEDecoder`` keeps them as built, fp32).
Gradients equal the parameters (same shapes and dtypes; every parameter gets one). Adam and AdamW keep
``exp_avg`` and ``exp_avg_sq`` of every parameter (2 × the parameter bytes) and a 4-byte fp32 ``step`` per
parameter *tensor*; plain SGD (no momentum) keeps nothing. Tensors: 6 per block (wq, wk, wv, wo, two
norms), + 3 per MoE block (router, w_in, w_down), + 2 with shared experts, + 2 per dense block, + 1 final
norm, + 2 with a vocab.

Activations: bytes of the tensors autograd saves for backward during the forward and the loss (what
``moebench.measure.memory.SavedTensors`` counts: each storage once, parameters left out), derived from the
code, op by op; each term in ``activation_terms`` names its tensor. The assumptions:
  - uniform routing and no drops: every rank sends P = T·K copies and receives R = T·K rows (at W = 1 all
    rows are local, so this is exact whenever nothing is dropped);
  - RMSNorm runs in fp32: it saves its fp32 input, the fp32 reciprocal root [T, 1] and the normalised fp32
    x·r before the scale (8·D + 4 bytes a token); its output in the model's dtype is saved by whatever
    consumes it. In a first block fed hidden states (V = 0) the input needs no gradient: only x·r is saved;
  - attention is a fused kernel (``scaled_dot_product_attention``'s flash or memory-efficient path): it
    saves q, k, v, its output and an fp32 log-sum-exp per query and head, nothing of size N² (the math
    fallback, taken e.g. on CUDA for fp32 with grouped-query heads, would add H·N² per sequence);
  - the experts use the ``loop`` backend (CPU's default): x·W_in, the activation and ·W_down save the rows,
    the pre-activation (width F, or 2F for swiglu) and the activated rows (plus silu(gate) for swiglu).
    The grouped backends at W > 1 also keep two int64 reorder indices per received row (not counted);
  - the router is never recomputed (its fp32 input, logits, probabilities, sort order and losses stay), nor
    are the dispatch and combine (send and combine indices, combine weights, the weighted rows).

Per recompute mode: "none" keeps everything above; "experts" drops the routed experts' pre-activation and
activated rows (the checkpoint keeps the received rows, which the combine needed anyway: nothing added);
"layer" also replaces each block's norms and attention by the block's input (b·D a token, what the
non-reentrant checkpoint saves) and the dense or shared FFN's internals by its input, and drops the RoPE
tables (the checkpointed function reads them, nothing saves them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ACTIVATIONS = ("gelu", "swiglu")
RECOMPUTE = ("none", "experts", "layer")
OPTIMIZERS = ("adamw", "adam", "sgd")
FP32, INDEX = 4, 8  # bytes: the router, norm scales and norm statistics; int64 indices
ADAM_STEP = 4  # bytes: torch's Adam keeps ``step`` as an fp32 scalar tensor per parameter tensor


@dataclass(frozen=True)
class TrainShape:
    """One rank's training configuration, as the memory model needs it."""

    hidden: int  # D
    ffn_hidden: int  # F: each expert's FFN hidden width
    experts: int  # E: routed experts per MoE block, over the EP group
    top_k: int  # K
    layers: int  # L blocks
    heads: int  # H query heads
    kv_heads: int  # G key/value heads
    head_dim: int  # Dh
    bytes_per_element: int  # b: the model dtype's (4 fp32, 2 bf16/fp16)
    tokens: int  # T: tokens on this rank per step
    seq_len: int  # tokens per sequence (T is a whole number of sequences)
    dense_layers: int = 0  # the first blocks with a dense FFN (width K·F) instead of the experts
    shared_experts: int = 0  # n: a dense FFN of width n·F beside the routed experts in MoE blocks
    vocab: int = 0  # V: 0 trains hidden states against an MSE; > 0 token ids against cross-entropy
    activation: str = "gelu"  # "gelu" or "swiglu"
    ep: int = 1  # W: EP degree (1: every rank holds every expert, data parallelism)
    recompute: str = "none"  # "none", "experts" or "layer" (runtime/model.py RECOMPUTE)
    spare_slots: int = 0  # R: EPLB's spare expert slots over the EP group (each rank holds (E + R) / W)
    optimizer: str = "adamw"  # "adamw", "adam" or "sgd"
    normalize_topk: bool = False  # the router renormalises its top-k weights (saves the sort's values)

    def __post_init__(self) -> None:
        positive = ("hidden", "ffn_hidden", "experts", "top_k", "layers", "heads", "kv_heads", "head_dim")
        for name in (*positive, "bytes_per_element", "seq_len", "ep"):
            _check(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 1, "an integer >= 1")
        for name in ("tokens", "dense_layers", "shared_experts", "vocab"):
            _check(self, name, _is_int(getattr(self, name)) and getattr(self, name) >= 0, "an integer >= 0")
        _check(self, "top_k", self.top_k <= self.experts, f"at most experts ({self.experts})")
        _check(self, "dense_layers", self.dense_layers <= self.layers, f"at most layers ({self.layers})")
        _check(self, "kv_heads", self.heads % self.kv_heads == 0, f"a divisor of heads ({self.heads})")
        _check(self, "tokens", self.tokens % self.seq_len == 0, f"a multiple of seq_len ({self.seq_len})")
        _check(self, "activation", self.activation in ACTIVATIONS, "one of " + ", ".join(ACTIVATIONS))
        _check(self, "recompute", self.recompute in RECOMPUTE, "one of " + ", ".join(RECOMPUTE))
        _check(self, "optimizer", self.optimizer in OPTIMIZERS, "one of " + ", ".join(OPTIMIZERS))
        _check(self, "normalize_topk", isinstance(self.normalize_topk, bool), "true or false")

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers

    @property
    def matrices(self) -> int:
        """m: an FFN's D×F matrices (swiglu fuses gate and up into one D×2F)."""
        return 3 if self.activation == "swiglu" else 2

    @property
    def local_experts(self) -> int:
        """Expert slots on the busiest rank of the EP group (round-robin placement; with EPLB, (E + R) / W)."""
        return math.ceil((self.experts + (self.spare_slots if self.ep > 1 else 0)) / self.ep)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(shape: TrainShape, name: str, ok: bool, accepted: str) -> None:
    if not ok:
        raise ValueError(f"TrainShape.{name} = {getattr(shape, name)!r} is invalid: accepted {accepted}")


# -------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state


def param_counts(s: TrainShape) -> dict[str, int]:
    """Elements per rank by storage dtype ("model": b bytes, "fp32"), the routed experts' (in "model")
    and the parameter tensors (see the module docstring)."""
    d, f, m = s.hidden, s.ffn_hidden, s.matrices
    attention = 2 * d * s.head_dim * (s.heads + s.kv_heads)  # wq, wo: D·H·Dh; wk, wv: D·G·Dh
    experts = s.local_experts * m * d * f  # w_in [L, D, F or 2F], w_down [L, F, D]
    shared = s.shared_experts * m * d * f  # one FFN of width n·F
    dense = s.top_k * m * d * f  # one FFN of width K·F
    model = (
        s.layers * attention
        + s.moe_layers * (experts + shared)
        + s.dense_layers * dense
        + 2 * s.vocab * d  # embed_VD, head_VD
    )
    fp32 = s.moe_layers * s.experts * d + (2 * s.layers + 1) * d  # routers; attn/ffn norms, final norm
    tensors = 6 * s.layers + (3 + 2 * bool(s.shared_experts)) * s.moe_layers + 2 * s.dense_layers + 1
    tensors += 2 * bool(s.vocab)
    return {"model": model, "fp32": fp32, "experts": s.moe_layers * experts, "tensors": tensors}


def optimizer_bytes(s: TrainShape, param_bytes: int, tensors: int) -> int:
    """Adam/AdamW: exp_avg and exp_avg_sq (each the parameters' bytes) and a 4-byte step per tensor."""
    return 0 if s.optimizer == "sgd" else 2 * param_bytes + ADAM_STEP * tensors


# -------------------------------------------------------------------------------------------
# Activations


def _ffn_hidden_bytes(s: TrainShape, rows: int, width: int) -> int:
    """What an FFN of ``width`` saves between its two matmuls for ``rows`` rows (its input not included)."""
    b = s.bytes_per_element
    if s.activation == "swiglu":
        return rows * (2 * width + width + width) * b  # [gate | up] (silu's input, mul's up), silu(gate), a
    return rows * (width + width) * b  # gelu's input, gelu's output (the down matmul's input)


def _rms_norm_bytes(s: TrainShape, input_needs_grad: bool = True) -> int:
    """RMSNorm in fp32: its fp32 input (pow), 1/rms [T, 1] and x·r [T, D]; a no-grad input: x·r only."""
    t, d = s.tokens, s.hidden
    return FP32 * t * d + (FP32 * t * d + FP32 * t if input_needs_grad else 0)


def activation_terms(s: TrainShape) -> dict[str, int]:
    """Bytes saved for backward, per named group of tensors, summed over the rank's blocks (module docstring).

    1. the blocks' attention half: RoPE tables, norms and attention, or under "layer" each block's input;
    2. the MoE blocks' router, dispatch and combine (never recomputed);
    3. the FFN internals a mode keeps: routed experts ("none"), shared experts and dense FFNs (not "layer");
    4. the final norm, the embedding's ids and the loss."""
    t, d, b, e = s.tokens, s.hidden, s.bytes_per_element, s.experts
    rows = t * s.top_k  # P sent = R received (uniform routing, nothing dropped)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    layer, fp32_model = s.recompute == "layer", b == FP32  # fp32: x.float() is x itself (one storage)
    terms: dict[str, int] = {}
    if layer:
        terms["block inputs (checkpoint)"] = s.layers * b * t * d  # each block's x_TD, saved by checkpoint
    else:
        terms["rope cos and sin"] = 2 * t * (s.head_dim // 2) * b  # cos_T1R, sin_T1R, shared by the blocks
        first_needs_grad = s.vocab > 0  # the embedding's output needs a gradient; given hidden states do not
        norms = _rms_norm_bytes(s, first_needs_grad) + (2 * s.layers - 1) * _rms_norm_bytes(s)
        terms["attention and ffn norms"] = norms
        terms["attention"] = s.layers * (
            b * t * d  # the normed input of x·wq, x·wk, x·wv
            + b * t * (q + 2 * kv)  # q after RoPE, k after RoPE, v: the kernel's inputs
            + b * t * q  # the kernel's output
            + FP32 * t * s.heads  # its log-sum-exp per query and head
            + b * t * q  # o_THd, the input of ·wo
        )
    # MoE blocks: never recomputed, the router and the exchange
    terms["router"] = s.moe_layers * (
        FP32 * t * d  # the router's fp32 input (x.float(); in fp32 the normed n_TD itself)
        + FP32 * t * e  # logits_TE (logsumexp of the z-loss)
        + FP32 * t * e  # probs_TE (softmax's output)
        + INDEX * t * e  # the sort's order (top-k gather)
        + FP32 * t  # logsumexp's output (its square, the z-loss)
        + FP32 * e  # f_E, the load-balancing loss's constant factor
        + ((FP32 * t * e + FP32 * t) if s.normalize_topk else 0)  # sorted probabilities, their top-k sum
    )
    terms["dispatch and combine"] = s.moe_layers * (
        INDEX * rows  # token_P: the send's index_select, the combine's index_add_
        + b * rows * d  # x_RD: the rows the experts receive (also what their checkpoint keeps)
        + INDEX * rows  # order_P: gathers the combine weights
        + b * rows  # w_P: each copy's combine weight
        + b * rows * d  # y_PD: the experts' output, back
        + b * rows * d  # the weighted rows, index_add_'s source
    )
    if s.recompute == "none":
        terms["routed experts"] = s.moe_layers * _ffn_hidden_bytes(s, rows, s.ffn_hidden)
    if s.shared_experts:
        # its input: the normed n_TD in the model's dtype (in fp32 the router's input already holds it)
        shared = 0 if fp32_model else b * t * d
        if not layer:
            shared += _ffn_hidden_bytes(s, t, s.shared_experts * s.ffn_hidden)
        terms["shared experts"] = s.moe_layers * shared
    if s.dense_layers:
        dense = b * t * d + (0 if layer else _ffn_hidden_bytes(s, t, s.top_k * s.ffn_hidden))
        terms["dense ffn"] = s.dense_layers * dense  # input n_TD (the FFN's or its checkpoint's), internals
    terms["final norm"] = _rms_norm_bytes(s)
    if s.vocab:
        terms["embedding ids"] = INDEX * t  # embed_VD[ids] keeps the ids
        terms["loss"] = (
            b * t * d  # the final norm's output, the LM head's input
            + FP32 * t * s.vocab  # log_softmax's fp32 output
            + INDEX * t  # the targets
            + FP32  # nll_loss's total weight
        )
    else:
        terms["loss"] = FP32 * t * d  # h − target in fp32 (the MSE's square)
    return terms


def train_memory(s: TrainShape) -> dict[str, int]:
    """Bytes per rank: param_bytes, grad_bytes, optimizer_bytes, activation_bytes, expert_param_bytes."""
    counts = param_counts(s)
    params = counts["model"] * s.bytes_per_element + counts["fp32"] * FP32
    return {
        "param_bytes": params,
        "grad_bytes": params,
        "optimizer_bytes": optimizer_bytes(s, params, counts["tensors"]),
        "activation_bytes": sum(activation_terms(s).values()),
        "expert_param_bytes": counts["experts"] * s.bytes_per_element,
    }


__all__ = ["ACTIVATIONS", "OPTIMIZERS", "RECOMPUTE", "TrainShape", "activation_terms", "param_counts", "train_memory"]
