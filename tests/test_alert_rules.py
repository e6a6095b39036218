"""The alerts' outputs: ``moebench alerts FILE --prometheus-rules OUT`` (the rule file parses back to the
thresholds it was given, and passes ``promtool check rules`` where promtool is installed), its bad
input (one line, exit 2), and the report page's alert panels (series, threshold, fired spans)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moebench.cli import main
from moebench.measure.alerts import ALERTS, DEFAULTS
from moebench.report import alert_plots
from moebench.report import plots as P
from moebench.report import prometheus as R
from moebench.report.results import SCHEMA

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _parse(text: str) -> dict:
    """The rule file read back: with PyYAML where installed, else as the JSON-quoted block YAML it is."""
    try:
        import yaml
    except ImportError:
        return _parse_block(text)
    return yaml.safe_load(text)


def _parse_block(text: str) -> dict:
    """A reader of exactly the structure ``to_yaml`` writes (2-space block YAML, JSON-quoted scalars)."""
    rules, rule, block = [], None, None
    name = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#") or line in ("groups:", "    rules:"):
            continue
        key, _, value = line.strip().removeprefix("- ").partition(": ")
        if line.startswith("  - name: "):
            name = json.loads(value)
        elif line.startswith("      - alert: "):
            rule, block = {"alert": json.loads(value)}, None
            rules.append(rule)
        elif line.endswith(":") and line.startswith("        ") and not line.startswith("         "):
            block = rule.setdefault(line.strip()[:-1], {})
        elif line.startswith("          "):
            block[key] = json.loads(value)
        else:
            rule[key] = json.loads(value)
    return {"groups": [{"name": name, "rules": rules}]}


def _scenario(tmp_path: Path, alerts: str | None) -> Path:
    path = tmp_path / "s.toml"
    text = '[scenario]\nname = "s"\nkind = "latency"\n[model]\nhidden = 8\nffn_hidden = 8\nnum_experts = 4\n'
    text += "[workload]\ntokens_per_rank = 16\n" + ("" if alerts is None else f"[alerts]\n{alerts}")
    path.write_text(text)
    return path


def test_rules_of_a_scenario_parse_back_to_its_thresholds_and_sustains(tmp_path):
    path = _scenario(tmp_path, "expert_overload = 0.95\noverload_for_s = 90\nthroughput_for_s = 0.25\n")
    out = tmp_path / "rules.yml"
    assert main(["alerts", str(path), "--prometheus-rules", str(out)]) == 0
    (group,) = _parse(out.read_text())["groups"]
    rules = {r["labels"]["moebench_alert"]: r for r in group["rules"]}
    assert set(rules) == {a.name for a in ALERTS}
    assert rules["expert_overload"]["expr"] == "max without (layer, expert) (moebench_expert_load_ratio) > 0.95"
    assert rules["expert_overload"]["for"] == "90s" and rules["low_throughput"]["for"] == "250ms"
    assert rules["low_throughput"]["expr"] == "moebench_tokens_per_second_per_gpu < 80000.0"  # a default
    assert rules["comm_delay"]["expr"] == "moebench_all_to_all_seconds > 0.005" and rules["comm_delay"]["for"] == "0s"
    assert all(set(r) == {"alert", "expr", "for", "labels", "annotations"} for r in group["rules"])


def test_a_scenario_without_alerts_and_a_result_file_give_the_plans_defaults_and_its_recorded_values(tmp_path, capsys):
    assert main(["alerts", str(_scenario(tmp_path, None)), "--prometheus-rules", "-"]) == 0
    rules = {r["labels"]["moebench_alert"]: r for r in _parse(capsys.readouterr().out)["groups"][0]["rules"]}
    assert (
        rules["memory_used"]["expr"] == "moebench_memory_used_ratio > 0.85" and rules["expert_overload"]["for"] == "30s"
    )
    result = tmp_path / "r.json"
    result.write_text(json.dumps(_result_doc({"memory_used": 0.7})))
    assert main(["alerts", str(result), "--prometheus-rules", "-"]) == 0
    rules = {r["labels"]["moebench_alert"]: r for r in _parse(capsys.readouterr().out)["groups"][0]["rules"]}
    assert rules["memory_used"]["expr"] == "moebench_memory_used_ratio > 0.7"


def test_durations_are_whole_seconds_or_whole_milliseconds_as_prometheus_reads_them():
    assert [R.duration(v) for v in (30, 30.0, 0, 0.001, 1.5, 0.0004)] == [
        "30s",
        "30s",
        "0s",
        "1ms",
        "1500ms",
        "1ms",
    ]  # up: never sooner than the run


def test_the_rule_file_passes_promtool_where_it_is_installed(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    out = tmp_path / "rules.yml"
    assert main(["alerts", str(_scenario(tmp_path, "overload_for_s = 0.001\n")), "--prometheus-rules", str(out)]) == 0
    done = subprocess.run([promtool, "check", "rules", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: _scenario(p, "comm_delay_s = 0\n"), r"s\.toml: \[alerts\] comm_delay_s = 0 is invalid: accepted"),
        (lambda p: p / "missing.toml", r"missing\.toml: cannot be read"),
        (
            lambda p: _json(p, _result_doc({"memory_used": "high"})),
            r'r\.json: scenario\.alerts\.memory_used = "high" is',
        ),
        (lambda p: _json(p, {"schema": "other"}), r"r\.json: schema = 'other' is invalid"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(tmp_path, capsys, setup, message):
    out = tmp_path / "rules.yml"
    assert main(["alerts", str(setup(tmp_path)), "--prometheus-rules", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err
    assert not out.exists()


def _json(folder: Path, doc: dict) -> Path:
    path = folder / "r.json"
    path.write_text(json.dumps(doc))
    return path


def _result_doc(alerts: dict, runs: list | None = None) -> dict:
    scenario = {"scenario": {"name": "s", "kind": "throughput"}, "alerts": alerts}
    return {"schema": SCHEMA, "source": "s.toml", "scenario": scenario, "environment": {}, "runs": runs or []}


# -------------------------------------------------------------------------------------------
# The report page's panels


def _run(fired: list[dict], params: dict | None = None) -> dict:
    series = {
        "t_s": [0.1, 0.2, 0.3, 0.4],
        "expert_load_ratio": [0.5, 2.0, 2.5, 0.5],
        "tokens_per_s_per_gpu": [1e5, 1e5, None, 1e5],
        "memory_used": [0.1] * 4,
    }
    return {"params": params or {}, "status": "ok", "metrics": {}, "checks": [], "details": {"series": series},
            "config": {"alerts": DEFAULTS | {"expert_overload": 1.5}}, "alerts": fired}  # fmt: skip


def test_alert_panels_carry_each_recorded_series_its_runs_threshold_and_the_fired_spans():
    fired = [{"name": "expert_overload", "first_s": 0.2, "duration_s": 0.1, "peak": 2.5, "threshold": 1.5}]
    panels = alert_plots.alert_panels(_run(fired))
    assert [p.name for p in panels] == ["expert_overload", "memory_used", "low_throughput"]  # no a2a at W = 1
    overload = panels[0]
    assert overload.threshold == 1.5 and overload.fired == [(0.2, pytest.approx(0.3))]
    assert panels[2].threshold == 80_000.0 and panels[2].fired == [] and panels[2].values[2] is None
    assert alert_plots.alert_panels({"details": {}}) == []


def test_a_result_with_series_gets_one_alerts_plot_per_run_drawn_to_png():
    pytest.importorskip("matplotlib")
    fired = [{"name": "expert_overload", "first_s": 0.2, "duration_s": 0.0, "peak": 2.0, "threshold": 1.5}]
    doc = {"scenario": {"scenario": {"name": "a", "kind": "throughput"}},
           "runs": [_run([], {"skew": "uniform"}), _run(fired, {"skew": "zipf"})]}  # fmt: skip
    plots = [p for p in P.plots_for(doc) if ".alerts" in p.name]
    assert [p.name for p in plots] == ["a.alerts.skew-uniform", "a.alerts.skew-zipf"]
    assert "none fired" in plots[0].title and "(expert_overload)" in plots[1].title
    assert P.png(plots[1].draw()).startswith(PNG_SIGNATURE)


def test_the_fallback_reader_reads_the_rule_file_as_pyyaml_does():
    yaml = pytest.importorskip("yaml")
    text = R.to_yaml(R.rules({"overload_for_s": 0.001}, 'odd "path"\n.toml'), 'odd "path"\n.toml')
    assert _parse_block(text) == yaml.safe_load(text)


@pytest.mark.parametrize(("for_s", "fires"), [(120, True), (121, False)])
def test_prometheus_fires_the_exported_rule_exactly_when_the_runs_own_evaluation_does(tmp_path, for_s, fires):
    """The same series, one sample a minute, through ``promtool test rules`` and through ``alerts.fired``:
    held from 1 min to 3 min (120 s) fires a 120 s sustain at 3 min and not a 121 s one, in both."""
    from moebench.measure.alerts import fired

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    values = [0.5, 0.95, 0.95, 0.95, 0.5]
    ours = fired([60.0 * i for i in range(5)], values, 0.9, ">", for_s, "expert_overload")
    assert bool(ours) == fires
    doc = R.rules({"overload_for_s": for_s}, "t")
    (rule,) = [r for r in doc["groups"][0]["rules"] if r["labels"]["moebench_alert"] == "expert_overload"]
    (tmp_path / "rules.yml").write_text(R.to_yaml(doc, "t"))
    annotations = {k: v.replace("{{ $value }}", "0.95") for k, v in rule["annotations"].items()}
    expected = [{"exp_labels": rule["labels"], "exp_annotations": annotations}] if fires else []
    test = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'moebench_expert_load_ratio{layer="0",expert="3"}', "values": " ".join(map(str, values))}
                ],
                "alert_rule_test": [{"eval_time": "3m", "alertname": rule["alert"], "exp_alerts": expected}],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(json.dumps(test))  # JSON is YAML
    done = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
