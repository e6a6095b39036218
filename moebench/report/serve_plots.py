"""The serve kind's picture: goodput, request throughput and TTFT against the request rate, one line
per combination of the other swept keys (batching, mode, ...): where the lines bend is the knee past
which requests queue. ``inf`` (every request at once) sits at the right end of the axis.

The data is a pure function of the result file (``rate_series``); drawing needs matplotlib, through
``matplotlib.figure.Figure`` (no pyplot), as in ``report/plots.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

PANELS = (  # (metric, what, unit scale, unit)
    ("goodput", "goodput", 1, "requests/s"),
    ("request_throughput", "request throughput", 1, "requests/s"),
    ("ttft_s", "TTFT p50", 1e3, "ms"),
    ("tpot_s", "TPOT p50", 1e3, "ms"),
)


def _rate(value) -> float:
    return math.inf if value in ("inf", math.inf) else float(value)


def rate_series(runs: list[dict], label: Callable[[dict], str]) -> tuple[list, dict]:
    """(the swept rates in ascending order, {metric: {series label: [median or None per rate]}}) over
    runs that sweep ``request_rate``; ``label`` names a run's other params. Empty without such a sweep."""
    rates = sorted({_rate(r["params"]["request_rate"]) for r in runs if "request_rate" in r["params"]})
    if len(rates) < 2:
        return [], {}
    out: dict[str, dict[str, list]] = {m: {} for m, *_ in PANELS}
    for run in runs:
        if "request_rate" not in run["params"]:
            continue
        others = {k: v for k, v in run["params"].items() if k != "request_rate"}
        i = rates.index(_rate(run["params"]["request_rate"]))
        for metric, *_ in PANELS:
            record = run["metrics"].get(metric)
            values = out[metric].setdefault(label(others), [None] * len(rates))
            values[i] = None if record is None else record["median"]
    return rates, {m: lines for m, lines in out.items() if any(v is not None for vs in lines.values() for v in vs)}


def draw_rates(rates: list, panels: dict, title: str, figure: Callable):
    """One small panel per metric; x = the rates at even spacing, labelled (``inf`` last)."""
    fig = figure(4 * len(panels), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    ticks = ["inf" if math.isinf(r) else f"{r:g}" for r in rates]
    for ax, (metric, lines) in zip(axes, panels.items(), strict=True):
        _, what, scale, unit = next(p for p in PANELS if p[0] == metric)
        for name, values in lines.items():
            xs = [i for i, v in enumerate(values) if v is not None]
            ax.plot(xs, [values[i] * scale for i in xs], marker="o", label=name or "run")
        ax.set_xticks(range(len(rates)), ticks)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(f"{what} ({unit}, median)")
        ax.grid(True, linewidth=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return fig
