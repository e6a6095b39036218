"""The overlap measurement: its metrics on planted rounds, the four timed functions (each makes the
collectives it should, and the raw all-to-alls are exactly the overlapped step's), the mode switch
that always restores the layers, the scenario key, the tables, and a whole 2-rank run."""

from __future__ import annotations

import pytest
import torch
from test_results import RAW, spec
from test_scenario import MINIMAL, with_key, write

from moebench import kinds, runner
from moebench.launch.spawn import launch
from moebench.measure import common
from moebench.measure import overlap as O
from moebench.report.results import SCHEMA, read, render
from moebench.scenario import ScenarioError, load
from runtime.dispatch import Chunk, DispatchMeta

# Three rounds. serial / overlapped = 2, 1.5, 2; overlapped − compute_only = 0.02, −0.01, 0.05;
# 1 − exposed / a2a_alone = 0.5, 1.5, 0.5.
ROUNDS = {
    "overlapped": [0.1, 0.2, 0.2],
    "serial": [0.2, 0.3, 0.4],
    "compute_only": [0.08, 0.21, 0.15],
    "a2a_alone": [0.04, 0.02, 0.1],
}


@pytest.mark.parametrize("kind", ["throughput", "latency"])
def test_the_overlap_metrics_follow_their_formulas_round_by_round(kind):
    metrics, _, _ = kinds.evaluate(spec(kind), [RAW | {"overlap": ROUNDS}, RAW])
    speedup = metrics["overlap_speedup"]
    assert speedup["samples"] == pytest.approx([2.0, 1.5, 2.0])  # serial / overlapped, not its inverse
    assert speedup["median"] == pytest.approx(2.0) and speedup["better"] == "higher"
    exposed = metrics["exposed_comm_s"]
    assert exposed["samples"] == pytest.approx([0.02, -0.01, 0.05])  # against compute_only; the sign is kept
    assert exposed["unit"] == "s" and exposed["better"] == "lower"
    efficiency = metrics["overlap_efficiency"]
    assert efficiency["samples"] == pytest.approx([0.5, 1.5, 0.5]) and efficiency["better"] == "higher"
    assert metrics["serial_step_time_s"]["samples"] == ROUNDS["serial"]
    assert metrics["compute_only_time_s"]["samples"] == ROUNDS["compute_only"]
    assert metrics["a2a_alone_time_s"]["median"] == pytest.approx(0.04)
    assert set(O.OVERLAP_METRICS) <= set(kinds.get(kind).metrics)


def test_a_run_without_overlap_chunks_reports_no_overlap_metric():
    metrics, _, _ = kinds.evaluate(spec("throughput"), [RAW, RAW])
    assert not set(O.OVERLAP_METRICS) & set(metrics)


def test_efficiency_is_one_when_all_is_hidden_and_zero_when_nothing_is():
    rounds = {"overlapped": [1.0, 1.5], "serial": [1.5, 1.5], "compute_only": [1.0, 1.0], "a2a_alone": [0.5, 0.5]}
    metrics = O.overlap_metrics({"overlap": rounds})
    assert metrics["overlap_efficiency"]["samples"] == [1.0, 0.0]
    assert metrics["overlap_speedup"]["samples"] == [1.5, 1.0]


# -------------------------------------------------------------------------------------------
# The tables


def _table_run(metrics: dict, params: dict) -> dict:
    record = {"unit": "s", "median": 0.5, "p90": 0.5, "p99": 0.5, "min": 0.5, "max": 0.5, "n": 3}
    return {
        "params": params,
        "world_size": 2,
        "device": "cpu",
        "backend": "gloo",
        "status": "ok",
        "error": None,
        "metrics": {name: record for name in metrics},
        "checks": [],
        "slo": [],
        "telemetry": {},
    }


def _table(runs: list[dict]) -> str:
    doc = {
        "schema": SCHEMA,
        "source": "scenarios/t.toml",
        "scenario": {"scenario": {"name": "t", "kind": "throughput"}},
        "columns": [list(column) for column in kinds.get("throughput").columns],
        "environment": {"git_sha": "abc"},
        "runs": runs,
    }
    return render(doc).splitlines()[2]  # the header line


def test_overlap_columns_show_only_where_a_run_measured_them():
    plain = ("step_time_s", "tokens_per_s", "a2a_busbw_gbps")
    header = _table([_table_run(plain, {"world_size": 2})])
    assert "step p50 (ms)" in header and "a2a busbw" in header
    assert not any(h in header for _, h, _, _ in O.OVERLAP_COLUMNS)  # no empty columns of "-"
    both = [_table_run(plain, {"overlap_chunks": 1}), _table_run((*plain, *O.OVERLAP_METRICS), {"overlap_chunks": 2})]
    header = _table(both)
    assert all(h in header for _, h, _, _ in O.OVERLAP_COLUMNS)
    assert "dispatch/floor" not in header  # measured by no run (W = 1 only)


# -------------------------------------------------------------------------------------------
# The mode switch and the raw all-to-alls


class _Layer:
    """The schedule part of an ``MoELayer``: read attributes, changed only through ``set_schedule``."""

    def __init__(self):
        self.overlap_chunks, self.transport = 4, "collective"

    def set_schedule(self, overlap_chunks=None, transport=None):
        self.overlap_chunks = self.overlap_chunks if overlap_chunks is None else overlap_chunks
        self.transport = self.transport if transport is None else transport


def test_the_mode_switch_restores_chunks_and_transport_even_when_the_step_raises():
    stack = type("S", (), {"layers": [_Layer(), _Layer()]})()
    seen = []

    def failing_step():
        seen.append([(layer.overlap_chunks, layer.transport) for layer in stack.layers])
        raise RuntimeError("planted")

    with pytest.raises(RuntimeError, match="planted"):
        O.in_mode(failing_step, stack, chunks=1, transport="local_copy")()
    assert seen == [[(1, "local_copy"), (1, "local_copy")]]
    assert [(layer.overlap_chunks, layer.transport) for layer in stack.layers] == [(4, "collective")] * 2
    with O.stack_mode(stack, transport="local_copy"):
        assert [layer.overlap_chunks for layer in stack.layers] == [4, 4]  # chunks untouched when not given
    assert stack.layers[0].transport == "collective"


def _meta(*chunks: tuple[list[int], list[int]]) -> DispatchMeta:
    """A plan whose chunks have these (input_splits, output_splits)."""
    made = [Chunk(slice(0, 0), i, o, [], [], None, None, None) for i, o in chunks]
    return DispatchMeta(num_tokens=0, top_k=1, order_P=torch.empty(0), token_P=torch.empty(0), chunks=tuple(made))


def test_the_raw_all_to_alls_are_each_chunks_dispatch_and_combine_and_in_training_their_reverses():
    metas = [_meta(([1, 2], [3, 4]), ([5, 6], [7, 8])), _meta(([0, 9], [9, 0]))]
    forward = [
        ([3, 4], [1, 2]),  # layer 0 chunk 0 dispatch: (output_splits, input_splits)
        ([1, 2], [3, 4]),  # its combine, splits swapped
        ([7, 8], [5, 6]),
        ([5, 6], [7, 8]),
        ([9, 0], [0, 9]),  # layer 1
        ([0, 9], [9, 0]),
    ]
    assert O.a2a_exchanges(metas, train=False) == forward
    backward = O.a2a_exchanges(metas, train=True)[len(forward) :]
    assert backward == [(i, o) for o, i in reversed(forward)]


# -------------------------------------------------------------------------------------------
# On two gloo ranks


def _functions_rank(ctx, s) -> dict:
    """Which ``all_to_all_single`` calls each of the four functions makes, as (output, input) splits."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    stack, _, x_TD = common.setup(ctx, s)
    fns = O.overlap_functions(ctx, s, stack, x_TD)
    calls, a2a = [], dist.all_to_all_single

    def counted(out, x, output_splits=None, input_splits=None, **kw):
        calls.append((list(output_splits), list(input_splits)))
        return a2a(out, x, output_splits, input_splits, **kw)

    made = {}
    dist.all_to_all_single = counted
    try:
        for name, fn in fns.items():
            calls.clear()
            fn()
            made[name] = sorted(calls)
    finally:
        dist.all_to_all_single = a2a
    chunks = [(layer.overlap_chunks, layer.transport) for layer in stack.layers]
    return {"made": made, "layers": chunks}


@pytest.mark.multiproc
@pytest.mark.parametrize("train", [False, True])
def test_each_function_makes_the_collectives_it_should(tmp_path, train):
    doc = with_key("parallel", "world_size", 2)
    doc["parallel"] |= {"overlap_chunks": 3, "device": "cpu"}
    doc["model"] |= {"top_k": 2, "layers": 2}
    doc["workload"] |= {"train": train}
    (s,) = load(write(tmp_path, doc)).runs
    for rank in launch(_functions_rank, 2, s, device="cpu", backend="gloo"):
        made = rank["made"]
        per_layer = 2 * (2 if train else 1)  # dispatch + combine (and their reverses in backward)
        assert len(made["overlapped"]) == 2 * 3 * per_layer  # 2 layers x 3 chunks
        assert made["a2a_alone"] == made["overlapped"]  # the same calls, with the same splits
        assert len(made["serial"]) == 2 * per_layer  # one chunk per layer
        assert made["compute_only"] == []  # every exchange a local copy
        assert rank["layers"] == [(3, "collective")] * 2  # the switch left the layers as they were


@pytest.mark.multiproc
@pytest.mark.slow
def test_a_two_rank_run_with_overlap_chunks_reports_every_overlap_metric(tmp_path):
    doc = with_key("parallel", "world_size", 2)
    doc["parallel"] |= {"overlap_chunks": [1, 2], "device": "cpu", "threads_per_rank": 1}
    doc["model"] |= {"top_k": 2}
    doc["scenario"] |= {"warmup": 1, "repeats": 3}
    sc = load(write(tmp_path, doc))
    assert runner.run_scenarios([sc], tmp_path / "out", None) == 0
    runs = read(tmp_path / "out" / "t.json")["runs"]
    assert [run["params"] for run in runs] == [{"overlap_chunks": 1}, {"overlap_chunks": 2}]
    for run in runs:
        assert {name: run["metrics"][name]["n"] for name in O.OVERLAP_METRICS} == dict.fromkeys(O.OVERLAP_METRICS, 3)
        assert run["config"]["parallel"]["overlap_chunks"] == run["params"]["overlap_chunks"]


# -------------------------------------------------------------------------------------------
# The scenario key


def test_overlap_chunks_is_unset_by_default_and_a_list_sweeps_it(tmp_path):
    (run,) = load(write(tmp_path, MINIMAL)).runs
    assert run.parallel["overlap_chunks"] is None and run.parallel_config().overlap_chunks == 1
    runs = load(write(tmp_path, with_key("parallel", "overlap_chunks", [1, 4]))).runs
    assert [r.parallel_config().overlap_chunks for r in runs] == [1, 4]
    assert [r.params for r in runs] == [{"overlap_chunks": 1}, {"overlap_chunks": 4}]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (with_key("parallel", "overlap_chunks", 0), "[parallel] overlap_chunks = 0 is invalid: accepted an integer"),
        (with_key("parallel", "overlap_chunks", 2.0), "[parallel] overlap_chunks = 2.0 is invalid: accepted an"),
        (with_key("parallel", "overlap_chunks", True), "[parallel] overlap_chunks = true is invalid"),
        (with_key("parallel", "overlap_chunks", [2, 2]), "[parallel] overlap_chunks = [2, 2] is invalid"),
        (with_key("parallel", "overlap_chunks", [1, -1]), "[parallel] overlap_chunks = -1 is invalid"),
        (
            with_key("parallel", "overlap_chunks", 2) | {"scenario": {"name": "t", "kind": "dispatch"}},
            '[parallel] overlap_chunks = 2 is invalid for kind = "dispatch": accepted only with kind "throughput"',
        ),
    ],
)
def test_bad_overlap_chunks_give_one_line_naming_the_key_and_what_is_accepted(tmp_path, doc, expected):
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message
