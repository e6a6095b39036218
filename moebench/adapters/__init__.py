"""Other MoE implementations behind one contract (``[model] impl``): resolving the value, checking that the
implementation can express the scenario's layer, and building it from the run's global weights.

The contract (docs/adapters.md): an implementation is given the run's seeded global weights (a list of
``runtime.weights.MoEWeights``, one per layer) and the layer's ``runtime.MoEConfig``, and returns a torch
module whose forward maps hidden states [T, D] to [T, D]: the MoE block's output, without the residual.

``impl`` is "runtime" (the default: our own layer), "hf:<family>" (a Hugging Face transformers MoE block,
``moebench/adapters/hf.py``) or "python:package.module:factory" (``factory(weights, cfg)`` returns the module).
Nothing here imports transformers: only building an "hf:" block does.

``unavailable(impl, device)`` says why an implementation cannot run on this host (a package not installed, no
GPU): the runner then records the run as skipped with that reason, not as an error. A "python:" factory states
its own needs with an optional ``unavailable(device)`` attribute returning the reason or "", and its own limits
with an optional ``refusal(cfg)`` attribute returning why it cannot express the layer or "" (``check`` then
refuses the scenario in one line). The fused GPU implementations: ``vllm.py`` and ``megablocks.py`` here.
"""

from __future__ import annotations

import importlib
import re

import torch

from moebench.adapters import hf, hf_decoder
from moebench.adapters.common import installed
from runtime import DecoderConfig, DecoderWeights, MoEConfig, MoEWeights

RUNTIME = "runtime"
_PYTHON = re.compile(r"python:([A-Za-z_][\w.]*):([A-Za-z_]\w*)")
ACCEPTED = f'"runtime", "hf:<family>" (family one of {", ".join(hf.FAMILIES)}) or "python:package.module:factory"'


def _bad(impl: str, why: str) -> ValueError:
    return ValueError(f"[model] impl = {impl!r} is invalid: {why}accepted {ACCEPTED}")


def check(impl: str, cfg: MoEConfig) -> None:
    """Raise ``ValueError`` (one line, naming the key and value) unless ``impl`` names an implementation
    that exists here and can express ``cfg``'s layer; imports a "python:" module, never transformers (whether
    transformers is installed is ``build``'s question: a scenario naming hf: still loads and lists without it)."""
    if impl == RUNTIME:
        return
    if impl.startswith("hf:"):
        family = impl[3:]
        if family not in hf.FAMILIES:
            raise _bad(impl, f"unknown family {family!r}: ")
        refusal = hf.refusal(family, cfg)
        if refusal:
            raise ValueError(f"[model] impl = {impl!r} cannot express this layer: {refusal}")
        return
    refuse = getattr(_factory(impl), "refusal", None)  # a "python:" factory's own limits, like an hf: family's
    why = refuse(cfg) if callable(refuse) else ""
    if why:
        raise ValueError(f"[model] impl = {impl!r} cannot express this layer: {why}")


def _factory(impl: str):
    match = _PYTHON.fullmatch(impl)
    if match is None:
        raise _bad(impl, "")
    module_name, name = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise _bad(impl, f"module {module_name!r} cannot be imported ({err}); ") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise _bad(impl, f"{module_name} has no callable {name!r}; ")
    return factory


def _need_transformers(impl: str) -> None:
    if not installed("transformers"):
        raise ValueError(
            f"[model] impl = {impl!r} needs transformers, which is not installed: "
            "accepted after pip install 'moebench[hf]', or impl = \"runtime\""
        )


def build(impl: str, weights: list[MoEWeights], cfg: MoEConfig) -> torch.nn.Module:
    """The implementation ``impl`` names, built from the global ``weights`` and ``cfg`` (``check`` first)."""
    check(impl, cfg)
    if impl.startswith("hf:"):
        _need_transformers(impl)
        return hf.build(impl[3:], weights[0], cfg)
    return _factory(impl)(weights, cfg)


def unavailable(impl: str, device: str) -> str:
    """Why ``impl`` cannot run on ``device`` ("cpu" or "cuda") on this host, or "" when it can (``check`` first)."""
    if impl.startswith("hf:") and not installed("transformers"):
        return f"[model] impl = {impl!r} needs transformers, which is not installed (pip install 'moebench[hf]')"
    if impl.startswith("python:"):
        needs = getattr(_factory(impl), "unavailable", None)
        reason = needs(device) if callable(needs) else ""
        return f"[model] impl = {impl!r}: {reason}" if reason else ""
    return ""


def check_decoder(impl: str, cfg: DecoderConfig) -> None:
    """A whole decoder under test (``hf_decoder``): ``ValueError`` (one line) unless ``impl`` is "hf:<family>" of
    a family whose decoder model can express ``cfg``."""
    family = impl[3:] if impl.startswith("hf:") else None
    if family not in hf_decoder.FAMILIES:
        raise ValueError(
            f"[model] impl = {impl!r} is invalid with the decoder keys (attention_heads, ...): accepted "
            f"{', '.join(f'hf:{f}' for f in hf_decoder.FAMILIES)} (a Hugging Face decoder model)"
        )
    why = hf_decoder.refusal(family, cfg)
    if why:
        raise ValueError(f"[model] impl = {impl!r} cannot express this decoder: {why}")


def build_decoder(impl: str, cfg: DecoderConfig, weights: DecoderWeights) -> torch.nn.Module:
    """The decoder model ``impl`` names, filled with ``weights``: hidden states [N, D] of one sequence to [N, D]."""
    check_decoder(impl, cfg)
    _need_transformers(impl)
    return hf_decoder.build(impl[3:], cfg, weights)


def routing_counts(module: torch.nn.Module, x_TD: torch.Tensor, num_experts: int) -> list[int]:
    """Copies routed to each expert on ``x_TD``, from the implementation's optional ``route(x_TD)`` hook (its
    chosen expert ids [T, K]; an "hf:" block's is its own router's choice). ``ValueError`` without the hook."""
    route = getattr(module, "route", None)
    if not callable(route):
        raise ValueError(
            f"{type(module).__name__} has no route(x_TD) method: accepted an implementation whose route returns its "
            "chosen expert ids [T, K] (every hf: block has one) for kind load_balance"
        )
    with torch.no_grad():
        ids_TK = route(x_TD)
    return torch.bincount(ids_TK.reshape(-1).long().cpu(), minlength=num_experts).tolist()
