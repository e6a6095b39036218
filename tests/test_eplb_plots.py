"""The EPLB plot, built from hand-made result runs to the ``details.eplb`` contract of
``moebench.measure.eplb.eplb_details``: each run's two passes per step, its moves and drift changes,
read back from the drawn figure's lines; and which result files get the plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moebench.report import plots as P
from moebench.report.eplb_plots import TARGET, drift_changes, eplb_series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ENV = {"git_sha": "0123456789abcdef", "git_dirty": True, "host": "box7", "gpus": [], "cpu": "Xeon", "cpu_count": 8}


def _eplb(steps: int = 12, interval: int = 4, drift_every: int = 0, seed: int = 0) -> dict:
    """A ``details.eplb`` record: distinct, seeded values per step, moves after every interval-th step."""
    rng = np.random.default_rng(seed)
    return {
        "interval": interval,
        "window": 3,
        "drift_every": drift_every,
        "balancedness_static": [round(float(v), 4) for v in rng.uniform(0.4, 0.6, steps)],
        "balancedness": [round(float(v), 4) for v in rng.uniform(0.85, 1.0, steps)],
        "step_time_static_s": [round(float(v), 6) for v in rng.uniform(0.02, 0.03, steps)],
        "step_time_s": [round(float(v), 6) for v in rng.uniform(0.01, 0.02, steps)],
        "moves": [{"after_step": s, "time_s": 0.001 * s} for s in range(interval - 1, steps - 1, interval)],
    }


def _run(params: dict, eplb: dict | None, status: str = "ok") -> dict:
    details = {"layers": []} | ({"eplb": eplb} if eplb is not None else {})
    metric = {"median": 1.0, "samples": [1.0], "unit": "ratio", "better": "higher"}
    return {"params": params, "metrics": {"balancedness": metric}, "checks": [], "status": status, "details": details}


def _doc(runs: list[dict], kind: str = "throughput") -> dict:
    return {"scenario": {"scenario": {"name": "lb2", "kind": kind}}, "environment": ENV, "runs": runs}


def _eplb_runs() -> list[dict]:
    return [
        _run({"drift_every": 0}, _eplb(seed=1)),
        _run({"drift_every": 5}, _eplb(drift_every=5, seed=2)),
    ]


# -------------------------------------------------------------------------------------------
# the data


def test_drift_changes_are_the_multiples_of_drift_every_below_the_step_count():
    assert drift_changes(5, 12) == [5, 10]
    assert drift_changes(4, 12) == [4, 8]  # 12 is past the last step (11)
    assert drift_changes(0, 12) == []
    assert drift_changes(16, 12) == []


def test_eplb_series_holds_both_passes_per_step_moves_between_steps_and_drift_before_the_changed_step():
    runs = _eplb_runs()
    series = eplb_series(runs, P.run_label)
    assert list(series) == ["drift_every=0", "drift_every=5"]
    plain, drifting = series["drift_every=0"], series["drift_every=5"]
    details = runs[1]["details"]["eplb"]
    assert drifting.balance == details["balancedness"] and drifting.balance_static == details["balancedness_static"]
    assert drifting.step_time_s == details["step_time_s"]
    assert drifting.step_time_static_s == details["step_time_static_s"]
    assert drifting.moves_x == [3.5, 7.5]  # after steps 3 and 7: between them and the next step
    assert drifting.drift_x == [4.5, 9.5]  # steps 5 and 10 are the first of a new epoch
    assert (drifting.interval, drifting.window, drifting.drift_every) == (4, 3, 5)
    assert plain.drift_x == [] and plain.moves_x == [3.5, 7.5]


def test_eplb_series_leaves_out_failed_runs_and_runs_without_eplb_and_reads_a_null_as_nan():
    eplb = _eplb()
    eplb["balancedness"][2] = None
    runs = [
        _run({"world_size": 2}, eplb),
        _run({"world_size": 4}, _eplb(), status="error"),
        _run({"world_size": 8}, None),  # interval 0: no details.eplb
    ]
    series = eplb_series(runs, P.run_label)
    assert list(series) == ["world_size=2"]
    kept = series["world_size=2"].balance
    assert math.isnan(kept[2]) and kept[3] == eplb["balancedness"][3]


def test_the_target_line_is_the_recovery_threshold_the_measurement_uses():
    from moebench.measure.eplb import RECOVERED

    assert TARGET == RECOVERED


# -------------------------------------------------------------------------------------------
# plots_for and drawing


@pytest.mark.parametrize("kind", ["throughput", "latency"])
def test_a_file_with_eplb_runs_gets_the_eplb_plot_and_one_without_does_not(kind):
    assert "lb2.eplb-balance" in [p.name for p in P.plots_for(_doc(_eplb_runs(), kind))]
    plain = _doc([_run({"world_size": 2}, None), _run({"world_size": 4}, None)], kind)
    assert "lb2.eplb-balance" not in [p.name for p in P.plots_for(plain)]
    failed = _doc([_run({"world_size": 2}, _eplb(), status="error")], kind)
    assert "lb2.eplb-balance" not in [p.name for p in P.plots_for(failed)]


def test_the_eplb_title_names_the_scenario_the_commit_and_the_machine():
    plot = next(p for p in P.plots_for(_doc(_eplb_runs())) if p.name == "lb2.eplb-balance")
    assert plot.title.startswith("lb2: ")
    assert "commit 0123456789 (dirty)" in plot.title and "box7: Xeon (8 cores)" in plot.title
    gpu = _doc(_eplb_runs()) | {"environment": ENV | {"gpus": ["NVIDIA H100"], "git_dirty": False}}
    title = next(p for p in P.plots_for(gpu) if p.name == "lb2.eplb-balance").title
    assert "commit 0123456789 · box7: NVIDIA H100" in title


def _gid(artists, gid: str) -> list:
    return [a for a in artists if a.get_gid() == gid]


def _left(patch) -> float:
    """An axvspan's left edge: a Rectangle from matplotlib 3.9, a Polygon (first vertex at xmin) before."""
    return patch.get_x() if hasattr(patch, "get_x") else float(patch.get_xy()[0][0])


def test_the_eplb_plot_draws_each_runs_passes_moves_drift_and_target_as_in_the_details(tmp_path):
    pytest.importorskip("matplotlib")
    runs = _eplb_runs()
    plot = next(p for p in P.plots_for(_doc(runs)) if p.name == "lb2.eplb-balance")
    fig = plot.draw()
    axes = fig.axes
    assert len(axes) == 2 * len(runs)  # per run: balancedness, step time
    for row, run in enumerate(runs):
        details = run["details"]["eplb"]
        balance_ax, time_ax = axes[2 * row], axes[2 * row + 1]
        assert balance_ax.get_title().startswith(P.run_label(run["params"]))
        passes = {line.get_label(): line for line in balance_ax.lines if line.get_gid() is None}
        assert set(passes) == {"static", "re-placed"}
        assert passes["static"].get_linestyle() == "--" and passes["re-placed"].get_linestyle() == "-"
        assert list(passes["static"].get_ydata()) == details["balancedness_static"]
        assert list(passes["re-placed"].get_ydata()) == details["balancedness"]
        assert list(passes["re-placed"].get_xdata()) == list(range(len(details["balancedness"])))
        (target,) = _gid(balance_ax.lines, "target")
        assert list(target.get_ydata()) == [0.9, 0.9]
        times = {line.get_label(): line for line in time_ax.lines if line.get_gid() is None}
        assert times["static"].get_linestyle() == "--" and times["re-placed"].get_linestyle() == "-"
        assert np.allclose(times["static"].get_ydata(), np.array(details["step_time_static_s"]) * 1e3)
        assert np.allclose(times["re-placed"].get_ydata(), np.array(details["step_time_s"]) * 1e3)
        for ax in (balance_ax, time_ax):
            assert [line.get_xdata()[0] for line in _gid(ax.lines, "move")] == [
                m["after_step"] + 0.5 for m in details["moves"]
            ]
            drift = [line.get_xdata()[0] for line in _gid(ax.lines, "drift")]
            assert drift == ([4.5, 9.5] if details["drift_every"] else [])
            shaded = [_left(p) for p in _gid(ax.patches, "drift-epoch")]
            assert shaded == ([4.5] if details["drift_every"] else [])  # epoch 1 (steps 5..9); epochs 0, 2 not
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "target balancedness 0.9" in legend and "drift: experts swap popularity" in legend
    path = tmp_path / f"{plot.name}.png"
    path.write_bytes(P.png(fig))
    assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE


def test_without_drift_the_eplb_plot_has_no_drift_marks_or_legend_entry():
    pytest.importorskip("matplotlib")
    doc = _doc([_run({}, _eplb(seed=3))])
    plot = next(p for p in P.plots_for(doc) if p.name == "lb2.eplb-balance")
    fig = plot.draw()
    assert fig.axes[0].get_title().startswith("the run (interval 4, window 3, no drift)")
    assert not _gid(fig.axes[0].lines, "drift") and not _gid(fig.axes[0].patches, "drift-epoch")
    assert len(_gid(fig.axes[0].lines, "move")) == 2
    assert not any("drift" in t.get_text() for t in fig.legends[0].get_texts())
