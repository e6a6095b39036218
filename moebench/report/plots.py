"""The pictures of ``moebench report --html / --plots``: what each plot shows, drawn from result files.

Per result file (``plots_for``):

- load_balance: per run, a heatmap of the tokens routed to each expert of each layer (summed over the
  run's batches), and beside it each rank's total, with the imbalance gate marked on the colour bars;
- latency: the step time's CDF, one curve per run, its p50 / p90 / p99 marked as the table reads them;
- a sweep over ``world_size`` or ``tokens_per_rank``: tokens/s per rank and all-to-all busbw against
  the swept value (nccl-tests style), log axes where the values span more than 10×;
- overlap (runs that set ``overlap_chunks``): serial against overlapped step time, and the exposed
  communication, per chunk count;
- offload (runs with ``[offload] cache_slots`` swept): cache hit rate against cache slots, per policy;
- serve (runs with ``[serve] request_rate`` swept): goodput, throughput, TTFT and TPOT against the
  rate, per batching and mode (``report/serve_plots.py``), and TTFT's CDF, one curve per run;
- train: the loss per optimizer step of every run on one chart, the single-device baseline dashed, and
  (``num_experts`` swept) the expert parameter bytes per rank against num_experts (``report/train_plots.py``);
- eplb (runs with ``[eplb] interval`` > 0): balancedness per step, static against re-placed, moves and drift
  changes marked, the 0.9 target drawn, and both passes' step times (``report/eplb_plots.py``).

Many series (several swept params besides the x axis) are told apart one param per visual channel
(``series_layout``): colour for one, line style and marker for another, and small panels (facets) for
the rest, with one legend naming each param's values once.

Each plot's data is prepared by a pure function (tested against the JSON), then drawn. matplotlib is
optional (``pip install 'moebench[plots]'``) and imported only to draw: figures are made with
``matplotlib.figure.Figure`` on the Agg canvas, never through pyplot, so no display is needed.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moebench.metrics import nearest_rank
from moebench.report import alert_plots, eplb_plots, serve_plots, train_plots

INSTALL_HINT = "pip install 'moebench[plots]'"
SWEPT = ("world_size", "tokens_per_rank")  # the sweeps drawn nccl-tests style
CDF_MARKS = (50, 90, 99)


def require_matplotlib(flag: str = "--html") -> None:
    """A one-line error (a ValueError, so exit 2) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} needs matplotlib, which is not installed: {INSTALL_HINT}") from None


@dataclass(frozen=True)
class Plot:
    """One picture: a file stem unique within a report, a title that explains it alone, and how to draw it."""

    name: str
    title: str
    draw: Callable  # () -> matplotlib.figure.Figure


def png(fig) -> bytes:
    """The figure as PNG bytes (Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(width: float = 8, height: float = 4.5):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def run_label(params: dict) -> str:
    """A run as its swept params name it: ``world_size=2, policy=lru`` (``the run`` when nothing is swept)."""
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "the run"


def slug(text: str) -> str:
    """``text`` made safe as a file name: letters, digits, ``.``, ``_``, ``-``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"


def _median(run: dict, name: str) -> float | None:
    m = run["metrics"].get(name)
    value = None if m is None else m.get("median")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _array(samples: list) -> np.ndarray:
    """Samples as float64, a null (NaN in the file) as NaN."""
    return np.asarray(samples, dtype=np.float64)


def _ok_runs(doc: dict) -> list[dict]:
    return [run for run in doc["runs"] if run["status"] == "ok"]


# -------------------------------------------------------------------------------------------
# load_balance: the heatmap


@dataclass(frozen=True)
class LoadHeatmap:
    """Token copies per layer and expert (and per rank), summed over a run's batches, and its gates."""

    loads_LE: np.ndarray
    ranks_LW: np.ndarray
    expert_to_rank: list[int]
    batches: int
    expert_gate: float | None  # max/mean limit of the imbalance_max_mean gate, if the run has one
    rank_gate: float | None  # the same for rank_imbalance_max_mean
    cv_gate: dict | None  # the run's load_cv SLO record (limit, value, pass), if any


def load_heatmap(run: dict) -> LoadHeatmap | None:
    """The heatmap's data from a load_balance run's ``details``; None when the run has none."""
    layers = (run.get("details") or {}).get("layers")
    if run["status"] != "ok" or not layers:
        return None
    gates = {s["metric"]: s for s in run.get("slo", []) if s.get("op") == "max"}
    limit = {k: gates[k]["limit"] for k in ("imbalance_max_mean", "rank_imbalance_max_mean") if k in gates}
    return LoadHeatmap(
        loads_LE=np.array([layer["expert_tokens"] for layer in layers], dtype=np.int64),
        ranks_LW=np.array([layer["rank_tokens"] for layer in layers], dtype=np.int64),
        expert_to_rank=list(run["details"].get("expert_to_rank") or []),
        batches=int(run["details"].get("batches") or 0),
        expert_gate=limit.get("imbalance_max_mean"),
        rank_gate=limit.get("rank_imbalance_max_mean"),
        cv_gate=gates.get("load_cv"),
    )


def over_gate(loads_LX: np.ndarray, limit: float | None) -> np.ndarray:
    """Cells whose load exceeds ``limit`` × their layer's mean (the imbalance gate's reading); none without one."""
    if limit is None:
        return np.zeros(loads_LX.shape, dtype=bool)
    return loads_LX > limit * loads_LX.mean(axis=1, keepdims=True)


def _heat_panel(fig, ax, loads_LX: np.ndarray, limit: float | None, what: str, ticks: list[str]) -> None:
    """One heatmap, its colour bar marking the layers' mean and the gate (limit × mean); cells over it boxed."""
    mean = float(loads_LX.mean())
    top = max(float(loads_LX.max()), limit * mean * 1.02 if limit else 0.0)
    image = ax.imshow(loads_LX, aspect="auto", cmap="viridis", vmin=float(loads_LX.min()), vmax=top)
    ax.set_xticks(range(loads_LX.shape[1]), ticks, fontsize=7)
    ax.set_yticks(range(loads_LX.shape[0]))
    ax.set_xlabel(what)
    ax.set_ylabel("layer")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("token copies (sum over batches)")
    bar.ax.axhline(mean, color="white", linewidth=2)
    if limit:
        bar.ax.axhline(limit * mean, color="red", linewidth=2)
        for layer, col in zip(*np.nonzero(over_gate(loads_LX, limit)), strict=True):
            ax.add_patch(_box(col, layer))


def _box(x: int, y: int):
    from matplotlib.patches import Rectangle

    return Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)


def draw_load_heatmap(data: LoadHeatmap, title: str):
    ranked = data.ranks_LW.shape[1] > 1
    fig = _figure(11 if ranked else 8, max(4, 2 + 0.45 * data.loads_LE.shape[0]))
    axes = fig.subplots(1, 2, width_ratios=[4, 1]) if ranked else [fig.subplots()]
    owner = data.expert_to_rank
    ticks = [f"{e}\nr{owner[e]}" if e < len(owner) else str(e) for e in range(data.loads_LE.shape[1])]
    _heat_panel(fig, axes[0], data.loads_LE, data.expert_gate, "expert (r = the rank that holds it)", ticks)
    if ranked:
        ticks = [str(w) for w in range(data.ranks_LW.shape[1])]
        _heat_panel(fig, axes[1], data.ranks_LW, data.rank_gate, "rank", ticks)
    fig.suptitle(title, fontsize=10)
    return fig


def _heatmap_title(doc: dict, run: dict, data: LoadHeatmap) -> str:
    """What the heatmap shows, its colour-bar lines, and the run's load gates with their verdicts."""
    name = doc["scenario"]["scenario"]["name"]
    which = f" ({run_label(run['params'])})" if run["params"] else ""
    gates = ["white line on a colour bar = the mean"]
    for what, limit in (("expert", data.expert_gate), ("rank", data.rank_gate)):
        if limit:
            gates.append(f"red line = {what} imbalance gate max/mean ≤ {limit:g} (boxed cells exceed it)")
    if data.cv_gate and data.cv_gate.get("value") is not None:
        verdict = "met" if data.cv_gate.get("pass") else "missed"
        gates.append(f"load CV gate ≤ {data.cv_gate['limit']:g}: {data.cv_gate['value']:.3f}, {verdict}")
    head = f"{name}{which}: token copies routed to each expert per layer, {data.batches} batches summed"
    return head + "\n" + "; ".join(gates)


# -------------------------------------------------------------------------------------------
# latency: the step-time CDF


@dataclass(frozen=True)
class Cdf:
    """An empirical CDF: sorted samples and the fraction of samples at or below each."""

    x: np.ndarray
    y: np.ndarray
    marks: dict  # percentile -> value, as the table reads them: p50 the median, p90 and p99 the nearest rank
    n: int


def step_cdf(samples: list[float]) -> Cdf:
    x = np.sort(_array(samples))
    x = x[np.isfinite(x)]  # a null sample (NaN) has no place on the curve
    marks = {q: float(np.median(x)) if q == 50 else nearest_rank(x, q) for q in CDF_MARKS}
    return Cdf(x, np.arange(1, len(x) + 1) / len(x), marks, len(x))


def draw_cdfs(cdfs: dict, title: str, scale: float = 1e3, unit: str = "ms", what: str = "step time", of: str = "steps"):
    """One curve per run (``cdfs``: label -> Cdf), percentile markers on each."""
    fig = _figure()
    ax = fig.subplots()
    shapes = {50: "o", 90: "s", 99: "^"}
    for label, cdf in cdfs.items():
        marks = " / ".join(f"p{q} {v * scale:.3g}" for q, v in cdf.marks.items())
        (line,) = ax.step(cdf.x * scale, cdf.y, where="post", label=f"{label} (n={cdf.n}): {marks} {unit}")
        for q, v in cdf.marks.items():
            ax.plot([v * scale], [q / 100], shapes[q], color=line.get_color(), markersize=6)
    for q in CDF_MARKS:
        ax.axhline(q / 100, color="grey", linewidth=0.5, linestyle=":")
    ax.set_xlabel(f"{what} ({unit})")
    ax.set_ylabel(f"fraction of {of} at or below")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="lower right", title="run (samples): ○ p50 □ p90 △ p99", title_fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


# -------------------------------------------------------------------------------------------
# sweeps over world_size or tokens_per_rank


def swept_key(runs: list[dict]) -> str | None:
    """world_size or tokens_per_rank, whichever the runs' params take more values of (at least 2;
    world_size on a tie); the other swept params then tell the series apart."""
    counts = {key: len({str(run["params"][key]) for run in runs if key in run["params"]}) for key in SWEPT}
    key = max(SWEPT, key=counts.__getitem__)
    return key if counts[key] > 1 else None


def series(runs: list[dict], x_key: str, metric: str) -> dict[str, tuple[list, list[float]]]:
    """``metric``'s median against the param ``x_key``, one series per combination of the other params.
    Runs without the metric (busbw at one rank) or the param are left out; x ascending."""
    out: dict[str, tuple[list, list]] = {}
    for run in runs:
        value = _median(run, metric)
        if x_key not in run["params"] or value is None:
            continue
        xs, ys = out.setdefault(run_label(_others(run["params"], x_key)), ([], []))
        xs.append(run["params"][x_key])
        ys.append(value)
    return {label: _ascending(xs, ys) for label, (xs, ys) in out.items()}


def _others(params: dict, x_key: str) -> dict:
    return {k: v for k, v in params.items() if k != x_key}


def series_params(runs: list[dict], x_key: str) -> dict[str, dict]:
    """Each series label of ``series(runs, x_key, ...)`` and the params that name it (x_key left out)."""
    return {run_label(_others(run["params"], x_key)): _others(run["params"], x_key) for run in runs}


def _ascending(xs: list, ys: list) -> tuple[list, list]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def wide(values: list[float]) -> bool:
    """Positive values spanning more than 10×: drawn on a log axis."""
    positive = [v for v in values if v > 0]
    return len(positive) == len(values) and bool(values) and max(values) > 10 * min(values)


SWEEP_PANELS = (
    ("tokens_per_s_per_gpu", "tokens/s per rank", "tokens/s"),
    ("a2a_busbw_gbps", "all-to-all busbw", "GB/s"),
)


MAX_PER_PANEL = 6  # series one panel shows; past it the second dimension becomes facets
LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 3)), "P"))


@dataclass(frozen=True)
class SeriesLayout:
    """How a plot tells its series apart, one param (a dimension) per visual channel: ``colour`` and
    ``style`` (line style and marker) within a panel, one small panel per combination of ``facet``."""

    colour: str | None
    style: str | None
    facet: tuple[str, ...]


def series_layout(params: list[dict], max_per_panel: int = MAX_PER_PANEL) -> SeriesLayout:
    """The dimensions that vary across the series (params taking two or more values), most values first
    (first seen on a tie): colour for the first, line style and marker for the second, facets for the
    rest; and the second to facets too when colour × style would put more than ``max_per_panel`` series
    in one panel. A single dimension stays one panel, coloured."""
    values: dict[str, list] = {}
    for p in params:
        for key, value in p.items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    dims = sorted((k for k, v in values.items() if len(v) > 1), key=lambda k: -len(values[k]))
    if not dims:
        return SeriesLayout(None, None, ())
    if len(dims) > 1 and len(values[dims[0]]) * len(values[dims[1]]) > max_per_panel:
        return SeriesLayout(dims[0], None, tuple(dims[1:]))
    return SeriesLayout(dims[0], dims[1] if len(dims) > 1 else None, tuple(dims[2:]))


def _values(params: list[dict], key: str | None) -> list:
    found = []
    for p in params:
        if key is not None and p.get(key) not in found:
            found.append(p.get(key))
    return found


def facet_label(layout: SeriesLayout, params: dict) -> str:
    return run_label({k: params.get(k) for k in layout.facet})


def draw_series(panels: list[tuple[str, str, dict]], x_label: str, title: str, params: dict | None = None):
    """One panel per (y label, panel title, series) and, when the series' ``params`` (label -> params) call
    for facets (``series_layout``), one per facet too: a single panel's facets side by side (3 a row),
    several panels' facets one row each. Colour and line style each follow one param, named once in the
    figure's legend. Log axes where a span exceeds 10×."""
    params = params or {label: {"series": label} for _, _, data in panels for label in data}
    layout = series_layout(list(params.values()))
    facets = list(dict.fromkeys(facet_label(layout, params[label]) for _, _, data in panels for label in data))
    if len(panels) == 1:
        cols = min(3, len(facets))
        grid = [(0, f) for f in facets]
        fig = _figure(5 * cols + 2, 4.2 * math.ceil(len(facets) / cols))
        axes = fig.subplots(math.ceil(len(facets) / cols), cols, squeeze=False).ravel()
    else:
        grid = [(i, f) for f in facets for i in range(len(panels))]
        fig = _figure(5 * len(panels) + 2, 4.2 * len(facets))
        axes = fig.subplots(len(facets), len(panels), squeeze=False).ravel()
    colours, styles = _values(list(params.values()), layout.colour), _values(list(params.values()), layout.style)
    for ax, (i, facet) in zip(axes, grid, strict=False):
        y_label, name, data = panels[i]
        shown = {label: xy for label, xy in data.items() if facet_label(layout, params[label]) == facet}
        for label, (x, y) in shown.items():
            p = params[label]
            colour = f"C{colours.index(p.get(layout.colour)) % 10}" if layout.colour else "C0"
            line, marker = (
                LINE_STYLES[styles.index(p.get(layout.style)) % len(LINE_STYLES)] if layout.style else ("-", "o")
            )
            ax.plot(x, y, color=colour, linestyle=line, marker=marker, label=label)
        _axes(ax, shown, x_label, y_label, f"{name}: {facet}" if layout.facet else name)
    for ax in axes[len(grid) :]:
        ax.set_visible(False)
    handles = _legend_handles(layout, colours, styles)
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _axes(ax, data: dict, x_label: str, y_label: str, name: str) -> None:
    xs = [x for x_list, _ in data.values() for x in x_list]
    ys = [y for _, y_list in data.values() for y in y_list]
    if wide(xs):
        ax.set_xscale("log", base=2)
    if wide(ys):
        ax.set_yscale("log")
    ax.set_xticks(sorted(set(xs)), [str(x) for x in sorted(set(xs))])
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(name, fontsize=9)
    ax.grid(True, alpha=0.3)


def _legend_handles(layout: SeriesLayout, colours: list, styles: list) -> list:
    """One entry per value of the colour param (its colour) and of the style param (grey, its line and marker)."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=f"C{i % 10}", marker="o", label=f"{layout.colour}={v}") for i, v in enumerate(colours)
    ]
    for i, v in enumerate(styles):
        line, marker = LINE_STYLES[i % len(LINE_STYLES)]
        handles.append(Line2D([], [], color="grey", linestyle=line, marker=marker, label=f"{layout.style}={v}"))
    return handles


# -------------------------------------------------------------------------------------------
# overlap and offload

OVERLAP_BARS = (
    ("serial", "serial step (every layer at C = 1)"),
    ("overlapped", "overlapped step (C chunks)"),
    ("exposed", "exposed communication"),
)


def overlap_bars(runs: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """Per run that measured overlap (its label), the medians over the overlap rounds of the serial step,
    the overlapped step and the exposed communication, in seconds. The overlapped step's time in those
    rounds is compute-only + exposed, round by round (exposed = overlapped − compute-only, as recorded),
    so all three bars come from the same rounds (``step_time_s`` is timed on its own, at another time)."""
    names = ("serial_step_time_s", "compute_only_time_s", "exposed_comm_s")
    measured = [run for run in runs if all(run["metrics"].get(name, {}).get("samples") for name in names)]
    metrics = [run["metrics"] for run in measured]
    return [run_label(run["params"]) for run in measured], {
        "serial": [m["serial_step_time_s"]["median"] for m in metrics],
        "overlapped": [
            float(np.median(_array(m["compute_only_time_s"]["samples"]) + _array(m["exposed_comm_s"]["samples"])))
            for m in metrics
        ],
        "exposed": [m["exposed_comm_s"]["median"] for m in metrics],
    }


def draw_overlap(labels: list[str], bars: dict, title: str):
    fig = _figure(max(6, 1.2 * len(labels) + 3), 4.2)
    ax = fig.subplots()
    width = 0.8 / len(OVERLAP_BARS)
    for i, (name, label) in enumerate(OVERLAP_BARS):
        heights = [np.nan if v is None else v * 1e3 for v in bars[name]]  # null (NaN in the file): no bar
        ax.bar(np.arange(len(labels)) + (i - 1) * width, heights, width, label=label)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("run")
    ax.set_ylabel("time per step (ms, median over the overlap rounds)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig


def hit_rate_series(runs: list[dict]) -> dict[str, tuple[list, list[float]]]:
    """cache_hit_rate against cache_slots, one series per combination of the other params (policy, ...);
    empty unless cache_slots takes more than one value."""
    if len({run["params"].get("cache_slots") for run in runs if "cache_slots" in run["params"]}) < 2:
        return {}
    return series(runs, "cache_slots", "cache_hit_rate")


# -------------------------------------------------------------------------------------------
# Every plot of one result file


def plots_for(doc: dict) -> list[Plot]:
    """The plots one result file calls for, in page order; names ``<scenario>.<what>[.<run>]``."""
    info = doc["scenario"]["scenario"]
    name, kind, runs = info["name"], info["kind"], _ok_runs(doc)
    base, out = slug(name), []
    if kind == "load_balance":
        for run in runs:
            data = load_heatmap(run)
            if data is not None:
                stem = f"{base}.expert-load" + (f".{slug(run_label(run['params']))}" if run["params"] else "")
                title = _heatmap_title(doc, run, data)
                out.append(Plot(stem, title, lambda d=data, t=title: draw_load_heatmap(d, t)))
    if kind == "latency":
        cdfs = {
            run_label(run["params"]): step_cdf(run["metrics"]["step_time_s"]["samples"])
            for run in runs
            if np.isfinite(_array((run["metrics"].get("step_time_s") or {}).get("samples") or [])).any()
        }
        if cdfs:
            title = f"{name}: distribution of step time, one curve per run (max over ranks per step)"
            out.append(Plot(f"{base}.step-cdf", title, lambda c=cdfs, t=title: draw_cdfs(c, t)))
    if kind == "serve":
        rates, panels = serve_plots.rate_series(runs, run_label)
        if panels:
            title = f"{name}: what requests see against the request rate, one line per run's other keys"
            draw = lambda r=rates, p=panels, t=title: serve_plots.draw_rates(r, p, t, _figure)  # noqa: E731
            out.append(Plot(f"{base}.serve-rate", title, draw))
        cdfs = {run_label(run["params"]): step_cdf(run["metrics"]["ttft_s"]["samples"]) for run in runs
                if run["metrics"].get("ttft_s")}  # fmt: skip
        if cdfs:
            title = f"{name}: distribution of TTFT over requests, one curve per run"
            out.append(
                Plot(f"{base}.ttft-cdf", title, lambda c=cdfs, t=title: draw_cdfs(c, t, what="TTFT", of="requests"))
            )
    if kind == "train":
        curves = train_plots.loss_curves(runs, run_label)
        if curves.runs:
            title = f"{name}: training loss per step, every layout on one chart"
            title += "; dashed: the single-device baseline" if curves.baselines else ""
            draw = lambda c=curves, t=title: train_plots.draw_loss_curves(c, t, _figure)  # noqa: E731
            out.append(Plot(f"{base}.loss-curves", title, draw))
        sized = train_plots.expert_bytes_series(runs, run_label)
        if sized:
            title = f"{name}: routed-expert parameter bytes held per rank against num_experts, one line per layout"
            draw = lambda s=sized, t=title: train_plots.draw_expert_bytes(s, t, _figure)  # noqa: E731
            out.append(Plot(f"{base}.expert-bytes", title, draw))
    eplb = eplb_plots.eplb_series(runs, run_label)
    if eplb:
        title = eplb_plots.title(doc)
        draw = lambda e=eplb, t=title: eplb_plots.draw_eplb(e, t, _figure)  # noqa: E731
        out.append(Plot(f"{base}.eplb-balance", title, draw))
    for run in runs:
        panels = alert_plots.alert_panels(run)
        if panels:
            fired = sorted({a["name"] for a in run.get("alerts") or []})
            title = f"{name}{' ' + run_label(run['params']) if run['params'] else ''}: the alerts' series per step, "
            title += f"threshold dashed, fired spans shaded ({', '.join(fired) or 'none fired'})"
            stem = f"{base}.alerts" + (f".{slug(run_label(run['params']))}" if run["params"] else "")
            draw = lambda p=panels, t=title: alert_plots.draw_alerts(p, t, _figure)  # noqa: E731
            out.append(Plot(stem, title, draw))
    key = swept_key(runs)
    if key:
        panels = [(unit, what, series(runs, key, m)) for m, what, unit in SWEEP_PANELS]
        panels = [(f"{what} ({unit}, median)", what, data) for unit, what, data in panels if data]
        if panels:
            x_label = "ranks (world_size)" if key == "world_size" else "tokens per rank"
            title = f"{name}: {' and '.join(p[1] for p in panels)} against {x_label}"
            named = series_params(runs, key)
            draw = lambda p=panels, x=x_label, t=title, n=named: draw_series(p, x, t, n)  # noqa: E731
            out.append(Plot(f"{base}.sweep-{key}", title, draw))
    labels, bars = overlap_bars(runs)
    if labels:
        title = f"{name}: step time, all-to-all serial vs overlapped with expert compute; exposed communication"
        out.append(Plot(f"{base}.overlap", title, lambda lb=labels, b=bars, t=title: draw_overlap(lb, b, t)))
    hits = hit_rate_series(runs)
    if hits:
        named = series_params(runs, "cache_slots")
        layout = series_layout(list(named.values()))
        per = [k for k in (layout.colour, layout.style, *layout.facet) if k]
        title = f"{name}: expert cache hit rate against cache size" + (f", per {' and '.join(per)}" if per else "")
        panel = [("cache hit rate (fraction of expert accesses)", "hit rate", hits)]
        draw = lambda p=panel, t=title, n=named: draw_series(p, "cache slots per layer", t, n)  # noqa: E731
        out.append(Plot(f"{base}.hit-rate", title, draw))
    return out
