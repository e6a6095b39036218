"""``moebench run / list / report`` end to end on CPU gloo ranks, checked through the JSON they write."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moebench import runner
from moebench.cli import main
from moebench.measure.eplb import EPLB_METRICS
from moebench.measure.impl import IMPL_METRICS
from moebench.measure.offload import OFFLOAD_METRICS
from moebench.measure.overlap import OVERLAP_METRICS
from moebench.measure.series import ALERT_METRICS
from moebench.scenario import METRICS

TINY = """
[scenario]
name = "{name}"
kind = "{kind}"
warmup = 1
repeats = {repeats}

[model]
hidden = 16
ffn_hidden = 32
num_experts = 4
top_k = {top_k}
layers = 2

[routing]
capacity_factor = {capacity}

[parallel]
world_size = {world}
device = "cpu"

[workload]
tokens_per_rank = 32
skew = "{skew}"
"""


def tiny(
    tmp_path: Path, name="tiny", kind="throughput", world="[1, 2]", top_k=2, capacity=0.0, skew="uniform", repeats=3
):
    path = tmp_path / f"{name}.toml"
    path.write_text(TINY.format(**locals()))
    return path


@pytest.mark.multiproc
def test_run_writes_the_documented_json_and_report_prints_the_same_table(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny(tmp_path)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "tiny.json").read_text())
    assert doc["schema"] == "moebench.result/1" and doc["source"].endswith("tiny.toml")
    assert doc["scenario"]["parallel"]["world_size"] == [1, 2]
    env = doc["environment"]
    assert env["torch"] == torch.__version__ and {"git_sha", "git_dirty", "cpu", "gpus", "nccl"} <= env.keys()
    one, two = doc["runs"]
    assert (one["params"], two["params"]) == ({"world_size": 1}, {"world_size": 2})
    # every documented metric, but each run has one reference for its dispatch: the all-to-all at
    # W > 1, the local floors at W = 1; the overlap metrics only with overlap_chunks, the offload
    # ones only with [offload], the EPLB ones only with [eplb] interval, the alerts only with [alerts], the
    # impl ones only with [model] impl
    optional = set(OVERLAP_METRICS) | set(OFFLOAD_METRICS) | set(EPLB_METRICS) | set(ALERT_METRICS) | set(IMPL_METRICS)
    documented = set(METRICS["throughput"]) - optional
    with_a2a = {n for n in documented if "a2a" in n}
    assert documented - set(two["metrics"]) == {"dispatch_over_floor", "combine_over_floor"}
    assert documented - set(one["metrics"]) == with_a2a
    assert not optional & (set(one["metrics"]) | set(two["metrics"]))
    assert "alerts" not in one and "series" not in one["details"]  # nothing recorded without [alerts]
    for run in (one, two):
        m = run["metrics"]
        assert run["status"] == "ok" and run["backend"] == "gloo" and run["checks"][0]["pass"]
        assert len(m["step_time_s"]["samples"]) == 3 and m["step_time_s"]["unit"] == "s"
        tokens = 32 * run["world_size"]
        assert m["tokens_per_s"]["samples"] == pytest.approx([tokens / t for t in m["step_time_s"]["samples"]])
        # Dropless top-2: every copy of every token crosses twice per layer, 16 fp32 values each.
        assert m["bytes_per_token"]["median"] == 2 * 2 * 2 * 16 * 4 and m["tokens_dropped"]["median"] == 0
        telemetry = run["telemetry"]
        assert telemetry["available"] is False and telemetry["reason"] and telemetry["energy_j"] is None
        assert telemetry["peak_host_memory_bytes"] > 50 * 2**20
    busbw = two["metrics"]["a2a_busbw_gbps"]["median"]
    assert busbw == pytest.approx(two["metrics"]["a2a_algbw_gbps"]["median"] / 2)
    assert main(["report", str(out)]) == 0
    assert capsys.readouterr().out.strip() == printed.strip()  # rendered from the same JSON


@pytest.mark.multiproc
def test_load_balance_of_a_single_hot_expert_fails_the_default_gate(tmp_path, capsys):
    path = tiny(tmp_path, "hot", "load_balance", world=2, top_k=1, capacity=1.0, skew="single", repeats=2)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-telemetry"]) == 1  # an SLO failed
    (run,) = json.loads((out / "hot.json").read_text())["runs"]
    m = run["metrics"]
    assert m["imbalance_max_mean"]["median"] == 4.0  # all 64 copies on 1 of 4 experts
    assert m["load_cv"]["median"] == pytest.approx(math.sqrt(3))
    assert m["rank_imbalance_max_mean"]["median"] == 2.0  # its owner gets everything
    # Capacity ceil(1.0 * 64 / 4) = 16 per expert: 48 of 64 copies dropped per layer, 2 layers.
    assert m["tokens_dropped"]["median"] == 96 and m["tokens_dropped_fraction"]["median"] == 0.75
    assert [sum(layer["expert_tokens"]) for layer in run["details"]["layers"]] == [128, 128]  # 2 batches
    (gate,) = run["slo"]
    assert (gate["metric"], gate["limit"], gate["pass"]) == ("load_cv", 0.2, False)
    assert "telemetry switched off" in run["telemetry"]["reason"]
    assert "missed: max_load_cv" in capsys.readouterr().out


@pytest.mark.multiproc
@pytest.mark.slow
def test_equivalence_run_checks_output_and_gradients_against_fp64(tmp_path):
    path = tiny(tmp_path, "eq", "equivalence", world="[1, 2]", capacity=1.25, skew="zipf")
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 0
    runs = json.loads((out / "eq.json").read_text())["runs"]
    for run in runs:
        assert run["metrics"]["rel_error_forward"]["median"] < 1e-5
        assert run["metrics"]["rel_error_grad"]["median"] < 1e-5
        assert run["metrics"]["tokens_dropped"]["median"] > 0  # capacity 1.25 under zipf drops copies
        assert [c["pass"] for c in run["checks"]] == [True, True]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_failing_run_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    real = runner.launch

    def flaky(fn, world_size, *args, **kwargs):
        if world_size == 2:
            raise RuntimeError("planted rank failure\n  (traceback lines)\nRuntimeError: planted rank failure")
        return real(fn, world_size, *args, **kwargs)

    monkeypatch.setattr(runner, "launch", flaky)
    out = tmp_path / "out"
    assert main(["run", str(tiny(tmp_path, world="[2, 1]")), "--out", str(out)]) == 1
    bad, good = json.loads((out / "tiny.json").read_text())["runs"]
    assert bad["status"] == "error" and bad["error"] == "RuntimeError: RuntimeError: planted rank failure"
    assert good["status"] == "ok" and good["metrics"]["tokens_per_s"]["median"] > 0


def test_bad_scenario_is_one_line_exit_2_and_nothing_runs(tmp_path, capsys):
    good = tiny(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace("top_k = 2", "top_k = 9").replace('"tiny"', '"bad"'))
    out = tmp_path / "out"
    assert main(["run", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moebench: error: ") and "bad.toml" in err and "[model] top_k = 9" in err
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "nothere.toml"], "nothere.toml: no such file or folder"),
        (["report", "nothere"], "nothere: no such file or folder"),
        (["run", "scenarios", "--telemetry-interval", "0"], "--telemetry-interval = 0.0"),
        (["run", "scenarios", "--telemetry-interval", "nan"], "--telemetry-interval = nan"),
        (["run", "scenarios", "--out", "README.md/x"], "--out README.md/x: cannot write result files there"),
        (["report", "README.md"], "README.md: not a readable result file"),
        (["run", "scenarios", "--world-size", "64"], "world_size = 64 (from the command line) is invalid"),
    ],
)
def test_cli_usage_errors_are_one_line_with_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only host")
def test_cuda_scenarios_are_refused_on_a_cpu_host(tmp_path, capsys):
    path = tiny(tmp_path)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "cuda"'))
    assert main(["run", str(path)]) == 2
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_list_shows_the_shipped_scenarios(capsys):
    assert main(["list"]) == 0
    listed = {line.split()[0] for line in capsys.readouterr().out.splitlines()[2:] if line[:1].strip()}
    assert {"seed-throughput", "seed-zipf", "seed-load-balance", "equivalence-top2"} <= listed


@pytest.mark.multiproc
@pytest.mark.slow
def test_run_under_torchrun_uses_its_ranks_and_writes_once(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "moebench"]
    cmd += ["run", str(tiny(tmp_path)), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped, ran = json.loads((out / "tiny.json").read_text())["runs"]
    assert skipped["status"] == "skipped" and "torchrun started 2 ranks" in skipped["error"]
    assert ran["status"] == "ok" and ran["world_size"] == 2 and ran["metrics"]["a2a_busbw_gbps"]["median"] > 0
    assert proc.stdout.count("tiny (throughput)") == 1  # only rank 0 prints
    assert [p.name for p in out.iterdir()] == ["tiny.json"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "scenarios", "--repeats", "0"], "argument --repeats: 0: accepted an integer >= 1"),
        (["run", "scenarios", "--warmup", "-1"], "argument --warmup: -1: accepted an integer >= 0"),
        (["run"], "the following arguments are required: PATH"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_argument_errors_are_one_line_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"schema": "moebench.result/1"}, "scenario.scenario needs a name and a kind"),
        ({"schema": "moebench.result/2"}, "schema = 'moebench.result/2' is invalid"),
        ([1, 2], "schema = 'list' is invalid"),
    ],
)
def test_report_of_a_malformed_result_file_is_one_line_with_exit_2(tmp_path, capsys, doc, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
@pytest.mark.multiproc
def test_report_refuses_a_saved_file_whose_metric_was_corrupted(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(tiny(tmp_path, world="1", repeats=2)), "--out", str(out), "--no-telemetry"]) == 0
    doc = json.loads((out / "tiny.json").read_text())
    doc["runs"][0]["metrics"]["step_time_s"]["median"] = "fast"
    (out / "tiny.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["report", str(out)]) == 2
    assert "runs[0].metrics.step_time_s needs numeric" in capsys.readouterr().err
