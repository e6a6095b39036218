"""The performance model of a deployment plan: every derived figure as a pure function of the plan.

Symbols (the report and ``scenarios/plans/README.md`` use the same ones):
L layers, d hidden, h heads, dh head dim, kv KV heads, F expert FFN hidden, E experts, k top_k,
V vocab, m matrices per expert (2 gelu, 3 swiglu), b bytes per parameter; EP, TP, PP, DP degrees,
G = EP·TP·PP·DP GPUs; B sequences in flight, S longest prompt, O output tokens, M micro-batches,
cf capacity factor (0: none), s routing skew (busiest expert's tokens / mean).

Layout assumed (documented in the README): attention is data-parallel over the EP·DP data ranks
and sharded over TP; experts are split over EP and sharded over TP; layers are split over PP.
Within a layer nothing overlaps: a layer's time is its roofline (max of compute and memory time)
plus its all-to-alls and TP all-reduces. The busiest rank sets every collective's time. The first_k_dense
layers run a dense FFN (no router, no all-to-all); a stage's time sums its MoE and dense layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moebench.plan.spec import Plan


@dataclass(frozen=True)
class Figure:
    """One derived number, with the formula that produced it (symbols, then numbers)."""

    key: str
    value: float
    unit: str
    formula: str


def _g(x: float) -> str:
    return f"{x:.4g}"


# -------------------------------------------------------------------------------------------
# Architecture


def attention_params(p: Plan) -> int:
    """One layer's attention matrices (what TP shards and the FLOPs count).

    GQA: Q and O d·h·dh each, K and V d·kv·dh each. MLA (DeepSeek-V2/V3): the query d·rq + rq·h·(dn + dr)
    (or d·h·(dn + dr) without a query rank rq), the joint key/value down-projection d·(rkv + dr), its
    up-projection rkv·h·(dn + dv) and the output h·dv·d."""
    m = p.model
    if m.attention == "mla":
        qk, rq, rkv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.q_lora_rank, m.kv_lora_rank
        query = m.hidden * rq + rq * m.heads * qk if rq else m.hidden * m.heads * qk
        kv = m.hidden * (rkv + m.qk_rope_head_dim) + rkv * m.heads * (m.qk_nope_head_dim + m.v_head_dim)
        return query + kv + m.heads * m.v_head_dim * m.hidden
    return 2 * m.hidden * m.heads * m.head_dim + 2 * m.hidden * m.kv_heads * m.head_dim


def attention_vector_params(p: Plan) -> int:
    """One layer's attention vectors, no matmul: biases (qkv: h·dh + 2·kv·dh, qkvo: + d), one sink logit
    per head, q/k norms (head: 2·dh shared by the heads; full: h·dh + kv·dh) and MLA's norms on its
    latents (rq + rkv)."""
    m = p.model
    q, kv = m.heads * m.head_dim, m.kv_heads * m.head_dim
    bias = {"none": 0, "qkv": q + 2 * kv, "qkvo": q + 2 * kv + m.hidden}[m.attention_bias]
    norm = {"none": 0, "head": 2 * m.head_dim, "full": q + kv}[m.qk_norm]
    latent_norms = m.q_lora_rank + m.kv_lora_rank
    return bias + norm + latent_norms + (m.heads if m.attention_sinks else 0)


def attention_head_vector_params(p: Plan) -> int:
    """The part of ``attention_vector_params`` that belongs to heads, so TP shards it with them: the q, k and v
    biases (h·dh + 2·kv·dh) and the sink logits (one per head). The o bias and the norms stay whole."""
    m = p.model
    bias = 0 if m.attention_bias == "none" else (m.heads + 2 * m.kv_heads) * m.head_dim
    return bias + (m.heads if m.attention_sinks else 0)


def expert_params(p: Plan) -> int:
    """One routed expert's matrices m·d·F."""
    return p.model.expert_matrices * p.model.hidden * p.model.ffn_hidden


def expert_bias_params(p: Plan) -> int:
    """One routed expert's biases when it has them: (m − 1)·F on the input side, d on the output."""
    m = p.model
    return (m.expert_matrices - 1) * m.ffn_hidden + m.hidden if m.expert_bias else 0


def expert_params_per_gpu(p: Plan) -> float:
    """One routed expert's parameters on one GPU: its matrices m·d·F/TP and, with expert biases, the input-side
    biases (m − 1)·F/TP (sharded with their columns) and the output bias d (whole on every TP rank)."""
    m, tp = p.model, p.parallel.tp
    bias = (m.expert_matrices - 1) * m.ffn_hidden / tp + m.hidden if m.expert_bias else 0
    return expert_params(p) / tp + bias


def shared_params(p: Plan) -> int:
    """The shared experts of one MoE layer: n·m·d·Fs, run for every token."""
    m = p.model
    return m.shared_experts * m.expert_matrices * m.hidden * m.shared_ffn_hidden


def dense_ffn_params(p: Plan) -> int:
    """The FFN of one of the first_k_dense layers: m·d·Fd."""
    return p.model.expert_matrices * p.model.hidden * p.model.dense_ffn_hidden


def router_params(p: Plan) -> int:
    """d·E, and E more with a router bias (sigmoid scoring has the same weights as softmax)."""
    m = p.model
    return m.hidden * m.experts + (m.experts if m.router_bias else 0)


def layer_params(p: Plan) -> int:
    """One MoE layer: attention, E experts, the shared experts, the router and two norms 2·d."""
    m = p.model
    return (
        attention_params(p) + attention_vector_params(p) + m.experts * (expert_params(p) + expert_bias_params(p))
        + shared_params(p) + router_params(p) + 2 * m.hidden
    )  # fmt: skip


def dense_layer_params(p: Plan) -> int:
    """One of the first_k_dense layers: attention, the dense FFN and two norms."""
    return attention_params(p) + attention_vector_params(p) + dense_ffn_params(p) + 2 * p.model.hidden


def embedding_params(p: Plan) -> int:
    return p.model.vocab * p.model.hidden * (1 if p.model.tie_embeddings else 2)


def total_params(p: Plan) -> int:
    """Every layer, the embedding and LM head, and the final norm d."""
    m = p.model
    return m.moe_layers * layer_params(p) + m.first_k_dense * dense_layer_params(p) + embedding_params(p) + m.hidden


def active_params(p: Plan) -> int:
    """Parameters one token touches: everything but the E − k routed experts it skips in each MoE layer.
    The embedding table counts whole (Mixtral's, Qwen's and OLMoE's convention)."""
    m = p.model
    return total_params(p) - m.moe_layers * (m.experts - m.top_k) * (expert_params(p) + expert_bias_params(p))


def active_params_without_embedding(p: Plan) -> int:
    """``active_params`` less the input embedding table V·d, of which a token reads one row (DeepSeek's
    and OpenAI's convention). A tied table is also the LM head, which every token uses whole: kept."""
    m = p.model
    return active_params(p) - (0 if m.tie_embeddings else m.vocab * m.hidden)


def matmul_flops_per_token(p: Plan) -> float:
    """Forward projections and experts of one token, no embedding lookup or LM head:
    2·(L·attn + (L − Ld)·(d·E + k·m·d·F + n·m·d·Fs) + Ld·m·d·Fd)."""
    m = p.model
    moe = m.hidden * m.experts + m.top_k * expert_params(p) + shared_params(p)
    return 2.0 * (m.layers * attention_params(p) + m.moe_layers * moe + m.first_k_dense * dense_ffn_params(p))


def score_flops(p: Plan, context: float) -> float:
    """Attention scores and weighted values of one query over ``context`` keys, all layers:
    2·L·h·(dh + dv)·c (4·L·h·dh·c when dv = dh; MLA: dh = dn + dr, computed per head, not absorbed)."""
    m = p.model
    return 2.0 * m.layers * m.heads * (m.head_dim + m.value_head_dim) * context


def attention_flops(p: Plan, context: float, phase: str) -> float:
    """One query's attention over ``context`` keys in one layer, all heads. GQA, and MLA in prefill (the latent
    decompressed into per-head keys and values): 2·h·(dh + dv)·c. MLA in decode reads its latent cache with
    the projections absorbed into the query and the output: scores over rkv + dr and values over rkv,
    2·h·(2·rkv + dr)·c (DeepSeek-V2's weight absorption; for DeepSeek-V3 3.4× the per-head count)."""
    m = p.model
    if m.attention == "mla" and phase == "decode":
        return 2.0 * m.heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim) * context
    return 2.0 * m.heads * (m.head_dim + m.value_head_dim) * context


def kv_values_per_token(p: Plan) -> int:
    """Cached values per token and layer on one GPU: K and V of its ⌈kv/TP⌉ heads, 2·⌈kv/TP⌉·dh; MLA caches
    the latent and the shared RoPE key, rkv + dr, whole on every TP rank."""
    m = p.model
    if m.attention == "mla":
        return m.kv_lora_rank + m.qk_rope_head_dim
    return 2 * math.ceil(m.kv_heads / p.parallel.tp) * m.head_dim


# -------------------------------------------------------------------------------------------
# Placement and per-GPU shares


def data_ranks(p: Plan) -> int:
    return p.parallel.ep * p.parallel.dp


def seqs_per_rank(p: Plan) -> int:
    return math.ceil(p.workload.batch / data_ranks(p))


def stage_layers(p: Plan) -> int:
    return math.ceil(p.model.layers / p.parallel.pp)


def local_experts(p: Plan) -> int:
    return math.ceil(p.model.experts / p.parallel.ep)


def resident_experts(p: Plan) -> int:
    """Experts per layer on a GPU: all its E/EP, or ``offload_cache_slots`` with offload."""
    return p.parallel.offload_cache_slots or local_experts(p)


def offloaded_time(resident_s: float, copied_bytes: float, host_to_device_bandwidth: float) -> float:
    """An offloaded step's time: the resident step's plus its expert copies at the host-to-device
    bandwidth, one after the other (no overlap: the bound prefetch can only improve on). The same
    formula ``moebench plan --calibrate`` checks against measured offload runs."""
    return resident_s + copied_bytes / host_to_device_bandwidth


def load_factor(p: Plan) -> float:
    """The busiest expert's tokens over the mean: the skew, cut at the capacity when there is one."""
    cf = p.parallel.capacity_factor
    return min(p.workload.routing_skew, cf) if cf > 0 else p.workload.routing_skew


def gemm_efficiency(p: Plan, rows: float) -> float:
    """Fraction of peak a GEMM of ``rows`` rows reaches: mfu · rows / (rows + r½) (r½ = gemm_half_rows)."""
    half = p.hardware.gemm_half_rows
    return p.hardware.mfu * rows / (rows + half) if half > 0 else p.hardware.mfu


# -------------------------------------------------------------------------------------------
# Memory per GPU


@dataclass(frozen=True)
class Memory:
    weights_dense: float
    weights_experts: float
    weights_embedding: float
    kv_cache: float
    activations: float
    comm_buffers: float

    @property
    def weights(self) -> float:
        return self.weights_dense + self.weights_experts + self.weights_embedding

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.activations + self.comm_buffers


def prefill_tokens_per_microbatch(p: Plan) -> int:
    return math.ceil(seqs_per_rank(p) / p.workload.microbatches) * p.workload.seq_len_max


def memory_per_gpu(p: Plan) -> Memory:
    """Bytes on the most loaded GPU (a stage holding the embedding or LM head) at the longest sequence.

    1. Weights: attention matrices sharded by TP with their heads' vectors (q/k/v biases, sinks); the o bias,
       q/k and latent norms, the layer norms and the router (with its bias) whole on every TP rank; E/EP
       experts sharded by TP, their biases with them (``expert_params_per_gpu``; with offload,
       ``offload_cache_slots`` of them per layer: the rest stay in host memory); the first_k_dense layers'
       dense FFN sharded by TP;
       embedding and LM head sharded by TP, both on one GPU only when PP = 1.
    2. KV cache of this rank's sequences at S + O tokens, kv heads sharded by TP.
    3. Activations of one prefill micro-batch in one layer: residual and normed input (2·d),
       q, k, v, and the expert rows received (at the busiest rank) with their hidden (m·F/TP).
    4. Dispatch send and receive buffers for one layer.
    """
    m, par, b = p.model, p.parallel, p.model.bytes_per_param
    Ls, tp = stage_layers(p), par.tp
    moe_ls = min(Ls, m.moe_layers)  # the busiest stage holds the most MoE layers (the dense ones come first)
    dense_ls = Ls - moe_ls
    heads = attention_head_vector_params(p)  # q/k/v biases and sinks: sharded with their heads
    attention = (attention_params(p) + heads) / tp + attention_vector_params(p) - heads + 2 * m.hidden
    dense = (
        moe_ls * (attention + router_params(p) + shared_params(p) / tp)
        + dense_ls * (attention + dense_ffn_params(p) / tp)
    ) * b
    experts = moe_ls * resident_experts(p) * expert_params_per_gpu(p) * b
    copies = 2 if (par.pp == 1 and not m.tie_embeddings) else 1
    embedding = copies * m.vocab * m.hidden / tp * b
    context = p.workload.seq_len_max + p.workload.output_tokens
    kv = seqs_per_rank(p) * context * Ls * kv_values_per_token(p) * b
    T = prefill_tokens_per_microbatch(p)
    rows = T * m.top_k * load_factor(p)
    qkv = (m.heads + 2 * m.kv_heads) * m.head_dim / tp
    acts = b * (T * (2 * m.hidden + qkv) + rows * (m.hidden + m.expert_matrices * m.ffn_hidden / tp))
    comm = b * m.hidden * (T * m.top_k + rows) / tp
    return Memory(dense, experts, embedding, kv, acts, comm)


# -------------------------------------------------------------------------------------------
# Communication: alpha-beta


def _link(p: Plan, span: int) -> tuple[float, float, str]:
    """(latency, bandwidth, name) of the link a group of ``span`` consecutive GPUs talks over."""
    hw = p.hardware
    if span <= hw.gpus_per_node:
        return hw.intra_node_latency, hw.intra_node_bandwidth, "intra-node"
    return hw.inter_node_latency, hw.inter_node_bandwidth, "inter-node"


@dataclass(frozen=True)
class CommTime:
    latency: float
    transfer: float
    bytes: float
    link: str

    @property
    def total(self) -> float:
        return self.latency + self.transfer


def all_to_all(p: Plan, tokens: float) -> CommTime:
    """One all-to-all (dispatch or combine) of one layer, at the busiest GPU of the EP group.

    The busiest GPU receives tokens·k·load·d·b/TP bytes, (EP−1)/EP of them from other ranks
    (each TP rank carries 1/TP of its data rank's rows). The EP group spans EP·TP consecutive
    GPUs; traffic to ranks on other nodes goes over the inter-node link, the rest intra-node, and
    the slower of the two parts sets the time: α + max(bytes_intra/β_intra, bytes_inter/β_inter).
    """
    m, par, hw = p.model, p.parallel, p.hardware
    if par.ep == 1:
        return CommTime(0.0, 0.0, 0.0, "none")
    received = tokens * m.top_k * load_factor(p) * m.hidden * m.bytes_per_param / par.tp
    remote = received * (par.ep - 1) / par.ep
    span = par.ep * par.tp
    if span <= hw.gpus_per_node:
        return CommTime(hw.intra_node_latency, remote / hw.intra_node_bandwidth, remote, "intra-node")
    local_peers = max(hw.gpus_per_node // par.tp, 1) - 1  # other EP ranks on this node
    inter = remote * (par.ep - 1 - local_peers) / (par.ep - 1)
    intra = remote - inter
    transfer = max(intra / hw.intra_node_bandwidth, inter / hw.inter_node_bandwidth)
    return CommTime(hw.inter_node_latency, transfer, remote, "inter-node")


def tp_all_reduce(p: Plan, tokens: float) -> CommTime:
    """One ring all-reduce of tokens·d·b over TP: 2(TP−1)·α + 2(TP−1)/TP · bytes/β."""
    tp = p.parallel.tp
    if tp == 1:
        return CommTime(0.0, 0.0, 0.0, "none")
    nbytes = tokens * p.model.hidden * p.model.bytes_per_param
    alpha, beta, link = _link(p, tp)
    return CommTime(2 * (tp - 1) * alpha, 2 * (tp - 1) / tp * nbytes / beta, nbytes, link)


def stage_send(p: Plan, tokens: float) -> CommTime:
    """Point-to-point of a micro-batch's activations to the next stage: α + tokens·d·b/TP / β."""
    if p.parallel.pp == 1:
        return CommTime(0.0, 0.0, 0.0, "none")
    nbytes = tokens * p.model.hidden * p.model.bytes_per_param / p.parallel.tp
    alpha, beta, link = _link(p, p.parallel.gpus)
    return CommTime(alpha, nbytes / beta, nbytes, link)


# -------------------------------------------------------------------------------------------
# One layer: roofline plus communication


@dataclass(frozen=True)
class LayerTime:
    """One layer of one micro-batch on the busiest GPU, by component (seconds)."""

    compute: float
    memory: float
    a2a: CommTime  # one direction; a layer runs two (dispatch and combine)
    allreduce: CommTime  # one; a layer runs two (after attention, after the experts)
    flops: float
    bytes: float
    offload: float = 0.0  # expert copies from host memory (offload_cache_slots), after the roofline

    @property
    def roofline(self) -> float:
        return max(self.compute, self.memory)

    @property
    def total(self) -> float:
        return self.roofline + self.offload + 2 * self.a2a.total + 2 * self.allreduce.total

    def parts(self) -> dict[str, float]:
        """Where the time goes, for 'what binds': compute or memory (whichever the roofline picks),
        and the collectives split into bandwidth (transfer) and latency."""
        bound = "compute" if self.compute >= self.memory else "memory"
        out = {
            bound: self.roofline,
            "bandwidth": 2 * (self.a2a.transfer + self.allreduce.transfer),
            "latency": 2 * (self.a2a.latency + self.allreduce.latency),
        }
        return out | ({"host-to-device": self.offload} if self.offload else {})


def layer_time(p: Plan, tokens: float, context: float, phase: str, ffn: str = "moe") -> LayerTime:
    """Time of one layer for ``tokens`` tokens of one data rank, each attending over ``context``.

    prefill: context is the causal average S/2 and the KV cache is written;
    decode: one token per sequence, context S + O/2 (the mean over the generation) is read.
    ffn "moe": an MoE layer, the router d·E, the busiest rank's expert rows (their weights and biases read)
    and the shared experts, with its two all-to-alls. ffn "dense": one of the first_k_dense layers, a dense FFN
    m·d·Fd/TP run by every token, no router, no all-to-all, no expert copies.
    """
    m, hw, par, b = p.model, p.hardware, p.parallel, p.model.bytes_per_param
    tp = par.tp
    attn_flops = tokens * attention_flops(p, context, phase) / tp
    peak = hw.peak_flops
    kv_row = kv_values_per_token(p) * b
    sequences = tokens if phase == "decode" else tokens / p.workload.seq_len_max
    kv_bytes = tokens * kv_row if phase == "prefill" else sequences * context * kv_row
    bandwidth = hw.memory_bandwidth * hw.memory_bandwidth_efficiency
    if ffn == "dense":
        dense_flops = tokens * 2 * (attention_params(p) + dense_ffn_params(p)) / tp
        compute = (dense_flops + attn_flops) / (peak * gemm_efficiency(p, tokens))
        weight_bytes = (attention_params(p) + dense_ffn_params(p)) / tp * b
        act_bytes = 2 * b * tokens * (2 * m.hidden + m.expert_matrices * m.dense_ffn_hidden / tp)
        nbytes = weight_bytes + kv_bytes + act_bytes
        none = CommTime(0.0, 0.0, 0.0, "none")
        return LayerTime(compute, nbytes / bandwidth, none, tp_all_reduce(p, tokens), dense_flops + attn_flops, nbytes)
    rows = tokens * m.top_k * load_factor(p)  # expert rows at the busiest EP rank
    rows_per_expert = rows / local_experts(p)
    dense_flops = tokens * 2 * (attention_params(p) / tp + m.hidden * m.experts + shared_params(p) / tp)
    expert_flops = rows * 2 * expert_params(p) / tp
    compute = (dense_flops + attn_flops) / (peak * gemm_efficiency(p, tokens)) + expert_flops / (
        peak * gemm_efficiency(p, rows_per_expert)
    )
    experts_read = min(local_experts(p), max(rows, 1.0))  # decode may touch fewer experts than it holds
    expert_bytes = expert_params_per_gpu(p) * b  # one expert's matrices and biases on this GPU
    weight_bytes = (attention_params(p) / tp + shared_params(p) / tp) * b + experts_read * expert_bytes
    act_bytes = 2 * b * (tokens * m.hidden + rows * (m.hidden + m.expert_matrices * m.ffn_hidden / tp))
    nbytes = weight_bytes + kv_bytes + act_bytes
    offload = 0.0
    if par.offload_cache_slots and phase == "decode":  # the experts read that were not on the GPU are copied in first
        missed = (1 - p.workload.offload_hit_rate) * experts_read * expert_bytes
        offload = offloaded_time(0.0, missed, hw.host_to_device_bandwidth)
    return LayerTime(
        compute,
        nbytes / bandwidth,
        all_to_all(p, tokens),
        tp_all_reduce(p, tokens),
        dense_flops + attn_flops + expert_flops,
        nbytes,
        offload,
    )


def stage_layer_time(p: Plan, moe: LayerTime, dense: LayerTime | None) -> float:
    """One micro-batch's layers through the busiest pipeline stage: stage i holds layers i·⌈L/PP⌉ onwards,
    the first_k_dense of them (the first layers) dense; the stage whose n_moe·moe + n_dense·dense is largest."""
    m, per = p.model, stage_layers(p)
    longest = 0.0
    for first in range(0, m.layers, per):
        held = min(per, m.layers - first)
        n_dense = min(max(m.first_k_dense - first, 0), held)
        longest = max(longest, (held - n_dense) * moe.total + (n_dense * dense.total if n_dense else 0.0))
    return longest


# -------------------------------------------------------------------------------------------
# End to end


@dataclass(frozen=True)
class Phase:
    layer: LayerTime  # an MoE layer
    stage: float  # one micro-batch through the busiest stage, with the send to the next
    send: CommTime
    total: float  # the phase's time: TTFT for prefill, TPOT for decode
    dense_layer: LayerTime | None = None  # one of the first_k_dense layers (None without them)


def lm_head_time(p: Plan, tokens: float) -> float:
    m = p.model
    flops = tokens * 2 * m.vocab * m.hidden / p.parallel.tp
    return flops / (p.hardware.peak_flops * gemm_efficiency(p, tokens)) if flops else 0.0


def prefill(p: Plan, seq_len: int | None = None) -> Phase:
    """TTFT: M micro-batches of the rank's prompts through PP stages, (M + PP − 1) stage times,
    then the LM head for each sequence's last token."""
    S = seq_len or p.workload.seq_len_max
    M = p.workload.microbatches
    tokens = math.ceil(seqs_per_rank(p) / M) * S
    layer = layer_time(p, tokens, S / 2, "prefill")
    dense = layer_time(p, tokens, S / 2, "prefill", "dense") if p.model.first_k_dense else None
    send = stage_send(p, tokens)
    stage = stage_layer_time(p, layer, dense) + send.total
    total = (M + p.parallel.pp - 1) * stage + lm_head_time(p, seqs_per_rank(p))
    return Phase(layer, stage, send, total, dense)


def decode(p: Plan) -> Phase:
    """TPOT: every sequence gets one token per round; a round runs M micro-batches through the
    pipeline, max(M, PP) stage times (fewer micro-batches than stages leave stages idle)."""
    M, wl = p.workload.microbatches, p.workload
    tokens = math.ceil(seqs_per_rank(p) / M)
    context = wl.seq_len_max + wl.output_tokens / 2
    layer = layer_time(p, tokens, context, "decode")
    dense = layer_time(p, tokens, context, "decode", "dense") if p.model.first_k_dense else None
    send = stage_send(p, tokens)
    stage = stage_layer_time(p, layer, dense) + send.total + lm_head_time(p, tokens) / p.parallel.pp
    return Phase(layer, stage, send, max(M, p.parallel.pp) * stage, dense)


@dataclass(frozen=True)
class Estimate:
    """Every derived figure of a plan, and the pieces the findings and the search read."""

    plan: Plan
    figures: dict[str, Figure]
    memory: Memory
    prefill: Phase
    decode: Phase

    def __getitem__(self, key: str) -> float:
        return self.figures[key].value


def _params_formula(p: Plan) -> str:
    """The parameter count's formula, the terms a plain MoE lacks shown only when the plan has them."""
    m = p.model
    L, d, h, dh, kv, F, E, mm = (
        m.layers,
        m.hidden,
        m.heads,
        m.head_dim,
        m.kv_heads,
        m.ffn_hidden,
        m.experts,
        m.expert_matrices,
    )
    plain = not (m.shared_experts or m.first_k_dense or m.attention == "mla" or attention_vector_params(p)
                 or m.router_bias or m.expert_bias)  # fmt: skip
    if plain:
        return (
            f"L·(2·d·h·dh + 2·d·kv·dh + E·m·d·F + d·E + 2·d) + V·d·(2 − tied) + d = {L}·({2 * d * h * dh} + "
            f"{2 * d * kv * dh} + {E}·{mm}·{d}·{F} + {d * E} + {2 * d}) + {embedding_params(p)} + {d}"
        )
    return (
        f"L·(attn + attn vectors + 2·d) + (L − Ld)·(E·(m·d·F + expert biases) + n·m·d·Fs + router) + Ld·m·d·Fd "
        f"+ V·d·(2 − tied) + d = {L}·({attention_params(p)} + {attention_vector_params(p)} + {2 * d}) + "
        f"{m.moe_layers}·({E}·({expert_params(p)} + {expert_bias_params(p)}) + {shared_params(p)} + "
        f"{router_params(p)}) + {m.first_k_dense}·{dense_ffn_params(p)} + {embedding_params(p)} + {d}"
    )


def throughput_per_gpu(p: Plan, ttft: float, tpot: float, counts: str) -> float:
    wl, G = p.workload, p.parallel.gpus
    if counts == "prefill":
        return wl.batch * wl.seq_len_max / ttft / G
    if counts == "decode":
        return wl.batch / tpot / G
    return wl.batch * (wl.seq_len_max + wl.output_tokens) / (ttft + wl.output_tokens * tpot) / G


def estimate(p: Plan) -> Estimate:
    """Derive every figure of the plan (see the module docstring for the symbols)."""
    m, par, wl, hw = p.model, p.parallel, p.workload, p.hardware
    mem, pre, dec = memory_per_gpu(p), prefill(p), decode(p)
    counts = p.slo.throughput_counts
    tput = throughput_per_gpu(p, pre.total, dec.total, counts)
    L, d, dh, kv, F, k = m.layers, m.hidden, m.head_dim, m.kv_heads, m.ffn_hidden, m.top_k
    S, O, mm = wl.seq_len_max, wl.output_tokens, m.expert_matrices
    flops_token = matmul_flops_per_token(p) + score_flops(p, S / 2)
    # the busiest stage's layers; with first_k_dense, its MoE and dense layers each at their own time (dense: no a2a)
    stage_text = "Σ busiest stage's MoE and dense layers" if m.first_k_dense else "⌈L/PP⌉"
    expert_text = "(m·d·F/TP + (m − 1)·F/TP + d)" if m.expert_bias else "m·d·F/TP"
    fig = [
        Figure("params", total_params(p), "params", _params_formula(p)),
        Figure("active_params", active_params(p), "params",
               f"params − (L − Ld)·(E − k)·(m·d·F + expert biases), k = {k}, Ld = {m.first_k_dense}"),
        Figure("active_params_without_embedding", active_params_without_embedding(p), "params",
               f"active_params − V·d (the input embedding; kept when tied) = {active_params(p)} − "
               f"{0 if m.tie_embeddings else m.vocab * d}"),
        Figure("gpus", par.gpus, "GPUs", f"EP·TP·PP·DP = {par.ep}·{par.tp}·{par.pp}·{par.dp}"),
        Figure("weights_total", total_params(p) * m.bytes_per_param, "B",
               f"params · b = {_g(total_params(p))} · {m.bytes_per_param}"),
        Figure("weights_per_gpu", mem.weights, "B",
               f"dense {_g(mem.weights_dense)} + experts ⌈E/EP⌉·{expert_text}·(MoE layers of ⌈L/PP⌉)·b "
               f"{_g(mem.weights_experts)} "
               f"+ embedding {_g(mem.weights_embedding)}"),
        Figure("kv_cache_per_gpu", mem.kv_cache, "B",
               f"⌈B/(EP·DP)⌉·(S+O)·⌈L/PP⌉·(rkv + dr)·b = {seqs_per_rank(p)}·{S + O}·{stage_layers(p)}·"
               f"{kv_values_per_token(p)}·{m.bytes_per_param}" if m.attention == "mla" else
               f"⌈B/(EP·DP)⌉·(S+O)·⌈L/PP⌉·2·⌈kv/TP⌉·dh·b = {seqs_per_rank(p)}·{S + O}·{stage_layers(p)}·2·"
               f"{math.ceil(kv / par.tp)}·{dh}·{m.bytes_per_param}"),
        Figure("activations_per_gpu", mem.activations, "B", "b·(T·(2·d + (h+2·kv)·dh/TP) + R·(d + m·F/TP)), "
               f"T = {prefill_tokens_per_microbatch(p)} tokens per micro-batch, R = T·k·load"),
        Figure("comm_buffers_per_gpu", mem.comm_buffers, "B", "b·d·(T·k + R)/TP"),
        Figure("memory_per_gpu", mem.total, "B", "weights + KV cache + activations + buffers"),
        Figure("flops_per_token", flops_token, "FLOP",
               f"2·L·(attn + d·E + k·m·d·F) + 4·L·h·dh·S/2, S = {S} (prefill, causal average)"
               if not (m.shared_experts or m.first_k_dense or m.attention == "mla") else
               f"2·(L·attn + (L − Ld)·(d·E + k·m·d·F + n·m·d·Fs) + Ld·m·d·Fd) + 2·L·h·(dh + dv)·S/2, S = {S} "
               "(prefill, causal average)"),
        Figure("expert_flops_per_token", 2.0 * m.moe_layers * k * expert_params(p), "FLOP",
               f"2·L·k·m·d·F = 2·{L}·{k}·{mm}·{d}·{F}" if not m.first_k_dense else
               f"2·(L − Ld)·k·m·d·F = 2·{m.moe_layers}·{k}·{mm}·{d}·{F}"),
        Figure("compute_bound_throughput_per_gpu", hw.peak_flops * hw.mfu / flops_token, "tokens/s",
               "peak · mfu / flops_per_token"),
        Figure("load_factor", load_factor(p), "×", f"min(s, cf) = min({wl.routing_skew:g}, {par.capacity_factor:g})"
               if par.capacity_factor else f"s = {wl.routing_skew:g} (no capacity limit)"),
        Figure("prefill_layer_compute", pre.layer.compute, "s", "flops / (peak · efficiency(rows))"),
        Figure("prefill_layer_memory", pre.layer.memory, "s", "bytes / (memory bandwidth · efficiency)"),
        Figure("prefill_a2a", pre.layer.a2a.total, "s",
               f"α + bytes/β over {pre.layer.a2a.link}, {_g(pre.layer.a2a.bytes)} B at the busiest rank"),
        Figure("prefill_allreduce", pre.layer.allreduce.total, "s", "2(TP−1)·α + 2(TP−1)/TP · bytes/β"),
        Figure("pipeline_bubble", (par.pp - 1) / (wl.microbatches + par.pp - 1), "fraction",
               f"(PP − 1)/(M + PP − 1) = {par.pp - 1}/{wl.microbatches + par.pp - 1}"),
        Figure("ttft", pre.total, "s",
               f"(M + PP − 1)·({stage_text}·(roofline + 2·a2a + 2·allreduce) + send) + LM head, M = {wl.microbatches}"),
        Figure("decode_layer_compute", dec.layer.compute, "s", "flops / (peak · efficiency(rows))"),
        Figure("decode_layer_memory", dec.layer.memory, "s", "(weights read + KV read) / (bandwidth · efficiency)"),
        Figure("decode_a2a", dec.layer.a2a.total, "s", f"α + bytes/β over {dec.layer.a2a.link}"),
        Figure("tpot", dec.total, "s",
               f"max(M, PP)·({stage_text}·(roofline + 2·a2a + 2·allreduce) + send + LM head/PP)"),
        Figure("throughput_per_gpu", tput, "tokens/s", {
            "total": "B·(S + O) / (TTFT + O·TPOT) / G", "prefill": "B·S / TTFT / G", "decode": "B / TPOT / G"}[counts]),
    ]  # fmt: skip
    short = prefill(p, wl.seq_len_min).total if wl.seq_len_min != S else pre.total
    fig.append(Figure("ttft_at_seq_len_min", short, "s", f"TTFT at S = {wl.seq_len_min}"))
    return Estimate(p, {f.key: f for f in fig}, mem, pre, dec)
