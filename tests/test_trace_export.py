"""``moebench run --trace DIR``: one Chrome trace per rank, of steps profiled after the timed windows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_cli import tiny

from moebench.cli import main
from moebench.launch.spawn import RankContext
from moebench.measure import common, profile_trace, timed
from moebench.scenario import load

RUNTIME = Path(__file__).resolve().parents[1] / "runtime"
CPU = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")


def _events(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    return doc["traceEvents"]


def _steps(events: list[dict]) -> list[dict]:
    """The ``step[i]`` ranges moebench puts around each profiled step, in time order."""
    return sorted((e for e in events if e.get("name", "").startswith("step[")), key=lambda e: e["ts"])


def _spec(tmp_path: Path, kind="latency", trace_dir: Path | None = None):
    spec = load(str(tiny(tmp_path, kind=kind, world=1)), {}).runs[0]
    return dataclasses.replace(spec, trace_dir=None if trace_dir is None else str(trace_dir))


@pytest.mark.multiproc
@pytest.mark.slow
def test_trace_writes_one_chrome_trace_per_rank_with_three_step_ranges(tmp_path):
    out, traces = tmp_path / "out", tmp_path / "traces"
    assert main(["run", str(tiny(tmp_path)), "--out", str(out), "--trace", str(traces), "--no-telemetry"]) == 0
    for run in json.loads((out / "tiny.json").read_text())["runs"]:
        world = run["world_size"]
        folder = traces / f"tiny-world_size={world}"
        files = [folder / f"rank{r}.json" for r in range(world)]
        assert run["profile_trace"] == {"paths": [str(f) for f in files]}
        assert sorted(folder.iterdir()) == files  # one file per rank, no temporary file left
        for rank, path in enumerate(files):
            doc = json.loads(path.read_text())
            assert doc["moebench"] == {
                "scenario": "tiny",
                "params": {"world_size": world},
                "rank": rank,
                "world_size": world,
                "steps": 3,
            }
            steps = _steps(doc["traceEvents"])
            assert [s["name"] for s in steps] == ["step[0]", "step[1]", "step[2]"]
            assert all(s["dur"] > 0 for s in steps) and len({s["tid"] for s in steps}) == 1
            # the steps ran: the expert GEMMs of both layers fall inside the first step's range
            first = steps[0]
            inside = [e for e in doc["traceEvents"] if first["ts"] <= e.get("ts", -1) <= first["ts"] + first["dur"]]
            assert sum(e["name"] == "aten::mm" for e in inside) >= 2
            if world > 1:  # gloo runs its collectives on its own threads: a separate row
                a2a = [e for e in doc["traceEvents"] if e.get("name") == "gloo:all_to_all"]
                assert a2a and {e["tid"] for e in a2a}.isdisjoint({first["tid"]})
        assert len(run["metrics"]["step_time_s"]["samples"]) == 3  # the repeats, and nothing profiled among them


def test_the_trace_is_taken_after_every_timed_window(tmp_path, monkeypatch):
    """The profiler's cost must never reach a measured sample: ``record`` runs once, last."""
    log = []

    def logged(name, fn):
        return lambda *a, **k: (log.append(name), fn(*a, **k))[1]

    monkeypatch.setattr(timed, "time_fn", logged("time_fn", timed.time_fn))
    monkeypatch.setattr(common, "time_interleaved", logged("time_interleaved", common.time_interleaved))
    monkeypatch.setattr(profile_trace, "record", lambda ctx, spec, step: log.append("trace") or {"path": "x"})
    spec = _spec(tmp_path, kind="throughput", trace_dir=tmp_path / "t")
    raw = timed.measure_timed(CPU, spec, None, collectives=True)
    assert raw["profile_trace"] == {"path": "x"} and len(raw["step"]) == 3
    assert log[-1] == "trace" and log.count("trace") == 1 and "time_interleaved" in log
    log.clear()
    assert "profile_trace" not in timed.measure_timed(CPU, _spec(tmp_path), None, collectives=False)
    assert "trace" not in log  # no --trace, no profiling


def test_record_profiles_three_steps_after_one_warmup_and_writes_atomically(tmp_path):
    calls = []

    def step():
        calls.append(1)
        return torch.ones(64, 64) @ torch.ones(64, 64)

    spec = _spec(tmp_path, trace_dir=tmp_path / "t" / "run")
    assert profile_trace.record(CPU, spec, step) == {"path": str(tmp_path / "t" / "run" / "rank0.json")}
    assert len(calls) == profile_trace.WARMUP + profile_trace.STEPS == 4
    steps = _steps(_events(tmp_path / "t" / "run" / "rank0.json"))
    assert [s["name"] for s in steps] == ["step[0]", "step[1]", "step[2]"]
    assert [p.name for p in (tmp_path / "t" / "run").iterdir()] == ["rank0.json"]


def test_a_trace_that_cannot_be_written_is_a_note_not_a_crash(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    spec = _spec(tmp_path, trace_dir=blocker / "run")
    found = profile_trace.record(CPU, spec, lambda: torch.ones(2) + 1)
    assert found["path"] is None and found["note"].startswith(f"rank 0: {blocker / 'run' / 'rank0.json'} not written")


def test_an_unwritable_trace_folder_is_one_line_exit_2_before_any_run(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    args = ["run", str(tiny(tmp_path)), "--out", str(tmp_path / "out"), "--trace", str(blocker / "t")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moebench: error: --trace {blocker / 't'}: cannot write profiler traces there")
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.multiproc
def test_a_kind_without_a_step_says_so_and_leaves_no_folder(tmp_path, capsys):
    out, traces = tmp_path / "out", tmp_path / "traces"
    path = tiny(tmp_path, kind="dispatch", world=1, repeats=2)
    assert main(["run", str(path), "--out", str(out), "--trace", str(traces), "--no-telemetry"]) == 0
    note = "kind = dispatch has no step to trace (--trace covers throughput and latency runs)"
    assert json.loads((out / "tiny.json").read_text())["runs"][0]["profile_trace"] == {"paths": [], "note": note}
    assert f"moebench: tiny: {note}" in capsys.readouterr().err.splitlines()
    assert not traces.exists()  # made for the run, removed again when nothing landed in it


def _layer_has_ranges() -> bool:
    """True once runtime/layer.py marks its stages (``runtime/ranges.py``)."""
    return "span(" in (RUNTIME / "layer.py").read_text()


@pytest.mark.skipif(not _layer_has_ranges(), reason="runtime/layer.py marks no ranges yet")
def test_trace_names_layer_stages(tmp_path):
    """Each profiled step holds, per layer, the layer's route, dispatch, experts and combine (serial: chunk 0)."""
    spec = _spec(tmp_path, trace_dir=tmp_path / "t")
    stack, _, x_TD = common.setup(CPU, spec)
    profile_trace.record(CPU, spec, common.step_fn(CPU, spec, stack, x_TD))
    events = _events(tmp_path / "t" / "rank0.json")
    steps, layers = _steps(events), spec.model["layers"]
    for name in ("route", "dispatch[0]", "experts[0]", "combine[0]"):
        found = [e for e in events if e.get("name") == name]
        assert len(found) == profile_trace.STEPS * layers, name
        for s in steps:  # nested in the step ranges, one per layer each
            within = [e for e in found if s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"]]
            assert len(within) == layers, name
