"""A scenario file whose ``[scenario] kind`` lists several kinds: one scenario per kind from the same sections,
named ``<name>-<kind>`` (``moebench.scenario.load_file``), what ``moebench run`` and ``moebench list`` load; a bad
list is a one-line error naming the file, key and value."""

from __future__ import annotations

import pytest

from moebench.cli import main
from moebench.runner import load_all
from moebench.scenario import ScenarioError, load, load_file
from tests.test_scenario import MINIMAL, write


def _doc(kind, **model) -> dict:
    return {**MINIMAL, "scenario": {"name": "pair", "kind": kind}, "model": {**MINIMAL["model"], **model}}


def test_a_listed_kind_becomes_one_scenario_per_kind_named_after_it(tmp_path):
    path = write(tmp_path, _doc(["equivalence", "throughput"], num_experts=[4, 8]))
    first, second = load_file(path)
    assert (first.name, first.sections["scenario"]["kind"]) == ("pair-equivalence", "equivalence")
    assert (second.name, second.sections["scenario"]["kind"]) == ("pair-throughput", "throughput")
    for sc in (first, second):  # the same sections and sweeps through each kind
        assert [r.model["num_experts"] for r in sc.runs] == [4, 8]
        assert {r.kind for r in sc.runs} == {sc.sections["scenario"]["kind"]}
    assert [sc.name for sc in load_all([str(path)], {})] == ["pair-equivalence", "pair-throughput"]
    assert load(path, kind="throughput").name == "pair-throughput"


def test_a_single_kind_file_is_one_scenario_under_its_own_name(tmp_path):
    (sc,) = load_file(write(tmp_path, _doc("throughput")))
    assert sc.name == "pair" and sc.sections["scenario"]["kind"] == "throughput"


@pytest.mark.parametrize(
    "kinds", [[], ["nope"], ["throughput", "throughput"], [1, "throughput"]], ids=["empty", "unknown", "twice", "int"]
)
def test_a_bad_kind_list_is_one_line_naming_file_key_and_value(tmp_path, kinds):
    path = write(tmp_path, _doc(kinds))
    with pytest.raises(ScenarioError) as err:
        load_file(path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(f"{path}: [scenario] kind = ") and "a list of distinct kinds" in text


def test_load_without_a_kind_refuses_a_file_listing_several(tmp_path):
    path = write(tmp_path, _doc(["equivalence", "throughput"]))
    with pytest.raises(ScenarioError, match="lists several kinds: load one of them"):
        load(path)


def test_a_key_one_listed_kind_refuses_names_that_kind(tmp_path):
    doc = _doc(["equivalence", "serve"])  # serve needs the decoder's attention keys
    with pytest.raises(ScenarioError) as err:
        load_file(write(tmp_path, doc))
    assert "\n" not in str(err.value) and "serve" in str(err.value)


def test_moebench_list_shows_a_row_per_kind(tmp_path, capsys):
    write(tmp_path, _doc(["equivalence", "throughput"]))
    assert main(["list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pair-equivalence" in out and "pair-throughput" in out


def test_a_gate_one_listed_kind_does_not_know_says_the_file_lists_kinds(tmp_path):
    doc = {**_doc(["equivalence", "throughput"]), "slo": {"min_tokens_per_s": 10}}
    with pytest.raises(ScenarioError) as err:
        load_file(write(tmp_path, doc))
    text = str(err.value)
    assert "\n" not in text and "min_tokens_per_s" in text
    listed = '(the file lists kind = ["equivalence", "throughput"]: every key must suit each kind; '
    assert text.endswith(listed + "this is its equivalence scenario, 'pair-equivalence')")


def test_loading_a_kind_the_file_does_not_name_is_refused(tmp_path):
    with pytest.raises(ScenarioError, match=r'kind = "throughput": asked to load kind \'equivalence\''):
        load(write(tmp_path, _doc("throughput")), kind="equivalence")
