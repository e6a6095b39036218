"""A small MoE decoder, one rank's part: pre-norm blocks of causal self-attention and an FFN that is
the expert-parallel ``MoELayer`` (or dense, for the first ``dense_layers`` blocks), with a KV cache.

Shape legend: T = packed tokens on this rank (every sequence's new tokens, one after another),
D = hidden, H = attention heads, G = KV heads, Dh = head dim, S = KV-cache slots, M = tokens a slot
holds, B = sequences, N = a sequence's new tokens, C = a sequence's context (cached + new), V = vocab.

Block l:  h = x + attn(rmsnorm(x));  x' = h + ffn(rmsnorm(h))
  attn    GQA: H query heads share G KV heads (H/G each), RoPE (rotate-half, as Llama and Qwen),
          ``F.scaled_dot_product_attention`` causal over the sequence's context; with ``qk_norm`` an
          RMSNorm on q and on k after the projection, before RoPE: "head" one of width Dh on every head
          (one scale for q, one for k, shared by the heads: Qwen3), "full" one over all of q (H·Dh) and
          one over all of k (G·Dh) (OLMoE); the KV cache holds keys normed and rotated
  ffn     the routed experts (``MoELayer``), plus ``shared_experts`` × F of dense FFN applied to every
          token (as DeepSeek-MoE and Qwen-MoE), its output × sigmoid(x · w_gate) per token with
          ``shared_expert_gate`` (Qwen2-MoE's gate); a dense FFN of width top_k·F in the first
          ``dense_layers`` blocks (the MoE block's active FLOPs, no routing)
Output: rmsnorm(x) of the last block ("hidden"); with ``vocab`` > 0 an embedding feeds the first block and
``logits`` is the LM head over the output (untied).

Layout (that of large EP deployments): attention, norms, dense FFNs and the LM head are replicated, each
rank computing only its own sequences (data-parallel); the routed experts are split over the EP group and
every MoE block exchanges tokens with an all-to-all. So every rank of the group must call ``forward`` the
same number of times, with or without tokens of its own (T = 0 joins the exchanges with zero rows).
``ParallelConfig.ep_size`` = 1 with a world of several ranks is the data-parallel baseline: every rank
holds every expert and nothing is exchanged.

Training: every rank's objective is its share of the group's (its tokens' losses over the global batch), so
gradients sum. The routed experts' gradients are complete on their owner (the backward all-to-alls bring
every rank's part); every other parameter is replicated and ``reduce_grads`` sums it over the EP group, and
everything over a data-parallel group. Recomputation (``recompute``, see ``RECOMPUTE``) trades backward time
for the tensors forward keeps: "experts" recomputes the expert FFNs, "layer" also each block's attention
half and its dense or shared FFN. The router, the split counts and the all-to-alls are never recomputed:
their results are kept, as large trainers do (a recomputed exchange would repeat the communication).

Sequence routing (``MoEConfig.granularity = "sequence"``): each segment of a forward is a sequence to the
router. A request keeps its prefill choice while it decodes: a segment starting at position 0 (a whole
prompt: the engine never chunks one under this routing) is routed on its mean and its per-sequence choice
(logits, probabilities, weights, ids, per MoE block) is stored in its cache slot (``KVCache.routes``); a
segment starting later (a decode token) reuses its slot's choice. A prompt chunk that starts later is
refused: its choice would be made on part of the prompt.

KV cache: one contiguous region per slot (``KVCache``), allocated once: a sequence's keys are one
slice that ``scaled_dot_product_attention`` reads without a gather during prefill, and decode gathers
the batch's slots once per layer. Paged blocks would cut memory lost to slots sized for the longest
sequence, but reading them needs a paged-attention kernel (or a gather per block) that PyTorch does not
ship; at the lengths this runtime serves, the waste is bounded and stated up front
(``KVCache.nbytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from runtime.config import MoEConfig, ParallelConfig, _fail, _positive_int
from runtime.experts import expert_ffn
from runtime.layer import MoELayer
from runtime.permute import to_device
from runtime.router import RouterOutput, Sequences
from runtime.weights import MoEWeights, init_weights

RECOMPUTE = ("none", "experts", "layer")  # what backward recomputes (module docstring)
QK_NORM = ("none", "head", "full")  # the RMSNorm on queries and keys before RoPE (module docstring)


@dataclass(frozen=True)
class DecoderConfig:
    """The decoder's shape; ``moe`` is every MoE block's (hidden, F, experts, top_k, activation, dtype)."""

    moe: MoEConfig
    layers: int = 1  # L blocks
    attention_heads: int = 1  # H query heads
    kv_heads: int = 1  # G key/value heads; H must be a multiple (grouped-query attention)
    head_dim: int = 0  # Dh; 0: hidden // attention_heads
    dense_layers: int = 0  # the first blocks with a dense FFN instead of the experts
    shared_experts: int = 0  # n: a dense FFN of width n·F beside the routed experts in MoE blocks
    shared_expert_gate: bool = False  # the shared output × sigmoid(x · w_gate_D) per token (Qwen2-MoE)
    vocab: int = 0  # 0: inputs and outputs are hidden states; > 0: embedding, LM head, greedy tokens
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-6
    qk_norm: str = "none"  # one of QK_NORM: "head" (Qwen3), "full" (OLMoE); its eps is norm_eps

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in ("layers", "attention_heads", "kv_heads"):
            _positive_int(name, field, getattr(self, field))
        if self.attention_heads % self.kv_heads:
            _fail(name, "kv_heads", self.kv_heads, f"a divisor of attention_heads ({self.attention_heads})")
        if self.head_dim == 0:
            if self.moe.hidden_size % self.attention_heads:
                _fail(name, "head_dim", 0, f"a head size when hidden ({self.moe.hidden_size}) is not a multiple of "
                      f"attention_heads ({self.attention_heads})")  # fmt: skip
            object.__setattr__(self, "head_dim", self.moe.hidden_size // self.attention_heads)
        _positive_int(name, "head_dim", self.head_dim)
        if self.head_dim % 2:
            _fail(name, "head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        for field in ("dense_layers", "shared_experts", "vocab"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                _fail(name, field, value, "an integer >= 0")
        if self.dense_layers > self.layers:
            _fail(name, "dense_layers", self.dense_layers, f"at most layers ({self.layers})")
        if not isinstance(self.shared_expert_gate, bool):
            _fail(name, "shared_expert_gate", self.shared_expert_gate, "true or false")
        if self.shared_expert_gate and not self.shared_experts:
            _fail(name, "shared_expert_gate", True, "true only with shared_experts >= 1 (it gates their output)")
        if self.qk_norm not in QK_NORM:
            _fail(name, "qk_norm", self.qk_norm, f"one of {', '.join(QK_NORM)}")

    @property
    def hidden(self) -> int:
        return self.moe.hidden_size

    def kv_cache_bytes_per_token(self) -> int:
        """2 (K and V) × layers × kv_heads × head_dim × bytes per element."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.moe.torch_dtype.itemsize

    def is_moe(self, layer: int) -> bool:
        return layer >= self.dense_layers


# -------------------------------------------------------------------------------------------
# Global weights (every rank builds the same ones from the seed; the fp64 reference reads them too)


@dataclass(frozen=True)
class FFNWeights:
    """A bias-free FFN, the experts' formula with one expert: w_in_DH ([gate | up] for swiglu), w_down_FD."""

    w_in_DH: torch.Tensor
    w_down_FD: torch.Tensor


@dataclass(frozen=True)
class BlockWeights:
    attn_norm_D: torch.Tensor  # RMSNorm scale before attention
    wq_DQ: torch.Tensor  # Q = H·Dh columns, head-major
    wk_DK: torch.Tensor  # K = G·Dh columns, head-major
    wv_DK: torch.Tensor
    wo_QD: torch.Tensor
    ffn_norm_D: torch.Tensor  # RMSNorm scale before the FFN
    moe: MoEWeights | None  # the routed experts; None in a dense block
    dense: FFNWeights | None  # the dense FFN of a dense block (width top_k·F); None in an MoE block
    shared: FFNWeights | None  # the shared experts of an MoE block (width n·F); None without
    shared_gate_D: torch.Tensor | None = None  # shared_expert_gate: the gate's weights; None without
    q_norm: torch.Tensor | None = None  # qk_norm's scale on q: [Dh] ("head"), [H·Dh] ("full"); None ("none")
    k_norm: torch.Tensor | None = None  # and on k: [Dh] ("head"), [G·Dh] ("full")


@dataclass(frozen=True)
class DecoderWeights:
    blocks: tuple[BlockWeights, ...]
    final_norm_D: torch.Tensor
    embed_VD: torch.Tensor | None = None  # vocab > 0
    head_VD: torch.Tensor | None = None  # vocab > 0: logits = rmsnorm(x) · head_VDᵀ


def _ffn_weights(gen: torch.Generator, d: int, width: int, activation: str) -> FFNWeights:
    h = 2 * width if activation == "swiglu" else width
    return FFNWeights(torch.randn(d, h, generator=gen) / d**0.5, torch.randn(width, d, generator=gen) / width**0.5)


def decoder_weights(cfg: DecoderConfig, seed: int = 0, moe: list[MoEWeights] | None = None) -> DecoderWeights:
    """Seeded fp32 weights on the CPU, std 1/√fan_in (norm scales 1 ± 0.1). ``moe``: the routed experts
    of each MoE block (e.g. with a calibrated routing skew); default ``init_weights`` seeded per block.
    The q/k norm scales (``qk_norm``) are drawn last, after every other weight: a seed gives every other
    weight the same values whatever ``qk_norm`` is."""
    gen = torch.Generator().manual_seed(seed)
    d, hq, hk = cfg.hidden, cfg.attention_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    f, act = cfg.moe.ffn_hidden_size, cfg.moe.activation
    moe_blocks = [l for l in range(cfg.layers) if cfg.is_moe(l)]
    if moe is not None and len(moe) != len(moe_blocks):
        raise ValueError(f"decoder_weights got {len(moe)} MoE weights: accepted one per MoE block ({len(moe_blocks)})")

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(d, generator=gen)

    blocks = []
    for l in range(cfg.layers):
        attn = (norm(), *(torch.randn(d, n, generator=gen) / d**0.5 for n in (hq, hk, hk)))
        wo = torch.randn(hq, d, generator=gen) / hq**0.5
        ffn_norm = norm()
        if cfg.is_moe(l):
            i = moe_blocks.index(l)
            routed = moe[i] if moe is not None else init_weights(cfg.moe, seed * 1000 + 17 + l)
            shared = _ffn_weights(gen, d, cfg.shared_experts * f, act) if cfg.shared_experts else None
            gate = torch.randn(d, generator=gen) / d**0.5 if cfg.shared_expert_gate else None
            blocks.append(BlockWeights(*attn, wo, ffn_norm, routed, None, shared, gate))
        else:
            blocks.append(BlockWeights(*attn, wo, ffn_norm, None, _ffn_weights(gen, d, cfg.moe.top_k * f, act), None))
    final = norm()
    embed = head = None
    if cfg.vocab:
        embed = torch.randn(cfg.vocab, d, generator=gen)
        head = torch.randn(cfg.vocab, d, generator=gen) / d**0.5
    if cfg.qk_norm != "none":
        q_width, k_width = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else (hq, hk)
        blocks = [
            replace(
                b,
                q_norm=1 + 0.1 * torch.randn(q_width, generator=gen),
                k_norm=1 + 0.1 * torch.randn(k_width, generator=gen),
            )
            for b in blocks
        ]
    return DecoderWeights(tuple(blocks), final, embed, head)


# -------------------------------------------------------------------------------------------
# The KV cache and a forward's batch


class KVCache:
    """Keys and values of ``slots`` sequences of up to ``max_len`` tokens, for every block, allocated
    once: k[l] and v[l] are [S, G, M, Dh]."""

    def __init__(self, cfg: DecoderConfig, slots: int, max_len: int, device=None):
        _positive_int(type(self).__name__, "slots", slots)
        _positive_int(type(self).__name__, "max_len", max_len)
        shape = (cfg.layers, slots, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=cfg.moe.torch_dtype, device=device)
        self.v = torch.zeros(shape, dtype=cfg.moe.torch_dtype, device=device)
        self.slots, self.max_len = slots, max_len
        # granularity "sequence": each slot's prefill choice per block (rows of blocks without experts unused)
        self.routes: list[RouterOutput] | None = None
        if cfg.moe.granularity == "sequence":
            e, k = cfg.moe.num_experts, cfg.moe.top_k
            self.routes = [
                RouterOutput(
                    torch.zeros(slots, e, device=device),
                    torch.zeros(slots, e, device=device),
                    torch.zeros(slots, k, device=device),
                    torch.zeros(slots, k, dtype=torch.long, device=device),
                )
                for _ in range(cfg.layers)
            ]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass(frozen=True)
class Segment:
    """One sequence's new tokens in a forward: ``length`` rows starting at context position ``start``,
    its keys kept in cache ``slot`` (None: no cache, the sequence is whole: start must be 0)."""

    start: int
    length: int
    slot: int | None = None


class Batch:
    """A forward's packed layout: its segments in row order, and what every block reuses (positions,
    RoPE angles, the rows of one-token segments, the decode mask)."""

    def __init__(self, segments: list[Segment], device, cfg: DecoderConfig):
        self.segments = segments
        starts, row = [], 0
        for s in segments:
            starts.append(row)
            row += s.length
        self.rows = starts  # each segment's first row
        self.num_tokens = row
        cached = [s.slot is not None for s in segments]
        if any(cached) and not all(cached):
            raise ValueError("Batch: either every segment has a cache slot or none has")
        if not any(cached) and any(s.start for s in segments):
            raise ValueError("Batch: a segment without a cache slot must start at 0 (a whole sequence)")
        self.cached = bool(segments) and all(cached)
        # one-token segments (decode steps) are attended together; the others one at a time
        self.single = [i for i, s in enumerate(segments) if s.length == 1 and self.cached]
        self.multi = sorted(set(range(len(segments))) - set(self.single))
        singles = [segments[i] for i in self.single]
        # every index the step needs, built on the host and copied to the device in one piece
        pos = [p for s in segments for p in range(s.start, s.start + s.length)]
        slots = [s.slot for s in segments for _ in range(s.length)] if self.cached else []
        single_rows = [starts[i] for i in self.single]
        ends = [s.start + 1 for s in singles]
        packed = torch.tensor(pos + slots + single_rows + [s.slot for s in singles] + ends, dtype=torch.long)
        packed = packed.to(device)  # sync: on CUDA a copy from pageable host memory waits for the stream (once a step)
        pos_T, slot_T, rows_B, slots_B, ends_B = packed.split([len(pos), len(slots), *[len(singles)] * 3])
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device) / cfg.head_dim)
        angles_TR = pos_T.float()[:, None] * inv_freq[None, :]  # R = Dh/2 rotation frequencies
        dtype = cfg.moe.torch_dtype
        self.cos_T1R = angles_TR.cos()[:, None, :].to(dtype)
        self.sin_T1R = angles_TR.sin()[:, None, :].to(dtype)
        if self.single:
            self.single_rows_B, self.single_slots_B = rows_B, slots_B
            self.single_context = context = max(ends)
            self.single_mask_B11C = (torch.arange(context, device=device)[None, :] < ends_B[:, None])[:, None, None]
        if self.cached:
            self.slot_T, self.pos_T = slot_T, pos_T


def rms_norm(x_TD: torch.Tensor, scale_D: torch.Tensor, eps: float) -> torch.Tensor:
    """x / √(mean(x²) + eps) · scale, computed in fp32."""
    x = x_TD.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale_D.float()).to(x_TD.dtype)


def rope(x_THd: torch.Tensor, cos_T1R: torch.Tensor, sin_T1R: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: pairs (i, i + Dh/2) turned by position · θ^(−2i/Dh)."""
    x1, x2 = x_THd.chunk(2, dim=-1)
    return torch.cat((x1 * cos_T1R - x2 * sin_T1R, x2 * cos_T1R + x1 * sin_T1R), dim=-1)


# -------------------------------------------------------------------------------------------
# Blocks


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig, w: BlockWeights, device):
        super().__init__()
        dtype = cfg.moe.torch_dtype
        self.cfg = cfg
        self.grouped = cfg.kv_heads < cfg.attention_heads  # enable_gqa only then: it may narrow SDPA's kernels
        self.wq_DQ, self.wk_DK, self.wv_DK, self.wo_QD = (
            nn.Parameter(t.to(device, dtype).clone()) for t in (w.wq_DQ, w.wk_DK, w.wv_DK, w.wo_QD)
        )
        self.q_norm = self.k_norm = None  # [Dh] ("head") or [H·Dh], [G·Dh] ("full"), fp32 as the other norms
        if cfg.qk_norm != "none":
            if w.q_norm is None or w.k_norm is None:
                raise ValueError(
                    f'MoEDecoder: qk_norm = "{cfg.qk_norm}" needs q_norm and k_norm in every block\'s weights'
                )
            self.q_norm = nn.Parameter(w.q_norm.to(device).clone())
            self.k_norm = nn.Parameter(w.k_norm.to(device).clone())

    def _heads(self, x_TX: torch.Tensor, heads: int, scale: torch.Tensor | None) -> torch.Tensor:
        """A projection [T, heads·Dh] as [T, heads, Dh], with qk_norm's RMSNorm (before RoPE)."""
        cfg = self.cfg
        if cfg.qk_norm == "full":
            x_TX = rms_norm(x_TX, scale, cfg.norm_eps)
        x_Thd = x_TX.view(x_TX.shape[0], heads, cfg.head_dim)
        return rms_norm(x_Thd, scale, cfg.norm_eps) if cfg.qk_norm == "head" else x_Thd

    def forward(self, x_TD: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int) -> torch.Tensor:
        cfg, T = self.cfg, x_TD.shape[0]
        q_THd = rope(self._heads(x_TD @ self.wq_DQ, cfg.attention_heads, self.q_norm), batch.cos_T1R, batch.sin_T1R)
        k_TGd = rope(self._heads(x_TD @ self.wk_DK, cfg.kv_heads, self.k_norm), batch.cos_T1R, batch.sin_T1R)
        v_TGd = (x_TD @ self.wv_DK).view(T, cfg.kv_heads, cfg.head_dim)
        o_THd = torch.empty_like(q_THd)
        if batch.cached:  # this forward's keys join the context first: each attends to its own
            k_SGMd, v_SGMd = cache.k[layer], cache.v[layer]
            k_SGMd[batch.slot_T, :, batch.pos_T] = k_TGd
            v_SGMd[batch.slot_T, :, batch.pos_T] = v_TGd
        if batch.single:  # one-token segments, together: their slots gathered, padded, masked
            rows_B, c = batch.single_rows_B, batch.single_context
            q_BH1d = q_THd[rows_B].unsqueeze(2)
            k_BGCd = k_SGMd[batch.single_slots_B, :, :c]
            v_BGCd = v_SGMd[batch.single_slots_B, :, :c]
            o_BH1d = F.scaled_dot_product_attention(
                q_BH1d, k_BGCd, v_BGCd, attn_mask=batch.single_mask_B11C, enable_gqa=self.grouped
            )
            o_THd[rows_B] = o_BH1d.squeeze(2)
        for i in batch.multi:
            seg, r = batch.segments[i], batch.rows[i]
            q_1HNd = q_THd[r : r + seg.length].transpose(0, 1).unsqueeze(0)
            if seg.start == 0:  # the whole context is new: plain causal attention over it
                k_1GCd = k_TGd[r : r + seg.length].transpose(0, 1).unsqueeze(0)
                v_1GCd = v_TGd[r : r + seg.length].transpose(0, 1).unsqueeze(0)
                o_1HNd = F.scaled_dot_product_attention(q_1HNd, k_1GCd, v_1GCd, is_causal=True, enable_gqa=self.grouped)
            else:  # a later chunk of a prompt: the cached context, then its own tokens causally
                c = seg.start + seg.length
                k_1GCd, v_1GCd = k_SGMd[seg.slot, :, :c].unsqueeze(0), v_SGMd[seg.slot, :, :c].unsqueeze(0)
                pos_N = torch.arange(seg.start, c, device=x_TD.device)
                mask_NC = torch.arange(c, device=x_TD.device)[None, :] <= pos_N[:, None]
                o_1HNd = F.scaled_dot_product_attention(
                    q_1HNd, k_1GCd, v_1GCd, attn_mask=mask_NC, enable_gqa=self.grouped
                )
            o_THd[r : r + seg.length] = o_1HNd.squeeze(0).transpose(0, 1)
        return o_THd.reshape(T, cfg.attention_heads * cfg.head_dim) @ self.wo_QD


class DenseFFN(nn.Module):
    """A bias-free FFN with the experts' formula (runtime/experts.py), one expert over every token."""

    def __init__(self, w: FFNWeights, activation: str, dtype: torch.dtype, device):
        super().__init__()
        self.activation = activation
        self.w_in_1DH = nn.Parameter(w.w_in_DH[None].to(device, dtype).clone())
        self.w_down_1FD = nn.Parameter(w.w_down_FD[None].to(device, dtype).clone())

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if x_TD.shape[0] == 0:
            return torch.zeros_like(x_TD)
        return expert_ffn(x_TD, self.w_in_1DH, self.w_down_1FD, [x_TD.shape[0]], self.activation, "loop")


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig, w: BlockWeights, par: ParallelConfig, group, device,
                 recompute: str = "none", balance_group=None, placement=None):  # fmt: skip
        super().__init__()
        self.cfg, self.recompute = cfg, recompute
        dtype, act = cfg.moe.torch_dtype, cfg.moe.activation
        self.attn_norm_D = nn.Parameter(w.attn_norm_D.to(device).clone())
        self.ffn_norm_D = nn.Parameter(w.ffn_norm_D.to(device).clone())
        self.attn = Attention(cfg, w, device)
        self.moe = self.dense = self.shared = self.shared_gate_D = None
        if w.moe is not None:
            ep_group = group if par.ep_size > 1 else None
            self.moe = MoELayer(cfg.moe, par, group=ep_group, device=device, recompute_experts=recompute != "none",
                                balance_group=balance_group, placement=placement)  # fmt: skip
            self.moe.load_global_weights(w.moe)
            self.shared = None if w.shared is None else DenseFFN(w.shared, act, dtype, device)
            if cfg.shared_expert_gate:
                self.shared_gate_D = nn.Parameter(w.shared_gate_D.to(device, torch.float32).clone())
        else:
            self.dense = DenseFFN(w.dense, act, dtype, device)

    def _attend(self, x_TD: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int):
        """The attention half and the FFN's norm: h = x + attn(rmsnorm(x)), and rmsnorm(h)."""
        eps = self.cfg.norm_eps
        h_TD = x_TD + self.attn(rms_norm(x_TD, self.attn_norm_D, eps), batch, cache, layer)
        return h_TD, rms_norm(h_TD, self.ffn_norm_D, eps)

    def forward(self, x_TD: torch.Tensor, batch: Batch, cache: KVCache | None, layer: int):
        """The block's output, and the MoE layer's ``MoEOutput`` (None in a dense block). With sequence
        routing the segments are the router's sequences, a decode token taking its slot's kept choice."""
        again = self.recompute == "layer" and torch.is_grad_enabled()  # backward recomputes all but the MoE exchange

        def run(fn, *args):
            return checkpoint(fn, *args, use_reentrant=False) if again else fn(*args)

        h_TD, n_TD = run(self._attend, x_TD, batch, cache, layer)
        if self.dense is not None:
            return h_TD + run(self.dense, n_TD), None
        seqs = self._sequences(batch, cache, layer) if self.cfg.moe.granularity == "sequence" else None
        routed = self.moe(n_TD, seqs)  # every rank of the EP group calls it, with or without rows; never recomputed
        if seqs is not None and batch.cached:
            self._keep_choices(batch, cache, layer, routed.sequence_routing)
        y_TD = routed.out_TD.to(h_TD.dtype)
        if self.shared is not None:
            shared_TD = run(self.shared, n_TD)
            if self.shared_gate_D is not None:  # Qwen2-MoE: a per-token sigmoid gate, computed in fp32
                shared_TD = shared_TD * torch.sigmoid(n_TD.float() @ self.shared_gate_D)[:, None].to(shared_TD.dtype)
            y_TD = y_TD + shared_TD
        return h_TD + y_TD, routed

    @staticmethod
    def _sequences(batch: Batch, cache: KVCache | None, layer: int) -> Sequences:
        """The router's sequences: each segment; a cached one starting past 0 reuses its slot's choice."""
        lengths = tuple(s.length for s in batch.segments)
        if not batch.cached:
            return Sequences(lengths)
        for s in batch.segments:
            if s.start > 0 and s.length > 1:
                raise ValueError(
                    f"sequence routing: a prompt chunk at position {s.start} is refused: accepted whole prompts "
                    "(the choice is made on the prompt's mean) and one-token decode steps"
                )
        reuse = tuple(s.start > 0 for s in batch.segments)
        slots = to_device(torch.tensor([s.slot for s in batch.segments], dtype=torch.long), cache.k.device)
        kept = cache.routes[layer]
        kept = RouterOutput(kept.logits_TE[slots], kept.probs_TE[slots], kept.weights_TK[slots], kept.ids_TK[slots])
        return Sequences(lengths, kept, reuse)

    @staticmethod
    def _keep_choices(batch: Batch, cache: KVCache, layer: int, routing_B: RouterOutput) -> None:
        """Store each prefilled segment's choice in its slot, for its decode steps."""
        new = [b for b, s in enumerate(batch.segments) if s.start == 0]
        if not new:
            return
        rows = to_device(torch.tensor(new, dtype=torch.long), cache.k.device)
        slots = to_device(torch.tensor([batch.segments[b].slot for b in new], dtype=torch.long), cache.k.device)
        stored = cache.routes[layer]
        for kept, fresh in zip(
            (stored.logits_TE, stored.probs_TE, stored.weights_TK, stored.ids_TK),
            (routing_B.logits_TE, routing_B.probs_TE, routing_B.weights_TK, routing_B.ids_TK),
            strict=True,
        ):
            kept[slots] = fresh[rows].detach().to(kept.dtype)


class MoEDecoder(nn.Module):
    """One rank's part of the decoder (see the module docstring). ``par.ep_size`` > 1 needs ``group``
    (the EP group); ``par.ep_size`` = 1 holds every expert (one rank, or the data-parallel baseline).

    Training choices, at construction: ``recompute`` (one of ``RECOMPUTE``), and ``dp_group``: the
    data-parallel ranks (ep_size = 1) whose gradients ``reduce_grads`` sums and whose batches the router
    losses are taken over (global-batch balancing, as EP's group-wide losses).

    ``placements``: one ``runtime.eplb.Placement`` per MoE block (in block order), for re-placement (EPLB):
    each block's ``MoELayer(placement=...)``; ``moe_layers`` lists those layers for ``set_placement``."""

    def __init__(self, cfg: DecoderConfig, weights: DecoderWeights, par: ParallelConfig | None = None,
                 group=None, device=None, *, recompute: str = "none", dp_group=None,
                 placements=None):  # fmt: skip
        super().__init__()
        par = par if par is not None else ParallelConfig()
        if recompute not in RECOMPUTE:
            raise ValueError(f"MoEDecoder recompute = {recompute!r} is invalid: accepted one of {', '.join(RECOMPUTE)}")
        if dp_group is not None and par.ep_size > 1:
            raise ValueError(f"MoEDecoder dp_group with ep_size = {par.ep_size} is refused: accepted at ep_size = 1")
        self.ep_group = group if par.ep_size > 1 else None
        self.dp_group = dp_group
        if len(weights.blocks) != cfg.layers:
            raise ValueError(f"MoEDecoder got {len(weights.blocks)} blocks of weights: accepted layers ({cfg.layers})")
        if (weights.embed_VD is None) != (cfg.vocab == 0):
            raise ValueError(f"MoEDecoder: vocab = {cfg.vocab} needs embedding weights exactly when vocab > 0")
        self.cfg, self.device = cfg, torch.device(device) if device is not None else torch.device("cpu")
        moe_blocks = [i for i, w in enumerate(weights.blocks) if w.moe is not None]
        if placements is not None and len(placements) != len(moe_blocks):
            want = len(moe_blocks)
            raise ValueError(f"MoEDecoder got {len(placements)} placements: accepted one per MoE block ({want})")
        placed = dict(zip(moe_blocks, placements, strict=True)) if placements is not None else {}
        self.blocks = nn.ModuleList(
            Block(cfg, w, par, group, device, recompute, dp_group, placed.get(i)) for i, w in enumerate(weights.blocks)
        )
        self.final_norm_D = nn.Parameter(weights.final_norm_D.to(device).clone())
        dtype = cfg.moe.torch_dtype
        self.embed_VD = self.head_VD = None
        if cfg.vocab:
            self.embed_VD = nn.Parameter(weights.embed_VD.to(device, dtype).clone())
            self.head_VD = nn.Parameter(weights.head_VD.to(device, dtype).clone())

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> [T, D] (vocab > 0); hidden states [T, D] pass through, in the model's dtype."""
        if self.cfg.vocab:
            return self.embed_VD[inputs]
        return inputs.to(self.device, self.cfg.moe.torch_dtype)

    def forward(self, inputs: torch.Tensor, batch: Batch, cache: KVCache | None = None):
        """The output hidden states [T, D] (after the final norm) of the batch's packed tokens, and each
        MoE block's ``MoEOutput``. ``inputs``: token ids [T] (vocab > 0) or hidden states [T, D]."""
        if batch.cached and cache is None:
            raise ValueError("MoEDecoder.forward: the batch's segments have cache slots but no cache was given")
        x_TD = self.embed(inputs)
        routed = []
        for l, block in enumerate(self.blocks):
            x_TD, out = block(x_TD, batch, cache, l)
            if out is not None:
                routed.append(out)
        return rms_norm(x_TD, self.final_norm_D, self.cfg.norm_eps), routed

    @property
    def moe_layers(self) -> list[MoELayer]:
        """The MoE blocks' layers, in block order."""
        return [block.moe for block in self.blocks if block.moe is not None]

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts this rank holds: sharded over the EP group, complete after backward."""
        return [p for block in self.blocks if block.moe is not None for p in block.moe.experts.parameters()]

    def expert_grad_square_sum(self, zero: torch.Tensor) -> torch.Tensor:
        """Σ grad² over this rank's expert slots in fp64, a slot counted 1/copies of its expert (copies on several
        ranks hold the same summed gradient, ``reduce_copy_grads``), so the group's sum counts each expert once."""
        total = zero
        for layer in self.moe_layers:
            share_L = layer.copy_share_L().to(zero.device)  # host to device: synchronous on CUDA (once per step)
            for p in layer.experts.parameters():
                if p.grad is not None:
                    total = total + (p.grad.detach().double().square().flatten(1).sum(1) * share_L).sum()
        return total

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Every other parameter: each rank of the EP group holds a copy and sees only its own tokens."""
        sharded = {id(p) for p in self.expert_parameters()}
        return [p for p in self.parameters() if id(p) not in sharded]

    def reduce_grads(self) -> None:
        """Sum gradients where ranks hold copies: the replicated parameters over the EP group, every
        parameter over the data-parallel group. One flat all-reduce per group (a bucket, as DDP's)."""
        for group, params in ((self.ep_group, self.replicated_parameters()), (self.dp_group, list(self.parameters()))):
            grads = [p.grad for p in params if p.grad is not None]
            if group is None or not grads:
                continue
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            for g, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                g.copy_(part.view_as(g))
        for layer in self.moe_layers:  # copies of an expert on several ranks (placements with spare slots)
            layer.reduce_copy_grads()

    def logits(self, h_TD: torch.Tensor) -> torch.Tensor:
        """The LM head over output hidden states (vocab > 0)."""
        return h_TD @ self.head_VD.T

    def full(self, inputs: torch.Tensor) -> torch.Tensor:
        """A bare causal forward of one whole sequence, no cache: the output hidden states [N, D]."""
        n = inputs.shape[0]
        return self.forward(inputs, Batch([Segment(0, n)] if n else [], self.device, self.cfg))[0]


def max_context(input_len: int, output_len: int) -> int:
    """Cache positions a request uses: its prompt, then every output token but the last fed back."""
    return input_len + max(output_len - 1, 0)


__all__ = [
    "QK_NORM",
    "RECOMPUTE",
    "Batch",
    "BlockWeights",
    "DecoderConfig",
    "DecoderWeights",
    "FFNWeights",
    "KVCache",
    "MoEDecoder",
    "Segment",
    "decoder_weights",
    "max_context",
    "rms_norm",
    "rope",
]
