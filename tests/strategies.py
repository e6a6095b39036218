"""Hypothesis strategies and independent helpers shared by the property tests."""

from __future__ import annotations

import math

import torch
from hypothesis import settings
from hypothesis import strategies as st

FAST = settings(max_examples=60, deadline=None)

# ---------------------------------------------------------------------------------------------
# Strategies and independent helpers


@st.composite
def logits_TE(draw, min_tokens: int = 1, max_tokens: int = 10, max_experts: int = 8) -> torch.Tensor:
    """fp32 logits [T, E], values drawn by hypothesis (ties and extremes included)."""
    num_tokens = draw(st.integers(min_tokens, max_tokens))
    num_experts = draw(st.integers(1, max_experts))
    values = draw(
        st.lists(
            st.floats(-30, 30, allow_nan=False, width=32),
            min_size=num_tokens * num_experts,
            max_size=num_tokens * num_experts,
        )
    )
    return torch.tensor(values, dtype=torch.float32).reshape(num_tokens, num_experts)


@st.composite
def choices_TK(draw, num_experts: int, top_k: int, max_tokens: int = 10) -> torch.Tensor:
    """Expert ids [T, K], each row K distinct experts (what ``route`` guarantees)."""
    num_tokens = draw(st.integers(0, max_tokens))
    rows = [list(draw(st.permutations(range(num_experts))))[:top_k] for _ in range(num_tokens)]
    return torch.tensor(rows, dtype=torch.long).reshape(num_tokens, top_k)


def first_copies_kept(ids_TK: torch.Tensor, budget_E: list[int]) -> list[list[bool]]:
    """Plain-loop keep rule: walk copies in token order, keep while the expert has budget."""
    used = [0] * len(budget_E)
    mask = []
    for row in ids_TK.tolist():
        kept_row = []
        for e in row:
            kept_row.append(used[e] < budget_E[e])
            used[e] += kept_row[-1]
        mask.append(kept_row)
    return mask


def bincount_E(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(ids_TK.reshape(-1), minlength=num_experts)


def ffn_rows_fp64(x_RD, w_in_LDH, w_down_LFD, counts: list[int], activation: str, run_experts=None) -> torch.Tensor:
    """One row at a time in fp64: row i goes through the expert whose run contains it (run j is
    expert j, or ``run_experts[j]`` when given)."""
    expert_of_run = run_experts if run_experts is not None else range(len(counts))
    expert_of_row = [l for l, c in zip(expert_of_run, counts, strict=True) for _ in range(c)]
    ffn = w_down_LFD.shape[1]
    rows = []
    for i, l in enumerate(expert_of_row):
        h = x_RD[i].double() @ w_in_LDH[l].double()
        if activation == "swiglu":
            gate, up = h[:ffn], h[ffn:]
            a = gate * torch.sigmoid(gate) * up
        else:
            a = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
        rows.append(a @ w_down_LFD[l].double())
    return torch.stack(rows) if rows else torch.zeros(0, x_RD.shape[1], dtype=torch.float64)


def expert_weights(num_local: int, activation: str, seed: int, hidden: int = 8, ffn: int = 4):
    """Random expert weights; D and F are multiples of 4 so grouped_mm's 16-byte strides hold."""
    gen = torch.Generator().manual_seed(seed)
    width = 2 * ffn if activation == "swiglu" else ffn
    w_in_LDH = torch.randn(num_local, hidden, width, generator=gen) / hidden**0.5
    w_down_LFD = torch.randn(num_local, ffn, hidden, generator=gen) / ffn**0.5
    return w_in_LDH, w_down_LFD
