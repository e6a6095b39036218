"""What the adapters share: whether a package is installed (without importing it), and the rules every
dropless, token-routed implementation refuses alike."""

from __future__ import annotations

import importlib.util

from runtime import MoEConfig


def installed(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a module blocked in sys.modules: no)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ValueError, ImportError):
        return False


def dropless_token_refusal(cfg: MoEConfig, subject: str) -> str:
    """Why a dropless, token-routed implementation cannot express ``cfg`` (capacity dropping or sequence
    routing), or "": ``subject`` names it in the message ("dMoE is", "the blocks are")."""
    if cfg.capacity_factor:
        return f"capacity_factor = {cfg.capacity_factor:g}: accepted 0 ({subject} dropless)"
    if cfg.granularity != "token":
        return f'granularity = "{cfg.granularity}": accepted "token"'
    return ""
