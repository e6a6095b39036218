"""Metric formulas on hand-computed inputs."""

from __future__ import annotations

import math

import pytest

from moebench import metrics as M


def test_metric_record_summarises_samples_with_nearest_rank_percentiles():
    m = M.metric([4, 1, 3, 2, 5, 10, 6, 7, 9, 8], "s", "lower")
    assert (m["median"], m["p90"], m["p99"], m["min"], m["max"], m["n"]) == (5.5, 10.0, 10.0, 1.0, 10.0, 10)
    m100 = M.metric(range(100, 0, -1), "s", "lower")
    assert (m100["p90"], m100["p99"]) == (91.0, 100.0)  # sorted[90], sorted[99]
    assert m["cv"] == pytest.approx(math.sqrt(8.25) / 5.5)
    assert m["samples"] == [4.0, 1.0, 3.0, 2.0, 5.0, 10.0, 6.0, 7.0, 9.0, 8.0]  # raw, in order
    single = M.metric([7], "copies", "lower")
    assert single["median"] == single["p99"] == single["min"] == 7.0 and single["cv"] == 0.0
    with pytest.raises(ValueError, match="better"):
        M.metric([1], "s", "faster")


def test_a2a_bytes_count_the_kept_copies_each_rank_sends_and_receives():
    kept_WE = [[3, 1, 0, 2], [1, 0, 4, 1]]  # rank w sends kept_WE[w][e] copies to expert e
    owner_E = (0, 1, 0, 1)  # round robin over 2 ranks
    send, recv = M.a2a_rank_bytes(kept_WE, owner_E, bytes_per_row=10)
    assert send == [60, 60]  # 3+1+0+2, 1+0+4+1
    assert recv == [80, 40]  # experts 0 and 2: 3+1+0+4; experts 1 and 3: 1+0+2+1
    assert M.a2a_size_bytes(send, recv) == 80  # the busiest rank's larger direction


def test_bandwidth_follows_nccl_tests():
    assert M.algbw_gbps(4e9, 2.0) == 2.0
    assert M.busbw_gbps(2.0, 4) == 1.5
    assert M.busbw_gbps(2.0, 1) == 0.0  # one rank moves nothing over a link


def test_load_statistics_on_hand_values():
    loads = [1, 2, 3, 6]
    assert M.imbalance(loads) == 2.0
    assert M.load_cv(loads) == pytest.approx(math.sqrt(14 / 4) / 3)
    assert M.rank_loads([5, 1, 2, 7], (0, 1, 0, 1), 2) == [7, 8]
    assert M.imbalance([5, 5, 5]) == 1.0 and M.load_cv([5, 5, 5]) == 0.0
    assert math.isnan(M.imbalance([0, 0])) and math.isnan(M.load_cv([0, 0]))
    # vLLM's balancedness sums over layers before dividing: (2 + 3) / (3 + 3), not mean(2/3, 1)
    assert M.balancedness([[1, 3], [3, 3]]) == pytest.approx(5 / 6)
    assert M.balancedness([[4, 4]]) == 1.0 and math.isnan(M.balancedness([[0, 0]]))
    assert M.across_layers([1.1, 1.5, 1.2]) == {
        "worst": 1.5,
        "median": 1.2,
        "mean": pytest.approx(3.8 / 3),
        "worst_layer": 1,
    }
