"""moebench.tools.overlap_headroom's trace summary, on a hand-made trace."""

from __future__ import annotations

import json

from moebench.tools.overlap_headroom import trace_summary


def _x(name: str, ts: float, dur: float, tid: int = 1) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_trace_summary_counts_the_all_to_all_that_ran_under_the_experts(tmp_path):
    events = [
        _x("step[0]", 0, 10_000),
        _x("experts[0]", 1_000, 3_000),  # 1-4 ms
        _x("experts[1]", 6_000, 2_000),  # 6-8 ms
        _x("gloo:all_to_all", 3_000, 4_000, tid=2),  # 3-7 ms: 1 ms under experts[0], 1 ms under experts[1]
        _x("gloo:all_to_all", 8_500, 500, tid=2),  # under nothing
        _x("dispatch[1].wait", 4_000, 2_000),
        _x("combine.wait", 8_000, 1_000),
        {"ph": "i", "name": "experts[9]", "ts": 0},  # an instant event, not a range: ignored
    ]
    path = tmp_path / "rank0.json"
    path.write_text(json.dumps({"traceEvents": events}))
    assert trace_summary(str(path)) == {
        "steps": 10.0,
        "all-to-all": 4.5,
        "all-to-all under experts": 2.0,
        "waits": 3.0,
        "experts": 5.0,
    }
