"""The plan report: JSON for programs (``moebench.plan/1``), and a text report rendered from it."""

from __future__ import annotations

from tabulate import tabulate

from moebench.plan.findings import Finding
from moebench.plan.model import Estimate
from moebench.plan.spec import human

SCHEMA = "moebench.plan/1"


def to_json(e: Estimate, found: list[Finding]) -> dict:
    p = e.plan
    slo_rows = []
    for key, op in (("ttft", "max"), ("tpot", "max"), ("throughput_per_gpu", "min")):
        limit = getattr(p.slo, key)
        if limit is not None:
            value = e[key]
            slo_rows.append(
                {"slo": key, "op": op, "limit": limit, "derived": value,
                 "met": value <= limit if op == "max" else value >= limit}
            )  # fmt: skip
    if p.slo.max_load_cv is not None:
        slo_rows.append({"slo": "max_load_cv", "op": "max", "limit": p.slo.max_load_cv, "derived": None, "met": None})
    return {
        "schema": SCHEMA,
        "plan": p.name,
        "path": p.path,
        "source": p.source,
        "assumed": list(p.assumed),
        "inputs": p.written,
        "degrees": {"ep": p.parallel.ep, "tp": p.parallel.tp, "pp": p.parallel.pp, "dp": p.parallel.dp},
        "figures": {f.key: {"value": f.value, "unit": f.unit, "formula": f.formula} for f in e.figures.values()},
        "slo": slo_rows,
        "findings": [
            {"code": f.code, "severity": f.severity, "message": f.message, "numbers": f.numbers} for f in found
        ],
        "errors": sum(f.severity == "error" for f in found),
    }


def render(doc: dict, fmt: str = "simple") -> str:
    """The text report, from the JSON document."""
    lines = [f"plan {doc['plan']} ({doc['path']})"]
    if doc["source"]:
        lines.append(f"source: {doc['source']}")
    if doc["assumed"]:
        lines.append(f"assumed (not in the source): {', '.join(doc['assumed'])}")
    d = doc["degrees"]
    lines.append(f"degrees: EP {d['ep']} · TP {d['tp']} · PP {d['pp']} · DP {d['dp']}")
    rows = [[key, human(f["value"], f["unit"]), f["formula"]] for key, f in doc["figures"].items()]
    lines += ["", tabulate(rows, headers=["derived", "value", "formula"], tablefmt=fmt)]
    if doc["slo"]:
        rows = [
            [s["slo"], s["op"], s["limit"], "-" if s["derived"] is None else s["derived"],
             {True: "met", False: "NOT MET", None: "not modelled"}[s["met"]]]
            for s in doc["slo"]
        ]  # fmt: skip
        for row, s in zip(rows, doc["slo"], strict=True):
            unit = doc["figures"].get(s["slo"], {}).get("unit", "")
            row[2], row[3] = human(s["limit"], unit), human(s["derived"], unit) if s["derived"] is not None else "-"
        lines += ["", tabulate(rows, headers=["SLO", "", "limit", "derived", "verdict"], tablefmt=fmt)]
    lines.append("")
    if not doc["findings"]:
        lines.append("no findings")
    for f in doc["findings"]:
        lines.append(f"{f['severity']:7s} {f['code']}: {f['message']}")
    errors = doc["errors"]
    lines += ["", f"{errors} error{'s' if errors != 1 else ''}, {len(doc['findings']) - errors} other findings"]
    return "\n".join(lines)
