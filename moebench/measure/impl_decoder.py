"""Kind equivalence with ``[model] impl = "hf:<family>"`` and the decoder keys: a whole Hugging Face decoder
model (moebench/adapters/hf_decoder.py) and our own ``MoEDecoder`` on one sequence of ``[workload]
tokens_per_rank`` positions, each against the fp64 ``reference_decoder`` on the same weights (docs/adapters.md).

The weights are ``runtime.decoder_weights(decoder_config, seed)`` (every MoE block's experts ``init_weights``,
no router offset); the sequence is hidden states drawn from seed + 1, as the layer case's tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moebench import adapters
from moebench import metrics as M
from runtime import DecoderConfig, DecoderWeights, MoEDecoder, decoder_weights, rel_error
from runtime.reference import reference_decoder

if TYPE_CHECKING:
    from moebench.spec import RunSpec

COLUMNS = (("rel_error_runtime", "runtime rel err", 1, ".1e"),)  # beside rel_error_forward (the impl's)


def is_decoder(spec: RunSpec) -> bool:
    """Whether an equivalence run checks a whole decoder (the decoder keys are set: attention_heads)."""
    return spec.model.get("attention_heads") is not None


def inputs(spec: RunSpec) -> tuple[DecoderConfig, DecoderWeights, torch.Tensor]:
    """The decoder's config, its seeded weights and the sequence [N, D] (module docstring)."""
    cfg = spec.decoder_config()
    seed = spec.workload["seed"]
    x_ND = torch.randn(spec.workload["tokens_per_rank"], cfg.hidden, generator=torch.Generator().manual_seed(seed + 1))
    return cfg, decoder_weights(cfg, seed), x_ND


@torch.no_grad()
def forward(spec: RunSpec, impl: str, device: torch.device | str = "cpu") -> dict:
    """On the rank: the implementation's output and our decoder's (``MoEDecoder.full``) on the sequence, both
    computed on the run's ``device``."""
    cfg, weights, x_ND = inputs(spec)
    x = x_ND.to(device, cfg.moe.torch_dtype)
    out_ND = adapters.build_decoder(impl, cfg, weights).to(device)(x)
    runtime_ND = MoEDecoder(cfg, weights, device=torch.device(device)).full(x)
    return {"out": out_ND.float().cpu(), "runtime_out": runtime_ND.float().cpu(), "impl": impl}


def first_position(out_ND: torch.Tensor, ref_ND: torch.Tensor, tol: float) -> int | None:
    """The first position whose row error ‖out_t − ref_t‖ exceeds tol · ‖ref‖/√N (or is not finite); None if none."""
    if out_ND.shape != ref_ND.shape:
        return 0
    diff_ND = out_ND.double() - ref_ND
    scale = tol * ref_ND.norm().item() / max(ref_ND.shape[0], 1) ** 0.5
    rows = (diff_ND.norm(dim=1) > scale) | ~torch.isfinite(diff_ND).all(dim=1)
    return int(rows.nonzero()[0, 0]) if rows.any() else None


def _judge(name: str, label: str, out_ND: torch.Tensor, ref_ND: torch.Tensor, tol: float) -> tuple[float, dict, dict]:
    """One output against the reference: its error, its check, and where it first differs (None: nowhere)."""
    error = rel_error(out_ND, ref_ND) if out_ND.shape == ref_ND.shape else float("inf")
    detail = f"{label} vs the fp64 reference_decoder: {error:.2e}, tolerance {tol:g}"
    where = None
    if out_ND.shape != ref_ND.shape:
        where = {"position": 0, "detail": f"output shape {tuple(out_ND.shape)}, reference {tuple(ref_ND.shape)}"}
    elif not error <= tol:
        t = first_position(out_ND, ref_ND, tol)
        where = {"position": t, "detail": f"position {t}"}
    if where is not None:
        detail += f"; first differs at {where['detail']}"
    return error, {"name": name, "pass": error <= tol, "detail": detail}, where


def evaluate(spec: RunSpec, per_rank: list[dict], impl: str, tol: float) -> tuple[dict, list[dict], dict]:
    """``rel_error_forward`` (the implementation's decoder) and ``rel_error_runtime`` (ours), each against the
    fp64 reference; a disagreement FAILs its check with the first differing position, never raises."""
    cfg, weights, x_ND = inputs(spec)
    ref_ND = reference_decoder(cfg, weights, x_ND.to(cfg.moe.torch_dtype))
    raw = per_rank[0]
    metrics, checks, details = {}, [], {"compared": "decoder output (forward only)", "impl": impl}
    for metric, name, label, key in (
        ("rel_error_forward", "rel_error_within_tolerance", f"{impl} decoder", "out"),
        ("rel_error_runtime", "runtime_rel_error_within_tolerance", "our MoEDecoder", "runtime_out"),
    ):
        error, check, where = _judge(name, label, raw[key], ref_ND, tol)
        if error < float("inf"):  # a wrong shape or a NaN: no number to record, the check says why
            metrics[metric] = M.metric([error], "ratio", "lower", exact=True)
        checks.append(check)
        details["first_difference" if key == "out" else "runtime_first_difference"] = where
    details.update(layers=cfg.layers, positions=x_ND.shape[0], qk_norm=cfg.qk_norm)
    return metrics, checks, details
