"""The test-only dispatch slowdown: a dispatcher wrapper the harness gives the layers when its knob is set.

``MOEBENCH_TEST_ONLY_SLOW_DISPATCH=0.15`` makes every dispatch take 15 % longer (a busy wait of that
fraction of its own time), so moebench's tests can prove that a regression comparison catches a
slower dispatch. It is honoured only inside a pytest run; set anywhere else, building a stack
raises, so no benchmark can carry it by accident. The runtime knows nothing of it: the harness
reads the knob where a rank builds its stack and passes ``wrapper()`` as ``wrap_dispatcher``.

What is slowed: the layer's pipelined path from plan through send (the wait comes after ``send``,
``fraction`` of the time since ``plan`` began), and the serial ``dispatch`` (after it returns,
``fraction`` of its whole time). The rows are unchanged.
"""

from __future__ import annotations

import os
import time

import torch

SLOWDOWN_ENV = "MOEBENCH_TEST_ONLY_SLOW_DISPATCH"


def injected_slowdown() -> float:
    """The test-only dispatch slowdown as a fraction (0.0 when unset); see the module docstring."""
    text = os.environ.get(SLOWDOWN_ENV)
    if text is None:
        return 0.0
    if "PYTEST_CURRENT_TEST" not in os.environ:
        raise RuntimeError(f"{SLOWDOWN_ENV} = {text!r} is set outside a pytest run: it exists for tests only, unset it")
    try:
        fraction = float(text)
    except ValueError:
        fraction = -1.0
    if not 0 <= fraction <= 10:
        raise ValueError(f"{SLOWDOWN_ENV} = {text!r} is invalid: accepted a fraction from 0 to 10")
    return fraction


def stall(fraction: float, start: float, device: torch.device) -> None:
    """Busy-wait ``fraction`` of the time since ``start``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # sync: test-only, to know how long the dispatch really took
    until = time.perf_counter() + fraction * (time.perf_counter() - start)
    while time.perf_counter() < until:
        pass


class SlowDispatcher:
    """A dispatcher whose dispatches take ``fraction`` longer; everything else is the wrapped one's.

    Unlike a runtime dispatcher it keeps one piece of per-call state: when the last ``plan`` began
    (the layer calls ``plan`` then ``send`` for each forward)."""

    def __init__(self, inner, fraction: float):
        self.inner, self.fraction = inner, fraction
        self._planned_at = time.perf_counter()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # only for what this class does not define

    def plan(self, *args, **kwargs):
        self._planned_at = time.perf_counter()
        return self.inner.plan(*args, **kwargs)

    def send(self, x_TD: torch.Tensor, meta):
        x_PD = self.inner.send(x_TD, meta)
        stall(self.fraction, self._planned_at, x_TD.device)
        return x_PD

    def dispatch(self, x_TD: torch.Tensor, *args, **kwargs):
        start = time.perf_counter()
        out = self.inner.dispatch(x_TD, *args, **kwargs)
        stall(self.fraction, start, x_TD.device)
        return out


def wrapper():
    """What a rank passes as ``wrap_dispatcher``: a ``SlowDispatcher`` maker when the knob is set
    (and not 0), else None."""
    fraction = injected_slowdown()
    if not fraction:
        return None
    return lambda dispatcher: SlowDispatcher(dispatcher, fraction)
