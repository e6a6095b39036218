"""The train kind's pictures: the loss per optimizer step of every layout on one chart, with the
single-device baseline dashed (the layouts should lie on it), and, when a file sweeps ``num_experts``,
the routed-expert parameter bytes each rank holds against the expert count (under EP they grow as E/W,
under DP as E: the memory that expert parallelism saves).

The data are pure functions of the result file's runs (``loss_curves``, ``expert_bytes_series``);
drawing needs matplotlib, through ``matplotlib.figure.Figure`` (no pyplot), as in ``report/plots.py``,
which passes in how to name a run and how to make a figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# Params that change only how the same model is laid out and run, never the numbers it computes: runs
# that differ only in these share one single-device baseline (every other param, num_experts say, keys it).
LAYOUT_KEYS = ("world_size", "mode", "recompute", "tokens_per_rank")
BASELINE_STYLES = ("--", "-.", ":", (0, (5, 1, 1, 1)))


@dataclass(frozen=True)
class LossCurves:
    """Loss per optimizer step: per run (its label) and per distinct single-device baseline (its label),
    each as (steps, losses); a null loss is NaN (a gap in the line)."""

    runs: dict[str, tuple[list[int], list[float]]]
    baselines: dict[str, tuple[list[int], list[float]]]


def _steps(curve: list[dict]) -> tuple[list[int], list[float]]:
    losses = [math.nan if r.get("loss") is None else float(r["loss"]) for r in curve]
    return [int(r["step"]) for r in curve], losses


def _details(run: dict) -> dict:
    return run.get("details") or {}


def loss_curves(runs: list[dict], label: Callable[[dict], str]) -> LossCurves:
    """Every ok run with a ``details.curve``, labelled ``label(params)``; and once per global batch (and
    per model, the params outside ``LAYOUT_KEYS``) the ``baseline_curve`` of runs whose baseline is
    ``single-device``, labelled ``single device, G tokens/step`` (plus the model's params, if any)."""
    lines: dict[str, tuple[list, list]] = {}
    baselines: dict[str, tuple[list, list]] = {}
    for run in runs:
        details = _details(run)
        if run.get("status") != "ok" or not details.get("curve"):
            continue
        lines[label(run["params"])] = _steps(details["curve"])
        if details.get("baseline") == "single-device" and details.get("baseline_curve"):
            model = {k: v for k, v in run["params"].items() if k not in LAYOUT_KEYS}
            name = f"single device, {details.get('global_tokens', '?')} tokens/step"
            name += f", {label(model)}" if model else ""
            baselines.setdefault(name, _steps(details["baseline_curve"]))
    return LossCurves(lines, baselines)


def draw_loss_curves(curves: LossCurves, title: str, figure: Callable):
    """One chart, log-scale loss: a solid line per run, a black dashed one per baseline (drawn on top)."""
    from matplotlib.ticker import FuncFormatter, LogFormatter, MaxNLocator

    fig = figure(9, 5)
    ax = fig.subplots()
    for name, (steps, losses) in curves.runs.items():
        ax.plot(steps, losses, linewidth=1.2, label=name)
    for i, (name, (steps, losses)) in enumerate(curves.baselines.items()):
        style = BASELINE_STYLES[i % len(BASELINE_STYLES)]
        ax.plot(steps, losses, color="black", linestyle=style, linewidth=1.5, label=name)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.1, 1, 10
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))  # 2, 3 within a decade
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(title, fontsize=10)
    return fig


def expert_bytes_series(runs: list[dict], label: Callable[[dict], str]) -> dict[str, tuple[list, list[int]]]:
    """``details.memory.expert_param_bytes`` (per rank, max over ranks) against ``num_experts``, one series
    per combination of the other params (``label`` names it), num_experts ascending; ok runs only. Empty
    unless those runs take more than one num_experts."""
    sized = [
        run
        for run in runs
        if run.get("status") == "ok"
        and "num_experts" in run["params"]
        and (_details(run).get("memory") or {}).get("expert_param_bytes") is not None
    ]
    if len({run["params"]["num_experts"] for run in sized}) < 2:
        return {}
    out: dict[str, tuple[list, list]] = {}
    for run in sized:
        others = {k: v for k, v in run["params"].items() if k != "num_experts"}
        xs, ys = out.setdefault(label(others), ([], []))
        xs.append(run["params"]["num_experts"])
        ys.append(int(run["details"]["memory"]["expert_param_bytes"]))
    return {name: _ascending(xs, ys) for name, (xs, ys) in out.items()}


def _ascending(xs: list, ys: list) -> tuple[list, list]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def byte_unit(values: list[int]) -> tuple[float, str]:
    """(divisor, unit) that reads the largest of ``values``: MiB from 1 MiB, KiB from 1 KiB, else bytes."""
    top = max(values, default=0)
    return (2**20, "MiB") if top >= 2**20 else (2**10, "KiB") if top >= 2**10 else (1, "bytes")


def draw_expert_bytes(series: dict, title: str, figure: Callable):
    """One line per series; log2 x (num_experts) and log2 y, so bytes ∝ E are parallel straight lines
    and EP's lines sit log2(W) doublings below DP's."""
    from matplotlib.ticker import FuncFormatter

    scale, unit = byte_unit([y for _, ys in series.values() for y in ys])
    fig = figure(8, 4.5)
    ax = fig.subplots()
    for i, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, [y / scale for y in ys], marker="osD^v<>P"[i % 8], label=name or "the run")
    xs = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    if all(y > 0 for _, ys in series.values() for y in ys):
        ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("routed experts (num_experts)")
    ax.set_ylabel(f"expert parameters per rank ({unit}, max over ranks)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig
