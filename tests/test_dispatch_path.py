"""moebench.tools.dispatch_path: what it times on two gloo ranks, and how it prices each step."""

from __future__ import annotations

import pytest
from test_scenario import with_key, write

from moebench.tools import dispatch_path


def test_ratios_are_medians_of_round_ratios_and_steps_differences_of_medians():
    samples = {
        "a2a": [1.0, 2.0, 2.0],
        "exchange": [3.0, 1.0, 4.0],  # per round 3, 0.5, 2 -> 2 (the ratio of medians: 1.5)
        "send + exchange": [4.0, 4.0, 4.0],
        "dispatch": [5.0, 6.0, 7.0],
        "combine exchange": [2.0, 2.0, 2.0],
        "combine": [2.5, 3.0, 3.5],
    }
    result = dispatch_path.summarise(samples)
    assert result["functions"]["exchange"] == {"median_s": 3.0, "over_a2a": 2.0}
    assert result["functions"]["a2a"]["over_a2a"] == 1.0
    assert result["steps"] == {
        "exchange wrapper and output": 1.0,  # exchange 3 - a2a 2
        "send gather": 1.0,  # send + exchange 4 - exchange 3
        "planning": 2.0,  # dispatch 6 - send + exchange 4
        "weighted sum per token": 1.0,  # combine 3 - combine exchange 2
    }
    assert result["samples"] == 3


@pytest.mark.multiproc
def test_a_two_rank_run_times_every_function_and_says_what_it_ran(tmp_path):
    doc = with_key("parallel", "world_size", 2)
    doc["parallel"] |= {"device": "cpu", "threads_per_rank": 1}
    doc["model"] |= {"top_k": 2, "layers": 2}
    path = str(write(tmp_path, doc))
    result = dispatch_path.measure(path, repeats=3, warmup=1)
    assert list(result["functions"]) == list(dispatch_path.FUNCTIONS)
    assert result["samples"] == 3 and result["ranks"] == 2
    assert all(f["median_s"] > 0 for f in result["functions"].values())
    text = dispatch_path.render(result)
    assert path in text and "2 layers" in text and "16 tokens per rank" in text and "3 rounds" in text
    assert all(step in text for step in result["steps"])


def test_a_one_rank_scenario_is_refused_in_one_line(tmp_path, capsys):
    path = write(tmp_path, with_key("parallel", "world_size", 1))
    assert dispatch_path.main(["--scenario", str(path), "--repeats", "1"]) == 1
    err = capsys.readouterr().err
    assert err == f"dispatch_path: {path}: [parallel] world_size = 1: accepted 2 or more (an all-to-all)\n"
