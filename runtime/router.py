"""Top-k router: gating (softmax and the variants real models use), capacity, token dropping and the
auxiliary losses.

Shape legend: T = tokens on this rank, N = tokens over the whole EP group, E = experts,
K = top_k, W = EP group size, D = hidden size, B = sequences on this rank.

Everything but ``Router`` is a pure function of tensors, so it can be property-tested.

Capacity and dropping policy (the same in ``runtime/reference.py``)
  capacity C = ceil(capacity_factor · N · K / E), with N the tokens of the *whole EP group*,
  so the result does not depend on how the batch is split over ranks. An expert keeps at most
  C token copies: copies are ranked by global token index (rank 0's tokens first, then rank
  1's, ...; within a rank, by position) and the first C are kept. A dropped copy is not sent
  anywhere and its combine weight is 0; the token's other copies keep their weights (no
  renormalisation), so a token whose every copy is dropped leaves the layer as zeros and only
  the residual connection around the layer carries it. capacity_factor = 0 means dropless.

Sequence routing (``MoEConfig.granularity = "sequence"``; ``route_sequences``)
  The router sees one row per sequence, the mean of its tokens' hidden states, and each token of the
  sequence takes that row's logits, probabilities, ids and weights (per-sample routing, as the
  task- and sentence-level routing of Kudugunta et al. 2021). Capacity and dropping are unchanged:
  they count token copies. The losses are the token formulas over those per-token rows, so each
  sequence's row counts once per token: aux = E · Σ_e f_e · P_e with f_e the token copies to e over
  N·K and P_e = Σ_b (L_b / N) p_{b,e}; z = Σ_b (L_b / N) lse_b². With sequences of one length (every
  kind but serve, whose prompts vary) that is exactly the loss over one row per sequence.

Router variants (``gate``; MoEConfig fields, each in ``runtime/reference.py`` written again)
  scoring "sigmoid"      scores s = sigmoid(logits) (DeepSeek-V3), not softmax(logits). The losses' row
                         p = s / Σ_e s_e, the normalised scores of DeepSeek-V3's sequence-wise balance loss;
                         the z-loss stays logsumexp(logits)².
  topk_before_softmax    Mixtral's order: the top-k of the logits, weights = softmax over those K logits
                         (they sum to 1 whatever normalize_topk), equal to softmax-then-top-k renormalised.
  group_limited (G, M)   DeepSeek-V3: the E experts in G contiguous groups of E/G; a group's score is the sum of
                         its two best choice scores; a token keeps its M best groups and takes its top-k among
                         their experts (ties: the lower group, then the lower expert).
  score_bias             DeepSeek-V3's aux-loss-free balancing: choice score = s + b_E (b: the router's
                         ``score_bias_E``), used for the groups and the top-k; the weights use s, unbiased.
  score_bias_update γ    DeepSeek-V3's online update of b in training (``score_bias_step``): after each optimizer
                         step, b_e += γ · sign(mean(load) − load_e), the loads the step's global per-expert counts.
  routed_scaling         every chosen weight × the factor, after any renormalisation (DeepSeek-V3's
                         routed_scaling_factor), so the routed output is scaled by it.
  The K ids are listed in descending choice score (ties to the lower id); the weights follow their ids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import MoEConfig
from runtime.permute import to_device


def route(logits_TE: torch.Tensor, top_k: int, normalize: bool) -> tuple[torch.Tensor, ...]:
    """Softmax gating with top-k selection.

    Returns ``probs_TE`` (softmax over all experts, fp32), ``weights_TK`` and ``ids_TK``.
    The K ids of a token are distinct, in descending probability, ties to the lower id. ``weights_TK`` are the softmax
    probabilities of the chosen experts, divided by their sum when ``normalize`` is set.
    """
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    # A stable descending sort, not topk: equal probabilities (a zero router, padding tokens)
    # must go to the lower expert id, as in the reference; topk breaks ties arbitrarily.
    sorted_TE, order_TE = torch.sort(probs_TE, dim=-1, descending=True, stable=True)
    weights_TK, ids_TK = sorted_TE[:, :top_k], order_TE[:, :top_k]
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return probs_TE, weights_TK, ids_TK


def gate(logits_TE: torch.Tensor, moe: MoEConfig, score_bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """``route`` with the router variants of ``moe`` (module docstring): ``probs_TE`` (the losses' row),
    ``weights_TK`` and ``ids_TK``. The plain config goes through ``route`` itself."""
    k = moe.top_k
    logits_TE = logits_TE.float()
    if moe.plain_routing:
        return route(logits_TE, k, moe.normalize_topk)
    if moe.topk_before_softmax:
        probs_TE = torch.softmax(logits_TE, dim=-1)
        sorted_TE, order_TE = torch.sort(logits_TE, dim=-1, descending=True, stable=True)
        weights_TK, ids_TK = torch.softmax(sorted_TE[:, :k], dim=-1), order_TE[:, :k]
    else:
        if moe.scoring == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        else:
            scores_TE = probs_TE = torch.softmax(logits_TE, dim=-1)
        choice_TE = scores_TE if score_bias_E is None else scores_TE + score_bias_E
        if moe.group_limited is not None:
            choice_TE = _best_groups(choice_TE, *moe.group_limited)
        ids_TK = torch.sort(choice_TE, dim=-1, descending=True, stable=True).indices[:, :k]
        weights_TK = scores_TE.gather(1, ids_TK)
        if moe.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    if moe.routed_scaling != 1:
        weights_TK = weights_TK * moe.routed_scaling
    return probs_TE, weights_TK, ids_TK


def _best_groups(choice_TE: torch.Tensor, n_groups: int, top_groups: int) -> torch.Tensor:
    """The choice scores with every expert outside the token's ``top_groups`` best groups at −inf; a
    group's score is the sum of its two best choice scores (stable: ties to the lower group)."""
    t, e = choice_TE.shape
    size = e // n_groups
    best2_TG = torch.topk(choice_TE.view(t, n_groups, size), 2, dim=-1).values.sum(dim=-1)  # values only: no ties
    kept_TM = torch.sort(best2_TG, dim=-1, descending=True, stable=True).indices[:, :top_groups]
    kept_TG = torch.zeros_like(best2_TG, dtype=torch.bool).scatter_(1, kept_TM, True)
    return choice_TE.masked_fill(~kept_TG.repeat_interleave(size, dim=1), float("-inf"))


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int | None:
    """C = ceil(capacity_factor · num_tokens · top_k / num_experts); None when dropless (cf = 0)."""
    if capacity_factor == 0:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def kept_counts(counts_WE: torch.Tensor, capacity: int | None) -> torch.Tensor:
    """Copies each rank may send to each expert under capacity ``C``, ranks served in order.

    ``counts_WE[r, e]`` is how many copies rank r routes to expert e. Rank r keeps
    clamp(C − Σ_{r' < r} counts[r', e], 0, counts[r, e]).
    """
    if capacity is None:
        return counts_WE.clone()
    before_WE = torch.cumsum(counts_WE, dim=0) - counts_WE
    return (capacity - before_WE).clamp(min=0).minimum(counts_WE)


def keep_mask(ids_TK: torch.Tensor, budget_E: torch.Tensor) -> torch.Tensor:
    """True for the copies kept: the first ``budget_E[e]`` copies to expert e in token order."""
    flat_ids = ids_TK.reshape(-1)  # token-major, so position order is token order
    order = torch.sort(flat_ids, stable=True).indices
    counts_E = torch.bincount(flat_ids, minlength=budget_E.numel())
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_in_expert = torch.empty_like(flat_ids)
    rank_in_expert[order] = torch.arange(flat_ids.numel(), device=flat_ids.device) - starts_E[flat_ids[order]]
    return (rank_in_expert < budget_E[flat_ids]).reshape(ids_TK.shape)


def load_balancing_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """This rank's share of the Switch/GShard load-balancing loss over the EP group's batch.

        aux = E · Σ_e f_e · P_e,   f_e = count_e / (N · K),   P_e = (1/N) Σ_{t ≤ N} p_{t,e}

    ``counts_E`` are the group's copies per expert before dropping (no gradient); ``probs_TE``
    are this rank's tokens. The return value sums P over local tokens only, so the sum over ranks
    is the group's loss. Its minimum, 1, is reached by perfectly uniform routing.
    """
    num_experts = probs_TE.shape[-1]
    f_E = counts_E.to(probs_TE.dtype) / (num_tokens * top_k)
    p_E = probs_TE.sum(dim=0) / num_tokens
    return num_experts * torch.sum(f_E * p_E)


def score_bias_step(score_bias_E: torch.Tensor, loads_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """DeepSeek-V3's aux-loss-free balancing update (arXiv 2412.19437, §2.1.2): b_e − γ for an expert whose
    load is above the mean, b_e + γ below it, unchanged at it. ``loads_E``: the step's copies per expert over
    the global batch (host integers). The comparison is exact: sign(Σ_e' load_e' − E · load_e) in integers."""
    loads_E = loads_E.to(torch.long)
    sign_E = torch.sign(loads_E.sum() - loads_E.numel() * loads_E)
    return score_bias_E + gamma * sign_E.to(score_bias_E.device, score_bias_E.dtype)


def router_z_loss(logits_TE: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """This rank's share of the ST-MoE router z-loss: (1/N) Σ_t (log Σ_e exp(logit_{t,e}))²."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().sum() / num_tokens


@dataclass(frozen=True)
class RouterOutput:
    logits_TE: torch.Tensor  # fp32 router logits
    probs_TE: torch.Tensor  # fp32 softmax over experts (sigmoid scoring: the scores over their sum)
    weights_TK: torch.Tensor  # combine weight of each chosen expert (before dropping)
    ids_TK: torch.Tensor  # chosen expert ids, distinct per token


@dataclass(frozen=True)
class Sequences:
    """How a forward's rows split into sequences (granularity "sequence"), and choices made earlier.

    ``lengths``: rows of each sequence, in row order, summing to T. ``kept``: a routing with one row
    per sequence made by an earlier forward (serve's prefill), taken instead of the router's choice for
    the sequences whose ``reuse`` entry is True (a decode token keeps its request's prefill choice)."""

    lengths: tuple[int, ...]
    kept: RouterOutput | None = None  # B rows (rows of sequences not reused are ignored)
    reuse: tuple[bool, ...] | None = None  # per sequence; None = reuse none

    def __post_init__(self) -> None:
        lengths = tuple(self.lengths)
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
            raise ValueError(f"Sequences.lengths = {lengths!r} is invalid: accepted integers >= 1")
        object.__setattr__(self, "lengths", lengths)
        if (self.kept is None) != (self.reuse is None):
            raise ValueError("Sequences: kept and reuse go together: accepted both or neither")
        if self.reuse is not None:
            reuse = tuple(bool(r) for r in self.reuse)
            if len(reuse) != len(lengths) or self.kept.ids_TK.shape[0] != len(lengths):
                raise ValueError(f"Sequences: reuse and kept need one entry per sequence ({len(lengths)})")
            object.__setattr__(self, "reuse", reuse)


def cut_sequences(num_tokens: int, seq_len: int | None) -> tuple[int, ...]:
    """T rows as sequences of ``seq_len`` (None: one sequence of all T; T = 0: none)."""
    if num_tokens == 0:
        return ()
    if seq_len is None:
        return (num_tokens,)
    if num_tokens % seq_len:
        raise ValueError(
            f"MoEConfig.seq_len = {seq_len} does not divide the forward's {num_tokens} tokens: "
            "accepted a divisor of the tokens per rank"
        )
    return (seq_len,) * (num_tokens // seq_len)


def sequence_means(x_TD: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """Each sequence's mean row in fp32: [B, D]. The indexes are built on the host and copied without a sync."""
    lengths_host = torch.tensor(lengths, dtype=torch.long)
    lengths_B = to_device(lengths_host, x_TD.device)
    seq_T = to_device(torch.repeat_interleave(torch.arange(len(lengths)), lengths_host), x_TD.device)
    sums_BD = x_TD.new_zeros((len(lengths), x_TD.shape[1]), dtype=torch.float32).index_add(0, seq_T, x_TD.float())
    return sums_BD / lengths_B[:, None].float()


def per_token(routing_B: RouterOutput, lengths: tuple[int, ...]) -> RouterOutput:
    """Every token takes its sequence's row of each field: [B, ·] -> [T, ·]."""
    lengths_B = to_device(torch.tensor(lengths, dtype=torch.long), routing_B.ids_TK.device)
    total = sum(lengths)  # output_size: repeat_interleave would otherwise read the lengths back (a sync)
    return RouterOutput(*(t.repeat_interleave(lengths_B, dim=0, output_size=total) for t in _fields(routing_B)))


def _fields(routing: RouterOutput) -> tuple[torch.Tensor, ...]:
    return routing.logits_TE, routing.probs_TE, routing.weights_TK, routing.ids_TK


def route_sequences(router: nn.Module, x_TD: torch.Tensor, seqs: Sequences) -> tuple[RouterOutput, RouterOutput]:
    """Sequence routing: (per-token routing [T rows], per-sequence routing [B rows]). ``router`` is called
    on the sequences' means; a reused sequence takes its row of ``seqs.kept`` instead."""
    if sum(seqs.lengths) != x_TD.shape[0]:
        raise ValueError(f"Sequences.lengths sum to {sum(seqs.lengths)}: accepted the forward's {x_TD.shape[0]} rows")
    routing_B = router(sequence_means(x_TD, seqs.lengths))
    if seqs.reuse is not None and any(seqs.reuse):
        reuse_B = to_device(torch.tensor(seqs.reuse), x_TD.device)[:, None]
        routing_B = RouterOutput(
            *(
                torch.where(reuse_B, k.to(t.device), t)
                for k, t in zip(_fields(seqs.kept), _fields(routing_B), strict=True)
            )
        )
    return per_token(routing_B, seqs.lengths), routing_B


class Router(nn.Module):
    """A linear gate ``logits = x · W_gateᵀ + b`` in fp32, replicated on every rank.

    ``bias_E`` is a fixed (untrained) logit offset, zero by default; a benchmark sets it to give
    routing a chosen skew while the whole router still runs. ``moe`` (optional) turns on the router
    variants (``gate``); with ``moe.score_bias`` or ``moe.score_bias_update`` the router holds the choice
    bias ``score_bias_E`` (a buffer, not a parameter: zero until loaded from global weights, moved in training
    only by ``update_score_bias``).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool, moe: MoEConfig | None = None):
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        if moe is not None and (moe.num_experts, moe.top_k, moe.normalize_topk) != (num_experts, top_k, normalize):
            raise ValueError("Router: moe's num_experts, top_k and normalize_topk must match the arguments")
        self.moe = None if moe is None or moe.plain_routing else moe
        self.weight_ED = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("bias_E", torch.zeros(num_experts, dtype=torch.float32))
        if self.moe is not None and self.moe.has_score_bias:
            self.register_buffer("score_bias_E", torch.zeros(num_experts, dtype=torch.float32))

    @torch.no_grad()
    def update_score_bias(self, loads_E: torch.Tensor) -> None:
        """One ``score_bias_step`` with ``moe.score_bias_update`` from a step's global per-expert loads (no-op
        when the update is off). Every rank given the same loads holds the same bias after it."""
        if self.moe is None or self.moe.score_bias_update == 0:
            return
        self.score_bias_E.copy_(score_bias_step(self.score_bias_E, loads_E, self.moe.score_bias_update))

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = F.linear(x_TD.float(), self.weight_ED, self.bias_E)
        if self.moe is None:
            probs_TE, weights_TK, ids_TK = route(logits_TE, self.top_k, self.normalize)
        else:
            probs_TE, weights_TK, ids_TK = gate(logits_TE, self.moe, getattr(self, "score_bias_E", None))
        return RouterOutput(logits_TE, probs_TE, weights_TK, ids_TK)
