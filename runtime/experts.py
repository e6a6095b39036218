"""The experts a rank owns, computed grouped over an expert-major token layout.

Shape legend: L = local experts, R = rows (token copies) received, D = hidden,
F = FFN hidden, H = F (gelu) or 2F (swiglu: gate then up, fused into one matrix).

Each expert is a bias-free FFN:
  gelu:   y = gelu(x · W_in) · W_down                  W_in: [D, F]
  swiglu: y = (silu(x · W_in[:, :F]) ⊙ x · W_in[:, F:]) · W_down     W_in: [D, 2F]
with W_down: [F, D]. Rows arrive in runs of one local expert each: expert-major (run l is
expert l, ``tokens_per_expert`` long), or, for the loop backend, as the all-to-all delivered them
(one run per source rank and local expert, ``run_experts`` naming each run's expert: no reorder
of the rows before or after). Three interchangeable backends compute the two grouped GEMMs:
  grouped_mm  ``torch._grouped_mm`` (one kernel per GEMM; CUDA sm90+ and recent CPU builds)
  bmm         pad every expert's rows to the longest run, one ``torch.bmm``
  loop        one run at a time, its whole FFN: GEMM, activation, GEMM written in place into
              the output. An expert's hidden rows stay in cache between its two GEMMs and no
              [R, H] intermediate is built or concatenated (under autograd the experts'
              outputs are concatenated once); at the seed shape on one CPU thread
              this is 4 % over the bare GEMMs where GEMM-all-then-activate-all cost 28 %.
A fourth, ``rowwise``, is for checks, not speed: every row alone through both GEMMs (M = 1), so a row's
result never depends on the rows that share its expert's run (batch invariance, by construction; the
other backends' GEMM kernels can round a row differently when the run's length changes: measured on
this CPU for runs under 12 rows). ``MoELayer.set_schedule(expert_backend=...)`` switches to it.
"auto" picks grouped_mm on CUDA devices that support it and loop elsewhere; the measurements
behind that choice are in the README (``python -m moebench.tools.bench_experts``).

``Experts`` is what the layer calls on its experts, whichever it holds: resident
(``GroupedExperts``, here), offloaded to host memory (``OffloadedExperts``, runtime/offload.py) or
with replicas of the busiest experts (``ReplicatedExperts``, runtime/redundancy.py). The layer
picks one at construction (``MoELayer``'s ``offload`` and ``redundancy`` arguments).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

GROUPED_MM_ALIGN = 16  # bytes: torch._grouped_mm (CPU and CUDA) needs every matrix row a multiple of this


def _grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.bfloat16, torch.float32):
        return False
    if any(d * dtype.itemsize % GROUPED_MM_ALIGN for d in dims):
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, dims: tuple[int, ...] = ()) -> str:
    """ "auto": ``grouped_mm`` on CUDA devices of compute capability ≥ 9.0 when every row length in
    ``dims`` (hidden, FFN widths) is a whole number of 16-byte units, else ``loop``."""
    if backend == "auto":
        return "grouped_mm" if _grouped_mm_supported(device, dtype, dims) else "loop"
    return backend


def _gmm_grouped(x_RD: torch.Tensor, w_LDH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    offs = torch.tensor(counts, device=x_RD.device).cumsum(0).to(torch.int32)
    return torch.ops.aten._grouped_mm(x_RD, w_LDH, offs=offs)


def _activate(h_RH: torch.Tensor, activation: str, inplace: bool) -> torch.Tensor:
    """gelu(h), or silu(gate) ⊙ up with gate = h[:, :F] and up = h[:, F:] (swiglu in place on h's
    storage when ``inplace``: no autograd)."""
    if activation != "swiglu":
        return F.gelu(h_RH)
    gate_RF, up_RF = h_RH.chunk(2, dim=-1)
    return F.silu(gate_RF, inplace=True).mul_(up_RF) if inplace else F.silu(gate_RF) * up_RF


def _ffn_loop(x_RD, w_in_LDH, w_down_LFD, counts: list[int], activation: str, run_experts=None) -> torch.Tensor:
    """The loop backend: each run's whole FFN in turn (see the module docstring)."""
    chunks = torch.split(x_RD, counts)
    # unbind, not w[i]: under autograd its backward stacks the L grads once, not L full-size scatters
    w_ins, w_downs = w_in_LDH.unbind(0), w_down_LFD.unbind(0)
    if run_experts is not None:  # runs in any order, several per expert (rows as received at EP > 1)
        w_ins, w_downs = [w_ins[l] for l in run_experts], [w_downs[l] for l in run_experts]
    experts = zip(chunks, w_ins, w_downs, strict=True)
    if torch.is_grad_enabled() and (x_RD.requires_grad or w_in_LDH.requires_grad or w_down_LFD.requires_grad):
        return torch.cat([_activate(x @ w_in, activation, False) @ w_down for x, w_in, w_down in experts], dim=0)
    out_RD = x_RD.new_empty(x_RD.shape[0], w_down_LFD.shape[-1])
    for (x, w_in, w_down), out in zip(experts, torch.split(out_RD, counts), strict=True):
        torch.mm(_activate(x @ w_in, activation, True), w_down, out=out)
    return out_RD


def _gmm_bmm(x_RD: torch.Tensor, w_LDH: torch.Tensor, counts: list[int]) -> torch.Tensor:
    num_local, longest = len(counts), max(counts, default=0)
    rows_R = torch.cat([torch.arange(c, device=x_RD.device) for c in counts])
    expert_R = torch.repeat_interleave(
        torch.arange(num_local, device=x_RD.device), torch.tensor(counts, device=x_RD.device)
    )
    padded_LCD = x_RD.new_zeros(num_local, longest, x_RD.shape[-1]).index_put((expert_R, rows_R), x_RD)
    return torch.bmm(padded_LCD, w_LDH)[expert_R, rows_R]


def _ffn_rowwise(x_RD, w_in_LDH, w_down_LFD, counts: list[int], activation: str, run_experts=None) -> torch.Tensor:
    """The rowwise backend: each row alone, M = 1 (see the module docstring)."""
    experts = run_experts if run_experts is not None else range(len(counts))
    expert_R = [l for l, n in zip(experts, counts, strict=True) for _ in range(n)]
    rows = [_activate(x_RD[i : i + 1] @ w_in_LDH[l], activation, False) @ w_down_LFD[l] for i, l in enumerate(expert_R)]
    return torch.cat(rows) if rows else x_RD.new_empty(0, w_down_LFD.shape[-1])


GEMMS = {"grouped_mm": _gmm_grouped, "bmm": _gmm_bmm}  # the grouped backends; "loop" is ``_ffn_loop``
BACKENDS = (*GEMMS, "loop")  # the backends timed and chosen by "auto"
BATCH_INVARIANT = "rowwise"  # for checks (``_ffn_rowwise``)


def expert_ffn(
    x_RD, w_in_LDH, w_down_LFD, counts: list[int], activation: str, backend: str, run_experts=None
) -> torch.Tensor:
    """Apply local expert l to its ``counts[l]`` consecutive rows of ``x_RD`` (expert-major). With
    ``run_experts`` (loop backend only), ``counts`` are runs of rows in any order and run i belongs
    to local expert ``run_experts[i]``."""
    if backend == "loop":
        return _ffn_loop(x_RD, w_in_LDH, w_down_LFD, counts, activation, run_experts)
    if backend == BATCH_INVARIANT:
        return _ffn_rowwise(x_RD, w_in_LDH, w_down_LFD, counts, activation, run_experts)
    if run_experts is not None:
        raise ValueError(f"expert backend {backend!r} needs its rows expert-major: run_experts is for 'loop'")
    gmm = GEMMS[backend]
    return gmm(_activate(gmm(x_RD, w_in_LDH, counts), activation, False), w_down_LFD, counts)


class Experts(Protocol):
    """What ``MoELayer`` calls on the experts of one rank (module docstring)."""

    experts_L: tuple[int, ...]  # the global (logical) expert whose weights local expert l computes with

    @property
    def expert_major(self) -> bool:
        """Whether the rows must come expert-major (run l is local expert l); else any runs, named
        by ``run_experts``."""
        ...

    def __call__(self, x_RD: torch.Tensor, runs: list[int], run_experts: list[int] | None = None) -> torch.Tensor:
        """Each run of rows through its local expert's FFN: ``y_RD``, the rows in the same order, a
        fresh tensor the caller owns (the layer may scale it in place)."""
        ...

    def load_global(self, w_in_EDH: torch.Tensor, w_down_EFD: torch.Tensor) -> None:
        """Copy this rank's experts' weights (rows ``experts_L``) from the global weights."""
        ...


class GroupedExperts(nn.Module):
    """The L experts of one rank, their weights stacked: ``w_in_LDH`` and ``w_down_LFD``. Local
    expert l holds global expert ``experts_L[l]`` (uninitialised until ``load_global`` or a seed)."""

    def __init__(
        self,
        experts_L: Sequence[int],
        hidden: int,
        ffn_hidden: int,
        activation: str,
        dtype: torch.dtype,
        backend: str,
    ):
        super().__init__()
        width = 2 * ffn_hidden if activation == "swiglu" else ffn_hidden
        self.experts_L = tuple(experts_L)
        num_local = len(self.experts_L)
        self.activation, self.backend = activation, backend
        self.w_in_LDH = nn.Parameter(torch.empty(num_local, hidden, width, dtype=dtype))
        self.w_down_LFD = nn.Parameter(torch.empty(num_local, ffn_hidden, hidden, dtype=dtype))

    def resolved_backend(self) -> str:
        """The backend "auto" stands for on these weights' device and dtype (``resolve_backend``)."""
        dims = (self.w_in_LDH.shape[1], self.w_in_LDH.shape[2], self.w_down_LFD.shape[1])
        return resolve_backend(self.backend, self.w_in_LDH.device, self.w_in_LDH.dtype, dims)

    @property
    def expert_major(self) -> bool:
        """Whether the backend needs its rows expert-major; the loop and rowwise backends take any runs."""
        return self.resolved_backend() not in ("loop", BATCH_INVARIANT)

    def set_backend(self, backend: str) -> None:
        """Compute with ``backend`` from the next call on: "auto", one of ``BACKENDS``, or "rowwise"."""
        if backend not in ("auto", *BACKENDS, BATCH_INVARIANT):
            accepted = ", ".join(map(repr, ("auto", *BACKENDS, BATCH_INVARIANT)))
            raise ValueError(f"expert backend = {backend!r} is invalid: accepted one of {accepted}")
        self.backend = backend

    def forward(self, x_RD: torch.Tensor, runs: list[int], run_experts: list[int] | None = None) -> torch.Tensor:
        """``runs``: rows per local expert (expert-major), or, with ``run_experts``, runs of rows of
        local expert ``run_experts[i]`` each (``expert_ffn``)."""
        backend = self.resolved_backend()
        return expert_ffn(x_RD, self.w_in_LDH, self.w_down_LFD, runs, self.activation, backend, run_experts)

    @torch.no_grad()
    def load_global(self, w_in_EDH: torch.Tensor, w_down_EFD: torch.Tensor) -> None:
        """Copy rows ``experts_L`` of the global weights into this rank's stacked weights."""
        self.w_in_LDH.copy_(w_in_EDH[list(self.experts_L)])
        self.w_down_LFD.copy_(w_down_EFD[list(self.experts_L)])
