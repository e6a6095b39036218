"""The EPLB picture of a throughput or latency run with ``[eplb] interval`` > 0: per step, the expert
load's balancedness under the static placement (dashed) and re-placed from the measured load (solid),
one row per run, with the moves and the drift changes marked and the 0.9 target drawn; beside it the
two passes' step times over the same steps.

The data is a pure function of each run's ``details.eplb`` (``eplb_series``; written by
``moebench.measure.eplb.eplb_details``); drawing needs matplotlib, through ``matplotlib.figure.Figure``
(no pyplot), as in ``report/plots.py``, which passes in how to name a run and how to make a figure.
This module never imports torch (``moebench.measure.eplb`` does), so the target is restated here and a
test holds it equal to ``moebench.measure.eplb.RECOVERED``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

TARGET = 0.9  # the balancedness a re-placed run counts as recovered at: moebench.measure.eplb.RECOVERED
STATIC, REPLACED = ("C1", "--"), ("C0", "-")  # (colour, line style) of each pass


@dataclass(frozen=True)
class EplbSeries:
    """One run's two passes over the same steps (step i at x = i) and where its events fall on that axis:
    a move after step s at s + 0.5, a drift change that first applies at step n at n − 0.5."""

    balance: list[float]  # re-placed pass; a null value (NaN in the file) as NaN
    balance_static: list[float]
    step_time_s: list[float]
    step_time_static_s: list[float]
    moves_x: list[float]
    drift_x: list[float]
    interval: int
    window: int
    drift_every: int


def _floats(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def drift_changes(drift_every: int, steps: int) -> list[int]:
    """The steps at which the experts' popularity changes: every multiple of ``drift_every`` below
    ``steps`` (from the first multiple on; none without drift)."""
    return list(range(drift_every, steps, drift_every)) if drift_every > 0 else []


def eplb_series(runs: list[dict], label: Callable[[dict], str]) -> dict[str, EplbSeries]:
    """Every ok run with a ``details.eplb`` that has per-step balancedness, labelled ``label(params)``."""
    out = {}
    for run in runs:
        eplb = (run.get("details") or {}).get("eplb")
        if run.get("status") != "ok" or not eplb or not eplb.get("balancedness"):
            continue
        balance, drift = _floats(eplb["balancedness"]), int(eplb.get("drift_every") or 0)
        out[label(run["params"])] = EplbSeries(
            balance=balance,
            balance_static=_floats(eplb["balancedness_static"]),
            step_time_s=_floats(eplb["step_time_s"]),
            step_time_static_s=_floats(eplb["step_time_static_s"]),
            moves_x=[m["after_step"] + 0.5 for m in eplb.get("moves") or []],
            drift_x=[n - 0.5 for n in drift_changes(drift, len(balance))],
            interval=int(eplb["interval"]),
            window=int(eplb["window"]),
            drift_every=drift,
        )
    return out


def provenance(doc: dict) -> str:
    """Where the results came from: ``commit <sha> (dirty) · <host>: <GPUs, or CPU (cores)>``."""
    env = doc.get("environment") or {}
    commit = (env.get("git_sha") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    device = ", ".join(env.get("gpus") or []) or f"{env.get('cpu') or '?'} ({env.get('cpu_count') or '?'} cores)"
    return f"commit {commit} · {env.get('host') or '?'}: {device}"


def title(doc: dict) -> str:
    name = doc["scenario"]["scenario"]["name"]
    return (
        f"{name}: expert load balancedness per step, static placement (dashed) vs re-placed from the measured "
        f"load (solid), one row per run; step times beside\n{provenance(doc)}"
    )


def _median(values: list[float]) -> float:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    return float(np.median(finite)) if finite.size else math.nan


def _events(ax, data: EplbSeries) -> None:
    """The moves (dotted) and the drift changes (a grey line, every other epoch shaded) on one panel."""
    for x in data.moves_x:
        ax.axvline(x, color="grey", linestyle=":", linewidth=0.8, gid="move")
    edges = [-0.5, *data.drift_x, len(data.balance) - 0.5]
    for epoch, (left, right) in enumerate(pairwise(edges)):
        if epoch % 2:
            ax.axvspan(left, right, color="grey", alpha=0.12, linewidth=0, gid="drift-epoch")
    for x in data.drift_x:
        ax.axvline(x, color="black", linewidth=1.2, gid="drift")


def draw_eplb(series: dict[str, EplbSeries], title: str, figure: Callable):
    """Per run a row: balancedness per step (both passes, the target at 0.9) and step time (ms) per step."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    fig = figure(13, 1.2 + 2.8 * len(series))
    axes = fig.subplots(len(series), 2, squeeze=False, width_ratios=[3, 2])
    for (balance_ax, time_ax), (name, data) in zip(axes, series.items(), strict=True):
        steps = list(range(len(data.balance)))
        for ax in (balance_ax, time_ax):
            _events(ax, data)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
        for values, (colour, style), what in ((data.balance_static, STATIC, "static"),
                                              (data.balance, REPLACED, "re-placed")):  # fmt: skip
            balance_ax.plot(steps, values, color=colour, linestyle=style, linewidth=1.3, label=what)
        balance_ax.axhline(TARGET, color="red", linewidth=1, gid="target")
        balance_ax.set_ylim(0, 1.02)
        balance_ax.set_ylabel("balancedness (mean / max)")
        drift = f", drift every {data.drift_every}" if data.drift_every else ", no drift"
        balance_ax.set_title(
            f"{name} (interval {data.interval}, window {data.window}{drift}): median static "
            f"{_median(data.balance_static):.3f}, re-placed {_median(data.balance):.3f}",
            fontsize=9,
        )
        for values, (colour, style), what in ((data.step_time_static_s, STATIC, "static"),
                                              (data.step_time_s, REPLACED, "re-placed")):  # fmt: skip
            time_ax.plot(range(len(values)), [v * 1e3 for v in values], color=colour, linestyle=style,
                         linewidth=1.1, label=what)  # fmt: skip
        time_ax.set_ylim(bottom=0)
        time_ax.set_ylabel("step time (ms, slowest rank)")
        time_ax.set_title(
            f"step time: median static {_median(data.step_time_static_s) * 1e3:.3g} ms, re-placed "
            f"{_median(data.step_time_s) * 1e3:.3g} ms",
            fontsize=9,
        )
    handles = [
        Line2D([], [], color=STATIC[0], linestyle=STATIC[1], label="static placement"),
        Line2D([], [], color=REPLACED[0], linestyle=REPLACED[1], label="re-placed (EPLB)"),
        Line2D([], [], color="red", label=f"target balancedness {TARGET:g}"),
        Line2D([], [], color="grey", linestyle=":", label="move (between two steps)"),
    ]
    if any(data.drift_x for data in series.values()):
        handles += [
            Line2D([], [], color="black", label="drift: experts swap popularity"),
            Patch(color="grey", alpha=0.12, label="every other drift epoch"),
        ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
