"""The deployment plan's alerts as Prometheus alerting rules (``moebench alerts FILE --prometheus-rules OUT``).

Scope: the thresholds of a result file (``thresholds_of_result``; a scenario's come from the scenario
loader), the rule group they make (``rules``: one rule per alert of ``moebench/measure/alerts.py``, with
``alert``, ``expr``, ``for``, ``labels`` and ``annotations``), and that group as YAML (``to_yaml``, written
here for this one fixed structure: no YAML library needed). The metric names the expressions read are the
ones a deployment exports (``docs/results.md``, "Alerts"); ``for`` is Prometheus's, which the run's own
evaluation follows.
"""

from __future__ import annotations

import json
import math

from moebench.measure.alerts import ALERTS, DEFAULTS
from moebench.metrics import is_finite_number
from moebench.text import clip

GROUP = "moebench-moe-alerts"
# PromQL per alert: the run's series is the max over layers and experts; a deployment's gauge has
# one series per layer and expert (labels ``layer``, ``expert``), so the rule takes the same max.
AGGREGATE = {"expert_overload": "max without (layer, expert) ({metric})"}


def duration(seconds: float) -> str:
    """A Prometheus duration: whole seconds as "30s", else whole milliseconds ("1ms", Prometheus's finest),
    rounded up: the exported rule never fires sooner than the run's own evaluation (0 stays "0s")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{math.ceil(seconds * 1000)}ms"


def number(value: float) -> str:
    """A PromQL number literal that reads back as ``value`` (Python's shortest round-trip form)."""
    return repr(float(value))


POSITIVE = ("expert_overload", "memory_used", "comm_delay_s", "capacity_factor")  # as moebench/scenario.py


def thresholds_of_result(doc: dict, path: str) -> dict:
    """The [alerts] thresholds a result file recorded (its scenario's; defaults where it set none)."""
    table = (doc.get("scenario") or {}).get("alerts") or {}
    if not isinstance(table, dict):
        raise ValueError(f"{path}: scenario.alerts = {clip(json.dumps(table))} is invalid: accepted a table")
    for key, value in table.items():
        if key not in DEFAULTS:
            raise ValueError(f"{path}: scenario.alerts.{clip(key)} is not a known key: accepted {', '.join(DEFAULTS)}")
        positive = key in POSITIVE  # the thresholds the schema takes > 0; the sustains and the throughput >= 0
        if not (is_finite_number(value) and (value > 0 if positive else value >= 0)):
            shown, bound = clip(json.dumps(value)), "> 0" if positive else ">= 0"
            raise ValueError(f"{path}: scenario.alerts.{key} = {shown} is invalid: accepted a finite number {bound}")
    return DEFAULTS | table


def rules(thresholds: dict, source: str) -> dict:
    """The rule group of the alerts at these thresholds (``DEFAULTS`` fill the missing ones)."""
    limits = DEFAULTS | dict(thresholds)
    source = source.replace("{{", "{ {")  # annotations are templates: a path is text, never a template
    out = []
    for alert in ALERTS:
        threshold = limits[alert.key]
        held = limits[alert.for_key] if alert.for_key else 0.0
        selector = AGGREGATE.get(alert.name, "{metric}").format(metric=alert.metric)
        side = "above" if alert.op == ">" else "below"
        summary = f"{alert.name}: {alert.what} {side} {threshold:g}"
        out.append(
            {
                "alert": alert.rule,
                "expr": f"{selector} {alert.op} {number(threshold)}",
                "for": duration(held),
                "labels": {"severity": "warning", "moebench_alert": alert.name},
                "annotations": {
                    "summary": summary + (f" for {duration(held)}" if held else ""),
                    "description": f"{{{{ $value }}}} against {threshold:g}; thresholds from {source}",
                },
            }
        )
    return {"groups": [{"name": GROUP, "rules": out}]}


def _scalar(value: str) -> str:
    """A YAML double-quoted scalar (JSON's escapes are YAML's)."""
    return json.dumps(value, ensure_ascii=False)


def to_yaml(doc: dict, source: str) -> str:
    """The rule file: a comment naming the metrics, then ``groups`` as block YAML, every string quoted."""
    lines = [
        "# Prometheus alerting rules: the deployment plan's alerts, written by `moebench alerts`.",
        f"# Thresholds from {_scalar(source)}. The metrics a deployment must export (docs/results.md, Alerts):",
        *(f"#   {alert.metric}: {alert.what}" for alert in ALERTS),
        "groups:",
    ]
    for group in doc["groups"]:
        lines += [f"  - name: {_scalar(group['name'])}", "    rules:"]
        for rule in group["rules"]:
            lines.append(f"      - alert: {_scalar(rule['alert'])}")
            lines += [f"        {key}: {_scalar(rule[key])}" for key in ("expr", "for")]
            for block in ("labels", "annotations"):
                lines.append(f"        {block}:")
                lines += [f"          {key}: {_scalar(value)}" for key, value in rule[block].items()]
    return "\n".join(lines) + "\n"
