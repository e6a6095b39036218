"""The alerts' picture: a run's per-step series (``details.series``), one panel per watched series, each
with its threshold as a dashed line and the spans where its alert fired shaded (a span of one sample,
held 0 s, is marked by its point).

The data is a pure function of one result run (``alert_panels``); drawing needs matplotlib, through
``matplotlib.figure.Figure`` (no pyplot), as in ``report/plots.py``. Alert definitions:
``moebench/measure/alerts.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from moebench.measure.alerts import ALERTS, DEFAULTS

# series -> (scale, unit) on the axis
SCALE = {
    "expert_load_ratio": (1.0, "of capacity"),
    "memory_used": (1.0, "fraction"),
    "a2a_time_s": (1e3, "ms"),
    "tokens_per_s_per_gpu": (1.0, "tokens/s"),
}


@dataclass(frozen=True)
class AlertPanel:
    """One watched series of a run, its threshold and the fired spans [(from s, to s)]."""

    name: str  # the alert's name
    series: str  # the series' key in ``details.series``
    times_s: list[float]
    values: list  # None where the step has no value
    threshold: float
    fired: list[tuple[float, float]]


def alert_panels(run: dict) -> list[AlertPanel]:
    """The panels of one run: each alert whose series the run recorded, in ``ALERTS`` order; the threshold
    is the run's [alerts] value (``config.alerts``), the spans are its fired ``alerts``. Empty for a run
    without series."""
    series = (run.get("details") or {}).get("series")
    if not series:
        return []
    limits = DEFAULTS | ((run.get("config") or {}).get("alerts") or {})
    fired = run.get("alerts") or []
    return [
        AlertPanel(
            alert.name,
            alert.series,
            list(series["t_s"]),
            list(series[alert.series]),
            float(limits[alert.key]),
            [(a["first_s"], a["first_s"] + a["duration_s"]) for a in fired if a["name"] == alert.name],
        )
        for alert in ALERTS
        if series.get(alert.series) is not None
    ]


def draw_alerts(panels: list[AlertPanel], title: str, figure: Callable):
    """One panel per series, stacked on a shared time axis: the series, its threshold, its fired spans."""
    fig = figure(8, 1.9 * len(panels) + 0.8)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, panel in zip(axes, panels, strict=True):
        scale, unit = SCALE[panel.series]
        points = [(t, v * scale) for t, v in zip(panel.times_s, panel.values, strict=True) if v is not None]
        ax.plot(
            [t for t, _ in points],
            [v for _, v in points],
            marker=".",
            linewidth=1,
            label=f"{panel.series} (alert {panel.name})",
        )
        ax.axhline(panel.threshold * scale, color="tab:red", linestyle="--", linewidth=1, label="threshold")
        for start, end in panel.fired:
            ax.axvspan(start, end, color="tab:red", alpha=0.2, linewidth=0)
            inside = [(t, v) for t, v in points if start <= t <= end]
            ax.plot([t for t, _ in inside], [v for _, v in inside], "o", color="tab:red", markersize=4)
        ax.set_ylabel(f"{panel.series}\n({unit})", fontsize=8)
        ax.grid(True, linewidth=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1].set_xlabel("time from the series' start (s)")
    fig.suptitle(title, fontsize=10)
    return fig
