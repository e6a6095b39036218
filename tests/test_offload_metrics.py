"""The offload measurement (moebench/measure/offload.py): its metrics from hand-made rounds,
the ``[offload]`` scenario section, and a whole run that reports every metric."""

from __future__ import annotations

import pytest
from test_results import spec
from test_scenario import MINIMAL, with_key, write

from moebench import runner
from moebench.kinds import equivalence
from moebench.launch.spawn import RankContext
from moebench.measure import offload as O
from moebench.report.results import read
from moebench.scenario import ScenarioError, load


def _layer(accesses, hits, h2d_bytes, copy_s, predicted=0, used=0, needed=None) -> dict:
    return {
        "accesses": accesses,
        "hits": hits,
        "misses_E": [accesses - hits, 0],
        "copied_experts": h2d_bytes // 100,
        "needed_copies": accesses - hits if needed is None else needed,
        "h2d_bytes": h2d_bytes,
        "copy_s": copy_s,
        "predicted": predicted,
        "predicted_used": used,
    }


def test_offload_metrics_from_hand_made_rounds_and_counters():
    s = spec("throughput", world=2)  # 100 tokens per rank
    rounds = {"offload": [0.3, 0.2, 0.6], "resident": [0.1, 0.2, 0.2], "h2d_copy": [1e-6, 2e-6, 4e-6]}
    rank0 = {"offload": rounds, "offload_layers": [_layer(10, 6, 400, 2e-7, 4, 3)], "expert_bytes": 100}
    rank1 = {"offload": rounds, "offload_layers": [_layer(10, 4, 800, 6e-7, 4, 1)], "expert_bytes": 100}
    m = O.offload_metrics(s, [rank0, rank1])
    assert m["cache_hit_rate"]["median"] == 10 / 20
    assert m["prefetch_accuracy"]["median"] == 4 / 8
    assert m["h2d_bytes_per_token"]["median"] == 1200 / (2 * 100 * 3)  # bytes / tokens of 3 rounds
    assert m["h2d_gbps"]["median"] == pytest.approx(1200 / 8e-7 / 1e9)
    assert m["h2d_peak_gbps"]["samples"] == pytest.approx([0.1, 0.05, 0.025])  # 100 B per copy
    assert m["offload_over_resident"]["samples"] == pytest.approx([3.0, 1.0, 3.0])
    # bound: the busiest rank needs 6 copies of 100 B in 3 steps, 200 B per step; at the median
    # peak, 0.05 GB/s, 4e-6 s: below every resident step, so the bound is the resident step
    assert m["offload_over_bound"]["samples"] == pytest.approx([3.0, 1.0, 3.0])
    assert m["offload_step_time_s"]["median"] == 0.3 and m["resident_step_time_s"]["median"] == 0.2
    assert O.offload_details([rank0, rank1])["offload"][1][0]["misses_E"] == [6, 0]


def test_the_bound_is_the_copy_time_when_copies_dominate_and_unmeasured_metrics_are_left_out():
    s = spec("throughput", world=1)
    rounds = {"offload": [0.5, 0.5, 0.5], "resident": [0.1, 0.1, 0.1], "h2d_copy": [1.0, 1.0, 1.0]}
    raw = {"offload": rounds, "offload_layers": [_layer(3, 0, 3 * 10**8, 3.0)], "expert_bytes": 10**8}
    m = O.offload_metrics(s, [raw])
    # per step 1e8 B at the peak of 0.1 GB/s: 1 s > the 0.1 s resident step
    assert m["offload_over_bound"]["samples"] == pytest.approx([0.5] * 3)
    assert "prefetch_accuracy" not in m  # no prefetch named anything
    full = {"offload": rounds, "offload_layers": [_layer(3, 3, 0, 0.0)], "expert_bytes": 10**8}
    assert "h2d_gbps" not in O.offload_metrics(s, [full])  # nothing copied: no rate to report
    assert O.offload_metrics(s, [{"step": [1.0]}]) == {}  # a run without [offload]


def test_the_bound_takes_the_busiest_ranks_needed_copies_at_the_median_peak_of_an_even_count():
    s = spec("throughput", world=2)
    rounds = {"offload": [4.0] * 4, "resident": [1.0] * 4, "h2d_copy": [1.0, 2.0, 4.0, 8.0]}
    # 100-byte experts: peaks 1e-7, 5e-8, 2.5e-8, 1.25e-8 GB/s; the median of four, 3.75e-8 GB/s
    # rank 1 needs 12 copies in 4 steps (2 of its 14 copies were wasted guesses), rank 0 needs 4
    rank0 = {"offload": rounds, "offload_layers": [_layer(8, 4, 400, 1.0)], "expert_bytes": 100}
    rank1 = {"offload": rounds, "offload_layers": [_layer(20, 8, 1400, 1.0, 6, 4, needed=12)], "expert_bytes": 100}
    m = O.offload_metrics(s, [rank0, rank1])
    needed_s = 12 * 100 / 4 / 3.75e-8 / 1e9  # 8 s a step: above the 1 s resident step
    assert m["offload_over_bound"]["samples"] == pytest.approx([4.0 / needed_s] * 4)
    assert m["h2d_peak_gbps"]["median"] == pytest.approx(3.75e-8)


def test_offload_is_unset_by_default_and_each_key_sweeps(tmp_path):
    (run,) = load(write(tmp_path, MINIMAL)).runs
    assert run.offload == {"cache_slots": None, "policy": "lru", "prefetch": "none"}
    assert "offload" not in run.resolved() and O.offload_config(run) is None
    assert run.moe_config().expert_backend == "auto"
    doc = with_key("offload", "cache_slots", [1, 2])
    doc["offload"] |= {"policy": ["lru", "belady"], "prefetch": "oracle"}
    runs = load(write(tmp_path, doc)).runs
    assert [r.params for r in runs] == [{"cache_slots": c, "policy": p} for c in (1, 2) for p in ("lru", "belady")]
    assert runs[-1].resolved()["offload"] == {"cache_slots": 2, "policy": "belady", "prefetch": "oracle"}
    assert runs[-1].moe_config().expert_backend == "loop"  # "auto" with offload: the offloaded arithmetic


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"offload": {"cache_slots": 0}}, "[offload] cache_slots = 0 is invalid: accepted an integer"),
        ({"offload": {"cache_slots": 2, "policy": "fifo"}}, '[offload] policy = "fifo" is invalid: accepted one of'),
        ({"offload": {"cache_slots": 5}}, "[offload] cache_slots = 5 is invalid: accepted 1 to 4 (experts per rank)"),
        (
            {"offload": {"cache_slots": 2}, "scenario": {"kind": "dispatch"}},
            '[offload] cache_slots = 2 is invalid for kind = "dispatch": accepted only with kind "throughput" or',
        ),
        (
            {"offload": {"cache_slots": 2}, "workload": {"train": True}},
            "[offload] cache_slots = 2 is invalid with [workload] train = true: offload is inference-only",
        ),
        (
            {"offload": {"cache_slots": 2}, "parallel": {"overlap_chunks": 2}},
            "[offload] cache_slots = 2 is invalid with [parallel] overlap_chunks = 2: accepted overlap_chunks 1",
        ),
        (
            {"workload": {"steps": 4, "train": True}},
            "[workload] steps = 4 is invalid with train = true: accepted steps = 1",
        ),
        (
            {"workload": {"steps": 4}, "scenario": {"kind": "dispatch"}},
            '[workload] steps = 4 is invalid for kind = "dispatch": accepted only with kind "throughput" or "latency"',
        ),
        (
            {"offload": {"cache_slots": 2}, "model": {"expert_backend": "bmm"}},
            '[offload] cache_slots = 2 is invalid with [model] expert_backend = "bmm": accepted "auto" or "loop"',
        ),
        (
            {"offload": {"policy": "lfu"}},
            '[offload] policy = "lfu" without cache_slots is invalid: accepted it with cache_slots = N',
        ),
        (
            {"offload": {"prefetch": ["oracle", "none"]}},
            '[offload] prefetch = ["oracle", "none"] without cache_slots is invalid',
        ),
        (
            {"offload": {"cache_slots": 2}, "scenario": {"kind": "equivalence"}, "workload": {"steps": 3}},
            '[workload] steps = 3 is invalid for kind = "equivalence": accepted only with kind "throughput" or',
        ),
    ],
)
def test_bad_offload_settings_are_refused_in_one_line(tmp_path, changes, expected):
    doc = {s: dict(t) for s, t in MINIMAL.items()}  # 4 experts, 1 rank
    for section, values in changes.items():
        doc.setdefault(section, {}).update(values)
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load(path)
    message = str(err.value)
    assert expected in message and "\n" not in message and str(path) in message


@pytest.mark.multiproc
def test_a_run_with_offload_reports_every_metric_and_a_full_cache_always_hits(tmp_path):
    doc = with_key("offload", "cache_slots", [1, 4])
    doc["offload"] |= {"policy": "belady", "prefetch": "oracle"}
    doc["model"] |= {"top_k": 2, "layers": 2}
    doc["workload"] |= {"tokens_per_rank": 2, "steps": 5, "correlation": 0.5}
    doc["parallel"] = {"device": "cpu", "threads_per_rank": 1}
    doc["scenario"] |= {"warmup": 5, "repeats": 4}
    assert runner.run_scenarios([load(write(tmp_path, doc))], tmp_path / "out", None) == 0
    one, full = read(tmp_path / "out" / "t.json")["runs"]
    for run in (one, full):
        measured = {name for name in O.OFFLOAD_METRICS if name in run["metrics"]}
        assert measured >= set(O.OFFLOAD_METRICS) - {"h2d_gbps"}
        assert run["metrics"]["prefetch_accuracy"]["median"] == 1.0  # the oracle
        assert len(run["details"]["offload"][0]) == 2  # rank 0's two layers
    assert full["metrics"]["cache_hit_rate"]["median"] == 1.0  # warmed over the whole 5-step stream
    assert full["metrics"]["h2d_bytes_per_token"]["median"] == 0
    assert one["metrics"]["h2d_bytes_per_token"]["median"] > 0
    assert one["config"]["offload"] == {"cache_slots": 1, "policy": "belady", "prefetch": "oracle"}


@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_equivalence_with_offload_compares_the_forward_and_checks_it_bitwise_against_resident(tmp_path, policy):
    import torch

    doc = with_key("offload", "cache_slots", 1)
    doc["offload"]["policy"] = policy
    doc["scenario"]["kind"] = "equivalence"
    doc["model"] |= {"top_k": 2, "layers": 2}
    (s,) = load(write(tmp_path, doc)).runs
    ctx = RankContext(rank=0, world_size=1, group=None, device=torch.device("cpu"), backend="gloo")
    raw = equivalence.run_rank(ctx, equivalence.case(s))
    assert raw["grads"] == {} and raw["bitwise_resident"] is True
    metrics, checks, details = equivalence.evaluate(s, [raw])
    assert metrics["rel_error_forward"]["median"] <= equivalence.TOLERANCE["float32"]
    assert "rel_error_grad" not in metrics and "forward only" in details["compared"]
    assert {c["name"]: c["pass"] for c in checks} == {
        "rel_error_within_tolerance": True,
        "tokens_dropped_match_reference": True,
        "offload_bitwise_resident": True,
    }
    _, checks, _ = equivalence.evaluate(s, [raw | {"bitwise_resident": False}])
    assert [c["pass"] for c in checks if c["name"] == "offload_bitwise_resident"] == [False]
