"""Plain loop-over-experts code computing what the runtime's experts and layer compute: the floors
the runtime is timed against (the ``experts`` kind, ``moebench.tools.serial_path``).

Shape legend: E = experts, R = dispatched rows (expert-major), T = tokens, K = top_k, D = hidden,
F = FFN hidden, H = F (gelu) or 2F (swiglu: gate then up, as ``runtime/experts.py`` lays them out).

Both take the runtime's stacked weights (``w_in_EDH``, ``w_down_EFD``) and transpose them once, when
built, to ``nn.Linear``'s [out, in] layout, so the timed call is only what a user's plain PyTorch
module would run: per expert, ``F.linear`` calls on its rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def linear_weights(w_in_EDH: torch.Tensor, w_down_EFD: torch.Tensor, activation: str) -> list[tuple]:
    """Per expert, its weights as ``nn.Linear`` holds them: swiglu (gate [F, D], up [F, D], down [D, F]),
    gelu (W1 [F, D], down [D, F]). Gate is the first F columns of ``w_in``, up the last F."""
    ffn = w_down_EFD.shape[1]
    out = []
    for w_in_DH, w_down_FD in zip(w_in_EDH.detach().unbind(0), w_down_EFD.detach().unbind(0), strict=True):
        down_DF = w_down_FD.t().contiguous()
        if activation == "swiglu":
            out.append((w_in_DH[:, :ffn].t().contiguous(), w_in_DH[:, ffn:].t().contiguous(), down_DF))
        else:
            out.append((w_in_DH.t().contiguous(), down_DF))
    return out


def expert_mlp(x_ND: torch.Tensor, weights: tuple, activation: str) -> torch.Tensor:
    """One expert on its rows: swiglu ``down(silu(gate x) ⊙ up x)``, gelu ``down(gelu(W1 x))``."""
    if activation == "swiglu":
        gate_FD, up_FD, down_DF = weights
        return F.linear(F.silu(F.linear(x_ND, gate_FD)) * F.linear(x_ND, up_FD), down_DF)
    w1_FD, down_DF = weights
    return F.linear(F.gelu(F.linear(x_ND, w1_FD)), down_DF)


def loop_floor(x_RD, w_in_EDH, w_down_EFD, counts: list[int], activation: str) -> Callable[[], torch.Tensor]:
    """The plain per-expert loop of ``F.linear`` calls on ``x_RD`` (expert e's ``counts[e]`` rows in
    a row), outputs concatenated in row order: ``runtime.experts.expert_ffn``'s function. The
    weights are transposed here, once; the returned function is what is timed."""
    experts = linear_weights(w_in_EDH, w_down_EFD, activation)

    def run() -> torch.Tensor:
        chunks = torch.split(x_RD, counts)
        return torch.cat([expert_mlp(x_ND, w, activation) for x_ND, w in zip(chunks, experts, strict=True)])

    return run


def mixtral_block(
    gate_ED: torch.Tensor, w_in_EDH, w_down_EFD, activation: str, top_k: int, normalize: bool
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A widely used loop-over-experts MoE block (Hugging Face ``MixtralSparseMoeBlock``'s pattern)
    on the runtime's weights: fp32 softmax router and top-k (renormalised when ``normalize``, as the
    runtime's ``normalize_topk``), a one-hot expert mask, per expert ``torch.where`` for its tokens,
    their rows gathered through the expert's ``F.linear`` FFN, scaled by the routing weight and
    ``index_add_``-ed into the output. Dropless; the same function as a dropless ``MoELayer``."""
    gate_ED = gate_ED.detach()
    experts = linear_weights(w_in_EDH, w_down_EFD, activation)
    num_experts, hidden = len(experts), gate_ED.shape[1]

    def block(x_TD: torch.Tensor) -> torch.Tensor:
        probs_TE = F.softmax(F.linear(x_TD.float(), gate_ED), dim=1, dtype=torch.float)
        weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
        if normalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK.to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = F.one_hot(ids_TK, num_classes=num_experts).permute(2, 1, 0)
        for e in range(num_experts):
            k_N, t_N = torch.where(mask_EKT[e])
            y_ND = expert_mlp(x_TD[None, t_N].reshape(-1, hidden), experts[e], activation)
            out_TD.index_add_(0, t_N, (y_ND * weights_TK[t_N, k_N, None]).to(x_TD.dtype))
        return out_TD

    return block
