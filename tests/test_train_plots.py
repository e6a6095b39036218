"""The train plots' data, built from hand-made result runs to the train contract: loss per step per run
with the single-device baseline once per global batch, and expert bytes per rank against num_experts;
then drawn to PNG files."""

from __future__ import annotations

import math

import pytest

from moebench.report import plots as P
from moebench.report.train_plots import byte_unit, expert_bytes_series, loss_curves

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPERT_BYTES = 3 * 64 * 128 * 4  # one routed expert's parameters (float32), bytes


def _curve(losses: list) -> list[dict]:
    return [
        {"step": i, "loss": loss, "aux_loss": 1.0, "z_loss": 0.5, "grad_norm": 2.0, "step_time_s": 0.004,
         "tokens_dropped": 0}
        for i, loss in enumerate(losses)
    ]  # fmt: skip


def _run(params: dict, losses=(3.0, 2.0, 1.5), *, base=None, global_tokens=512, status="ok", curve=True) -> dict:
    """One train run; ``base``: the single-device baseline's losses (world_size 1 is its own baseline)."""
    world, experts = params.get("world_size", 1), params.get("num_experts", 8)
    held = experts // world if params.get("mode", "ep") == "ep" else experts
    details = {
        "curve": _curve(list(losses)) if curve else [],
        "baseline": "self" if world == 1 else "single-device",
        "global_tokens": global_tokens,
        "tokens_per_rank": global_tokens // world,
        "steps": len(losses),
        "memory": {"param_bytes": 10**6, "grad_bytes": 10**6, "optimizer_bytes": 2 * 10**6,
                   "activation_bytes": 10**5, "expert_param_bytes": held * EXPERT_BYTES},
    }  # fmt: skip
    if world > 1:
        details["baseline_curve"] = _curve(list(base or [l + 0.01 for l in losses]))
    metrics = {"loss_final": {"median": losses[-1], "samples": [losses[-1]], "unit": "", "better": "lower"},
               "tokens_per_s_per_gpu": {"median": 1000.0 / world, "samples": [1000.0 / world], "unit": "tokens/s",
                                        "better": "higher"}}  # fmt: skip
    return {"params": params, "metrics": metrics, "checks": [], "status": status, "details": details}


def _doc(runs: list[dict]) -> dict:
    return {"scenario": {"scenario": {"name": "t", "kind": "train"}}, "runs": runs}


def _ep_dp_runs() -> list[dict]:
    """num_experts 16, 4, 8 (not in order) for EP and DP at two ranks, a one-rank EP run at 8 experts."""
    runs = [
        _run({"world_size": 2, "mode": mode, "num_experts": e}, base=[3.0 + e / 100, 2.0, 1.0])
        for e in (16, 4, 8)
        for mode in ("ep", "dp")
    ]
    return [*runs, _run({"world_size": 1, "mode": "ep", "num_experts": 8})]


# -------------------------------------------------------------------------------------------
# loss curves


def test_loss_curves_are_each_ok_runs_steps_and_losses_leaving_out_failed_runs_and_runs_without_a_curve():
    runs = [
        _run({"world_size": 2, "mode": "ep"}, [4.0, None, 2.0], base=[4.5, 3.5, 2.5]),
        _run({"world_size": 2, "mode": "dp"}, [4.1, 3.1, 2.1]),
        _run({"world_size": 4, "mode": "ep"}, [9.0, 9.0, 9.0], status="error", global_tokens=1024),
        _run({"world_size": 4, "mode": "dp"}, curve=False, global_tokens=2048),
    ]
    curves = loss_curves(runs, P.run_label)
    assert list(curves.runs) == ["world_size=2, mode=ep", "world_size=2, mode=dp"]
    steps, losses = curves.runs["world_size=2, mode=ep"]
    assert steps == [0, 1, 2] and losses[0] == 4.0 and math.isnan(losses[1]) and losses[2] == 2.0  # null: a gap
    assert curves.runs["world_size=2, mode=dp"] == ([0, 1, 2], [4.1, 3.1, 2.1])
    # the left-out runs' baselines (1024 and 2048 tokens) are not drawn either; the two ok runs share one
    assert curves.baselines == {"single device, 512 tokens/step": ([0, 1, 2], [4.5, 3.5, 2.5])}


def test_the_baseline_is_drawn_once_per_global_batch_and_never_for_a_run_that_is_its_own_baseline():
    runs = [
        _run({"world_size": 1}, [5.0, 4.0]),  # baseline "self": a run line, no dashed one
        _run({"world_size": 2, "mode": "ep"}, [5.0, 4.0], base=[5.0, 4.0]),
        _run({"world_size": 2, "mode": "dp"}, [5.0, 4.0], base=[7.0, 7.0]),  # same batch: not drawn again
        _run({"world_size": 4, "mode": "ep"}, [6.0, 3.0], base=[6.0, 3.0], global_tokens=1024),
    ]
    curves = loss_curves(runs, P.run_label)
    assert len(curves.runs) == 4
    assert curves.baselines == {
        "single device, 512 tokens/step": ([0, 1], [5.0, 4.0]),
        "single device, 1024 tokens/step": ([0, 1], [6.0, 3.0]),
    }


def test_runs_of_different_models_keep_their_own_baseline_named_by_the_models_params():
    curves = loss_curves(_ep_dp_runs(), P.run_label)
    assert curves.baselines == {
        f"single device, 512 tokens/step, num_experts={e}": ([0, 1, 2], [3.0 + e / 100, 2.0, 1.0]) for e in (16, 4, 8)
    }  # EP and DP of one model share it; recompute, mode and world_size only lay the same model out


# -------------------------------------------------------------------------------------------
# expert bytes per rank


def test_expert_bytes_follow_num_experts_ascending_as_e_over_w_under_ep_and_e_under_dp():
    series = expert_bytes_series(_ep_dp_runs(), P.run_label)
    assert series == {
        "world_size=2, mode=ep": ([4, 8, 16], [2 * EXPERT_BYTES, 4 * EXPERT_BYTES, 8 * EXPERT_BYTES]),
        "world_size=2, mode=dp": ([4, 8, 16], [4 * EXPERT_BYTES, 8 * EXPERT_BYTES, 16 * EXPERT_BYTES]),
        "world_size=1, mode=ep": ([8], [8 * EXPERT_BYTES]),
    }


def test_expert_bytes_leave_out_failed_runs_and_need_num_experts_swept_among_ok_runs():
    runs = _ep_dp_runs()
    for run in runs:
        run["status"] = "ok" if run["params"]["num_experts"] == 8 else "error"
    assert expert_bytes_series(runs, P.run_label) == {}  # one num_experts left among ok runs
    runs[0]["status"] = "ok"  # 16 experts, EP
    assert expert_bytes_series(runs, P.run_label)["world_size=2, mode=ep"] == (
        [8, 16],
        [4 * EXPERT_BYTES, 8 * EXPERT_BYTES],
    )
    unswept = [_run({"world_size": w, "mode": "ep"}) for w in (1, 2, 4)]
    assert expert_bytes_series(unswept, P.run_label) == {}


def test_byte_unit_reads_the_largest_value():
    assert byte_unit([512, 2**20]) == (2**20, "MiB")
    assert byte_unit([512, 2**20 - 1]) == (2**10, "KiB")
    assert byte_unit([1023]) == (1, "bytes")


# -------------------------------------------------------------------------------------------
# plots_for and drawing


def test_a_train_file_gets_loss_curves_and_expert_bytes_and_the_world_size_sweep():
    plots = P.plots_for(_doc(_ep_dp_runs()))
    assert [p.name for p in plots] == ["t.loss-curves", "t.expert-bytes", "t.sweep-world_size"]
    assert "dashed: the single-device baseline" in plots[0].title


def test_without_a_num_experts_sweep_or_a_baseline_there_is_no_expert_plot_and_no_dashed_line_named():
    doc = _doc([_run({"num_experts": 8}), _run({"num_experts": 8}, status="error")])
    plots = P.plots_for(doc)
    assert [p.name for p in plots] == ["t.loss-curves"]
    assert "dashed" not in plots[0].title
    assert P.plots_for(_doc([_run({"world_size": 2}, curve=False)])) == []  # nothing to draw


def test_each_train_plot_draws_its_data_and_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    runs = _ep_dp_runs()
    plots = {p.name: p for p in P.plots_for(_doc(runs))}
    loss_ax = plots["t.loss-curves"].draw().axes[0]
    assert loss_ax.get_yscale() == "log" and loss_ax.get_xlabel() == "optimizer step"
    dashed = [line for line in loss_ax.lines if line.get_linestyle() != "-"]
    assert len(loss_ax.lines) - len(dashed) == len(runs) and len(dashed) == 3  # one baseline per model
    bytes_ax = plots["t.expert-bytes"].draw().axes[0]
    assert bytes_ax.get_xscale() == "log" and "MiB" in bytes_ax.get_ylabel()  # DP at 16: 1.5 MiB
    ep = next(line for line in bytes_ax.lines if line.get_label() == "world_size=2, mode=ep")
    assert list(ep.get_xdata()) == [4, 8, 16] and list(ep.get_ydata()) == [0.1875, 0.375, 0.75]  # 2, 4, 8 experts
    for name, plot in plots.items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(P.png(plot.draw()))
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_SIGNATURE
