"""The fault table: one row per fault run across every result file ``moebench report`` reads.

Its columns, each from the run's ``details.fault`` (``moebench/kinds/fault/kind.py``; docs/results.md
documents the keys) and its metric ``detected_after_s``:

- scenario: the scenario and the run's swept params;
- injected: the fault type, where (rank r, layer l, expert e, where they apply) and when (step s);
- detected: yes / no;
- after (ms): ``detected_after_s``, from the injection to the verdict;
- named: "right" when the check ``fault_detected`` passed (rank, layer and expert as injected),
  "WRONG" when detected but misnamed, "-" when not detected;
- culprit: what the detector named (rank, layer, expert);
- recovered: how the run went on (stopped, not needed, failover, rerouted, dropped, resumed);
- steps lost: steps not run (stopped runs) or redone (resumed runs);
- rerouted: ``tokens_rerouted``, tokens whose lost choice was rerouted or dropped;
- error vs healthy: ``rel_error_vs_healthy`` after recovery (‖y − y_healthy‖ / ‖y_healthy‖);
- failover exact: the check ``failover_exact`` where it applies (a loss replicas cover).
"""

from __future__ import annotations

import json

from tabulate import tabulate

from moebench.text import clip

HEADERS = (
    "scenario",
    "injected",
    "detected",
    "after (ms)",
    "named",
    "culprit",
    "recovered",
    "steps lost",
    "rerouted",
    "error vs healthy",
    "failover exact",
)


_INT = "an integer or null"
# Each field the table reads from ``details.fault``, and what a result file may hold there.
FIELDS = {
    "injected": (lambda v: v is None or isinstance(v, dict), "a table or null"),
    "detected": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "culprit_rank": (lambda v: _is_int(v), _INT),
    "culprit_layer": (lambda v: _is_int(v), _INT),
    "culprit_expert": (lambda v: _is_int(v), _INT),
    "recovered": (lambda v: v is None or isinstance(v, str), "a string or null"),
    "steps_lost": (lambda v: _is_int(v), _INT),
    "tokens_rerouted": (lambda v: _is_int(v), _INT),
    "rel_error_vs_healthy": (lambda v: _is_int(v) or isinstance(v, float), "a number or null"),
}
INJECTED_FIELDS = {
    "type": (lambda v: v is None or isinstance(v, str), "a string or null"),
    **{k: (lambda v: _is_int(v), _INT) for k in ("rank", "layer", "expert", "at_step")},
}


def _is_int(value) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def malformed(fault: object) -> str | None:
    """What in a run's ``details.fault`` the table cannot show ("fault.steps_lost = [] is invalid: ..."), or None."""
    if not isinstance(fault, dict):
        return f"fault = {clip(json.dumps(fault))} is invalid: accepted a table"
    for prefix, record, fields in (
        ("fault", fault, FIELDS),
        ("fault.injected", fault.get("injected") or {}, INJECTED_FIELDS),
    ):
        for key, (ok, accepted) in fields.items():
            if not ok(record.get(key)):
                return f"{prefix}.{key} = {clip(json.dumps(record[key]))} is invalid: accepted {accepted}"
    return None


def _where(d: dict, keys=("rank", "layer", "expert")) -> str:
    parts = [f"{k} {d[k]}" for k in keys if d.get(k) is not None]
    return ", ".join(parts) or "-"


def _injected(injected: dict) -> str:
    kind = injected.get("type", "?")
    keys = {
        "crash": ("rank", "layer"),
        "hang": ("rank", "layer"),
        "straggler": ("rank",),
        "rank_loss": ("rank",),
    }.get(kind, ("rank", "layer", "expert"))
    return f"{kind} at {_where(injected, keys)}, step {injected.get('at_step', '?')}"


def _check(run: dict, name: str) -> bool | None:
    return next((c["pass"] for c in run.get("checks", []) if c["name"] == name), None)


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def rows(docs: list[dict]) -> list[list[str]]:
    """The table's rows, from loaded result files (runs without ``details.fault`` are skipped; ``results.read``
    has refused a file whose fault record is ``malformed``)."""
    out = []
    for doc in docs:
        name = doc["scenario"]["scenario"]["name"]
        for run in doc["runs"]:
            fault = (run.get("details") or {}).get("fault")
            if not fault:
                continue
            params = ", ".join(f"{k}={v}" for k, v in run.get("params", {}).items() if k != "type")
            after = (run.get("metrics") or {}).get("detected_after_s", {}).get("median")
            named = _check(run, "fault_detected")
            exact = _check(run, "failover_exact")
            culprit = {k.removeprefix("culprit_"): v for k, v in fault.items() if k.startswith("culprit_")}
            out.append(
                [
                    name + (f" [{params}]" if params else ""),
                    _injected(fault.get("injected") or {}),
                    "yes" if fault.get("detected") else "no",
                    _number(None if after is None else after * 1e3, ".1f"),
                    "-" if not fault.get("detected") else ("right" if named else "WRONG"),
                    _where(culprit) if fault.get("detected") else "-",
                    fault.get("recovered") or "-",
                    _number(fault.get("steps_lost"), "d"),
                    _number(fault.get("tokens_rerouted"), "d"),
                    _number(fault.get("rel_error_vs_healthy"), ".3g"),
                    "-" if exact is None else ("yes" if exact else "NO"),
                ]
            )
    return out


def render(docs: list[dict], fmt: str = "plain") -> str | None:
    """The fault table across ``docs``, or None when no run injected a fault."""
    found = rows(docs)
    if not found:
        return None
    style = "github" if fmt == "markdown" else "simple"
    table = tabulate(found, headers=HEADERS, tablefmt=style, disable_numparse=True)
    title = f"Fault table: {len(found)} fault run{'s' * (len(found) != 1)} (columns: moebench/report/fault_table.py)"
    return f"### {title}\n\n{table}" if fmt == "markdown" else f"{title}\n{table}"
