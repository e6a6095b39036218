"""The equivalence kind checks chunked, overlapped all-to-alls (``[parallel] overlap_chunks``): a
scenario with chunks runs its case through the pipelined layer and passes the fp64 comparison, and
a chunk the experts read before its all-to-all landed (what a missing stream hand-off does on a
GPU) fails the comparison only when the all-to-alls are chunked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from moebench import kinds, runner
from moebench.kinds import equivalence
from moebench.launch.spawn import RankContext
from moebench.scenario import load
from runtime.dispatch import Dispatcher
from runtime.stack import MoEStack

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "scenarios" / "sweeps" / "equivalence-overlap.toml"


@pytest.fixture
def one_rank():
    """A one-rank gloo group in this process: the case's forced all-to-all path at EP 1, no spawning."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield RankContext(rank=0, world_size=1, group=dist.group.WORLD, device=torch.device("cpu"), backend="gloo")
    dist.destroy_process_group()


def _spec(chunks: int, world_size: int):
    """The shipped scenario's run with ``chunks``, at ``world_size``."""
    (spec,) = [s for s in load(SHIPPED, {("parallel", "world_size"): world_size}).runs if s.params == {
        "overlap_chunks": chunks
    }]  # fmt: skip
    return spec


@pytest.mark.parametrize("chunks", [1, 4])
def test_the_case_carries_the_scenarios_chunks_into_the_layer_on_the_collective_path(one_rank, chunks):
    case = equivalence.case(_spec(chunks, 1))
    assert case.parallel(2).overlap_chunks == chunks and case.dispatcher == "all_to_all"
    weights, _, _ = equivalence.make_inputs(case)
    stack = MoEStack(case.moe, case.parallel(1), weights, one_rank.group, one_rank.device, case.dispatcher)
    assert [layer.overlap_chunks for layer in stack.layers] == [chunks, chunks]  # both layers pipeline
    assert [type(layer.dispatcher).__name__ for layer in stack.layers] == ["AllToAllDispatcher"] * 2


@pytest.mark.slow  # the layer-level overlap equivalence tests stay in the unit suite
@pytest.mark.multiproc
def test_an_overlap_chunks_4_scenario_at_ep2_runs_and_passes_its_rel_error_check():
    spec = _spec(4, 2)
    run = runner.run_one(spec, None)
    assert run["status"] == "ok", run["error"]
    assert run["world_size"] == 2 and run["config"]["parallel"]["overlap_chunks"] == 4
    assert {c["name"]: c["pass"] for c in run["checks"]} == {
        "rel_error_within_tolerance": True,
        "tokens_dropped_match_reference": True,
    }
    tol = equivalence.TOLERANCE["float32"]
    assert run["metrics"]["rel_error_forward"]["median"] <= tol and run["metrics"]["rel_error_grad"]["median"] <= tol
    assert run["metrics"]["tokens_dropped"]["median"] > 0  # capacity 1.25 under zipf skew: dropping is covered


def _stale_later_chunks(monkeypatch) -> None:
    """Plant the race: every chunk after the first reaches the experts as a buffer its all-to-all had
    not written yet (zeros). The serial path's single chunk starts at row 0 and is left alone."""
    real = Dispatcher.to_expert_major

    def stale(x_RD, chunk):
        x_RD = real(x_RD, chunk)
        return torch.zeros_like(x_RD) if chunk.rows.start > 0 else x_RD

    monkeypatch.setattr(Dispatcher, "to_expert_major", staticmethod(stale))


@pytest.mark.parametrize("chunks, caught", [(4, True), (1, False)])
def test_a_chunk_read_before_its_all_to_all_landed_fails_the_check_only_when_chunked(
    one_rank, monkeypatch, chunks, caught
):
    spec = _spec(chunks, 1)
    _stale_later_chunks(monkeypatch)
    rank = equivalence.run_rank(one_rank, equivalence.case(spec))
    metrics, checks, _ = kinds.evaluate(spec, [rank])
    assert checks[0]["name"] == "rel_error_within_tolerance" and checks[0]["pass"] is not caught
    if caught:
        assert metrics["rel_error_forward"]["median"] > 100 * equivalence.TOLERANCE["float32"]
