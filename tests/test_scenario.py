"""Scenario files: defaults, sweep expansion, and a clear one-line error for every bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moebench.scenario import SCHEMA, ScenarioError, discover, load, load_file

SHIPPED = Path(__file__).resolve().parent.parent / "scenarios"

MINIMAL = {
    "scenario": {"name": "t", "kind": "throughput"},
    "model": {"hidden": 8, "ffn_hidden": 16, "num_experts": 4},
    "workload": {"tokens_per_rank": 16},
}


def _toml_char(c: str) -> str:
    if c in '"\\':
        return "\\" + c
    return f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c


def toml_value(value) -> str:
    """Spell a Python value in TOML (enough for the tests' values)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def write(tmp_path: Path, doc: dict, name: str = "s.toml") -> Path:
    lines = []
    for section, table in doc.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in table.items()]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def with_key(section: str, key: str, value) -> dict:
    doc = {s: dict(t) for s, t in MINIMAL.items()}
    doc.setdefault(section, {})[key] = value
    return doc


def test_minimal_file_fills_every_default(tmp_path):
    (run,) = load(write(tmp_path, MINIMAL)).runs
    assert run.scenario == {"name": "t", "kind": "throughput", "description": "", "warmup": 3, "repeats": 10}
    plain = {"capacity_factor": 0.0, "aux_loss_coef": 0.01, "z_loss_coef": 0.001, "normalize_topk": False,
             "granularity": "token"}  # fmt: skip
    variants = {"scoring": "softmax", "topk_before_softmax": False, "group_limited": None, "score_bias": 0.0,
                "routed_scaling": 1.0, "score_bias_update": 0.0}  # fmt: skip
    assert run.routing == {**plain, **variants}
    assert run.resolved()["routing"] == plain  # the router variants are recorded only when set
    assert run.parallel == {
        "world_size": 1,
        "placement": "round_robin",
        "device": "auto",
        "backend": "auto",
        "threads_per_rank": 0,
        "overlap_chunks": None,
        "redundant_experts": 0,
        "mode": "ep",
    }
    # the decoder's keys and mode are recorded only for the kind that reads them (serve)
    assert "mode" not in run.resolved()["parallel"] and "attention_heads" not in run.resolved()["model"]
    assert run.workload["skew"] == "uniform" and run.workload["train"] is False and run.params == {}
    moe = run.moe_config()
    assert (moe.hidden_size, moe.ffn_hidden_size, moe.num_experts, moe.top_k) == (8, 16, 4, 1)


def test_lists_expand_into_the_product_in_schema_order(tmp_path):
    doc = with_key("parallel", "world_size", [1, 2])
    doc["model"]["top_k"] = [1, 2]
    doc["workload"]["skew"] = ["uniform", "zipf", "hot"]
    sc = load(write(tmp_path, doc))
    assert len(sc.runs) == 12
    assert sc.runs[0].params == {"top_k": 1, "world_size": 1, "skew": "uniform"}
    assert sc.runs[1].params == {"top_k": 1, "world_size": 1, "skew": "zipf"}
    assert sc.runs[-1].params == {"top_k": 2, "world_size": 2, "skew": "hot"}
    assert [r.world_size for r in sc.runs[:6]] == [1, 1, 1, 2, 2, 2]
    assert sc.sections["parallel"]["world_size"] == [1, 2]  # the file's sweep is kept in the result


def test_overrides_replace_file_values_before_validation(tmp_path):
    path = write(tmp_path, with_key("parallel", "world_size", [1, 2, 4]))
    sc = load(path, {("parallel", "world_size"): 2, ("scenario", "repeats"): 3})
    assert [(r.world_size, r.scenario["repeats"]) for r in sc.runs] == [(2, 3)]


def test_slos_parse_with_alias_and_load_balance_gets_the_seed_plan_gate(tmp_path):
    doc = with_key("slo", "max_imbalance", 1.2)
    doc["scenario"]["kind"] = "load_balance"
    (run,) = load(write(tmp_path, doc)).runs
    gates = {(s.op, s.metric): (s.limit, s.source) for s in run.slos}
    assert gates[("max", "imbalance_max_mean")] == (1.2, "scenario")
    assert gates[("max", "load_cv")][0] == 0.2 and gates[("max", "load_cv")][1].startswith("default")
    doc["slo"]["max_load_cv"] = 0.5  # an explicit gate replaces the default
    (run,) = load(write(tmp_path, doc)).runs
    assert [(s.metric, s.limit) for s in run.slos if s.metric == "load_cv"] == [("load_cv", 0.5)]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (with_key("extra", "x", 1), "[extra] is not a known section: accepted scenario, model"),
        (with_key("model", "hiden", 8), "[model] hiden is not a known key: accepted hidden, ffn_hidden"),
        (with_key("model", "hidden", "512"), '[model] hidden = "512" is invalid: accepted an integer from 1 to'),
        (with_key("model", "hidden", 0), "[model] hidden = 0 is invalid: accepted an integer from 1 to"),
        (with_key("model", "top_k", True), "[model] top_k = true is invalid: accepted an integer from 1 to"),
        (with_key("routing", "capacity_factor", -1.0), "[routing] capacity_factor = -1.0 is invalid: accepted a"),
        (with_key("routing", "capacity_factor", float("nan")), "[routing] capacity_factor = nan is invalid"),
        (with_key("scenario", "warmup", [0, 1]), "lists sweep only in [model], [routing], [parallel], [workload]"),
        (with_key("routing", "granularity", "batch"), '[routing] granularity = "batch" is invalid: accepted one of'),
        (with_key("workload", "seq_len", 5), "[workload] seq_len = 5 is invalid with tokens_per_rank = 16: accepted a"),
        (with_key("workload", "skew", "pareto"), '[workload] skew = "pareto" is invalid: accepted one of "uniform"'),
        (with_key("parallel", "world_size", []), "[parallel] world_size = [] is invalid: accepted a non-empty list"),
        (with_key("parallel", "world_size", [2, 2]), "a non-empty list of distinct values"),
        (with_key("parallel", "world_size", [1, "2"]), '[parallel] world_size = "2" is invalid'),
        (with_key("scenario", "kind", "chaos"), '[scenario] kind = "chaos" is invalid: accepted one of "throughput"'),
        (with_key("slo", "max_speed", 1.0), '[slo] max_speed is not a known gate for kind = "throughput"'),
        (with_key("slo", "min_tokens_per_s", "fast"), '[slo] min_tokens_per_s = "fast" is invalid'),
        (with_key("model", "top_k", 5), "[model] top_k = 5 is invalid: accepted 1 <= top_k <= num_experts (4)"),
        (with_key("parallel", "world_size", [2, 8]), "(run {world_size = 8}): [parallel] world_size = 8 is invalid"),
        (with_key("parallel", "backend", "nccl") | {"parallel": {"backend": "nccl", "device": "cpu"}}, "nccl"),
    ],
)
def test_bad_values_give_one_line_naming_file_key_value_and_what_is_accepted(tmp_path, doc, expected):
    path = write(tmp_path, doc)
    with pytest.raises(ScenarioError) as err:
        load(path)
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


@pytest.mark.parametrize("section", ["scenario", "model", "workload"])
def test_missing_section_or_required_key_is_named(tmp_path, section):
    doc = {s: t for s, t in MINIMAL.items() if s != section}
    with pytest.raises(ScenarioError, match=rf"\[{section}\] is missing"):
        load(write(tmp_path, doc))
    doc = {s: dict(t) for s, t in MINIMAL.items()}
    key = next(iter(doc[section]))
    del doc[section][key]
    with pytest.raises(ScenarioError, match=rf"\[{section}\] {key} is missing: accepted"):
        load(write(tmp_path, doc))


def test_unreadable_or_invalid_toml_and_missing_paths_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\nname = 1\n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load(bad)
    with pytest.raises(ScenarioError, match=r"nothere\.toml: no such file or folder"):
        discover([tmp_path / "nothere.toml"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ScenarioError, match=r"empty: no scenario files"):
        discover([empty])


def test_every_shipped_scenario_loads():
    files = discover([SHIPPED, SHIPPED / "sweeps", SHIPPED / "multigpu", SHIPPED / "real-models"])
    assert len(files) >= 8
    names = [sc.name for f in files for sc in load_file(f)]
    assert len(set(names)) == len(names)


# Any TOML value at all: scalars of every type (NaN and inf included), lists and tables of them.
SCALARS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=8),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.sampled_from("ab"), SCALARS, max_size=2))
KEYS = [(s, k) for s, keys in SCHEMA.items() for k in keys]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(KEYS), value=VALUES)
def test_any_value_for_any_key_loads_or_fails_with_one_line_naming_the_key(tmp_path, where, value):
    section, key = where
    path = write(tmp_path, with_key(section, key, value))
    try:
        sc = load(path)
    except ScenarioError as err:
        message = str(err)
        assert message.startswith(str(path)) and "\n" not in message
        assert f"[{section}] {key}" in message and "accepted" in message
    else:
        assert sc.runs, "a file that loads has at least one run"


TABLES = st.dictionaries(st.text(min_size=1, max_size=12), VALUES, max_size=3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(section=st.sampled_from([*SCHEMA, "slo"]), content=st.one_of(SCALARS, st.lists(SCALARS, max_size=2), TABLES))
def test_any_section_content_loads_or_fails_with_one_line_naming_the_section(tmp_path, section, content):
    doc = {s: dict(t) for s, t in MINIMAL.items()}
    if isinstance(content, dict) and section in doc:
        doc[section] = {**doc[section], **content}
    else:
        doc[section] = content
    path = tmp_path / "s.toml"
    doc = dict(sorted(doc.items(), key=lambda item: isinstance(item[1], dict)))  # bare keys before tables
    body = [
        f"{s} = {toml_value(t)}"
        if not isinstance(t, dict)
        else f"[{s}]\n" + "".join(f"{toml_value(k)} = {toml_value(v)}\n" for k, v in t.items())
        for s, t in doc.items()
    ]
    path.write_text("\n".join(body) + "\n")
    try:
        load(path)
    except ScenarioError as err:
        message = str(err)
        assert message.startswith(str(path)) and "\n" not in message and "accepted" in message


def test_slo_keys_may_name_a_statistic_and_overrides_are_named_in_errors(tmp_path):
    doc = with_key("slo", "max_step_time_s_p99", 0.05)
    doc["slo"]["min_tokens_per_s"] = 10.0
    (run,) = load(write(tmp_path, doc)).runs
    assert [(s.key, s.metric, s.stat) for s in run.slos] == [
        ("max_step_time_s_p99", "step_time_s", "p99"),
        ("min_tokens_per_s", "tokens_per_s", "median"),
    ]
    with pytest.raises(ScenarioError, match="max_step_time_s_p42 is not a known gate"):
        load(write(tmp_path, with_key("slo", "max_step_time_s_p42", 1.0)))
    with pytest.raises(ScenarioError, match=r"world_size = 8 \(from the command line\) is invalid: every rank"):
        load(write(tmp_path, MINIMAL), {("parallel", "world_size"): 8})
    with pytest.raises(ScenarioError, match=r"num_experts = 100000000000 is invalid: accepted an integer from 1"):
        load(write(tmp_path, with_key("model", "num_experts", 10**11)))
