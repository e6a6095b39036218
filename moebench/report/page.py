"""The outputs of ``moebench report`` beyond its text tables: one self-contained HTML page, the plots
as PNG files, and a CSV of every run's metrics.

The page needs no network: CSS inline and each plot a PNG in a base64 ``data:`` URI. It opens with a
summary, one row per result file (``summary_rows``: its verdict, failed checks and missed SLO gates,
its headline metric, a link to its section), then the environments the results came from (host, CPU,
GPUs, torch, git sha) and every warning (a busy host, a failed check, a missed SLO, a run that
errored), then per result file its table (the same columns as ``moebench report`` prints) and its
plots (``moebench.report.plots``). The CSV has one row per run and metric (columns in ``CSV_COLUMNS``,
documented in docs/results.md, "CSV").
"""

from __future__ import annotations

import base64
import csv
import html
import json
import os
from pathlib import Path

from tabulate import tabulate

from moebench.report import fault_table
from moebench.report import plots as P
from moebench.report.results import table_cells, verdict, warnings

CSV_COLUMNS = ("scenario", "params", "metric", "unit", "median", "p90", "p99", "n")
ENV_FIELDS = (  # (label, how to read it from a result file's environment)
    ("host", lambda e: e.get("host")),
    ("CPU", lambda e: f"{e.get('cpu') or '?'} ({e.get('cpu_count') or '?'} cores)"),
    ("GPUs", lambda e: ", ".join(e.get("gpus") or []) or "none"),
    ("GPU driver / CUDA / NCCL", lambda e: " / ".join(str(e.get(k) or "-") for k in ("gpu_driver", "cuda", "nccl"))),
    ("python / torch", lambda e: f"{e.get('python') or '?'} / {e.get('torch') or '?'}"),
    ("git", lambda e: (e.get("git_sha") or "unknown")[:10] + (" (dirty)" if e.get("git_dirty") else "")),
)
CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: 12px; }
th, td { border: 1px solid #ddd; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
.wide { overflow-x: auto; max-width: 100%; }
.env td { text-align: left; white-space: normal; } .env td:first-child { font-weight: 600; white-space: nowrap; }
.warn { background: #fff3cd; border: 1px solid #e0c060; padding: .5em 1em; }
.warn li { margin: .2em 0; } ul.warn { padding-left: 2.2em; }
.ok { background: #e6f4ea; border: 1px solid #8c8; padding: .5em 1em; }
.src { color: #666; font-size: 12px; }
.summary td { text-align: left; } .verdict-FAIL, .verdict-error { color: #a00; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #444; white-space: pre-line; }
"""


def rendered_plots(docs: list[dict], paths: list[Path]) -> list[list[tuple[P.Plot, bytes]]]:
    """Per result file, its plots drawn to PNG, with file stems made unique across the whole report."""
    seen: set[str] = set()
    out = []
    for doc, path in zip(docs, paths, strict=True):
        try:
            plots = P.plots_for(doc)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as err:  # e.g. hand-edited details
            raise ValueError(f"{path}: malformed result file: {type(err).__name__}: {err}") from None
        drawn = []
        for plot in plots:
            name, i = plot.name, 2
            while name in seen:  # two result files of the same scenario name
                name, i = f"{plot.name}-{i}", i + 1
            seen.add(name)
            drawn.append((P.Plot(name, plot.title, plot.draw), _png(plot)))
        out.append(drawn)
    return out


def _png(plot: P.Plot) -> bytes:
    fig = plot.draw()
    return P.png(fig)


def write_plots(folder: Path, drawn: list[list[tuple[P.Plot, bytes]]]) -> list[Path]:
    """Each plot as ``folder/<name>.png``."""
    paths = []
    for plot, data in (item for per_doc in drawn for item in per_doc):
        path = folder / f"{plot.name}.png"
        try:
            path.write_bytes(data)
        except OSError as err:
            raise ValueError(f"--plots {folder}: cannot write {path.name}: {err.strerror}") from None
        paths.append(path)
    return paths


SUMMARY_HEADERS = ("scenario", "kind", "runs", "verdict", "failed checks and SLO gates", "headline metric")


def anchors(docs: list[dict]) -> list[str]:
    """Each result file's section id: its scenario's name, made unique (``-2``, ...) when two files share it."""
    seen, out = set(), []
    for doc in docs:
        base = P.slug(doc["scenario"]["scenario"]["name"])
        anchor, i = base, 2
        while anchor in seen:
            anchor, i = f"{base}-{i}", i + 1
        seen.add(anchor)
        out.append(anchor)
    return out


def scenario_verdict(runs: list[dict]) -> str:
    """A result file's verdict from its runs' (``results.verdict``): error when a run did not finish, else
    FAIL when one failed a check or SLO gate, else ok; skipped when every run was; "no runs" when none."""
    verdicts = {verdict(run) for run in runs}
    for word in ("error", "FAIL"):
        if word in verdicts:
            failing = sum(verdict(run) == word for run in runs)
            return f"{word} ({failing} of {len(runs)} runs)"
    return "skipped" if verdicts == {"skipped"} else ("ok" if runs else "no runs")


def failed_names(runs: list[dict]) -> list[str]:
    """The checks that failed and the SLO gates missed in any finished run, each once, with how many
    runs it failed in when more than one."""
    counts: dict[str, int] = {}
    for run in runs:
        if run["status"] != "ok":
            continue
        names = [c["name"] for c in run["checks"] if not c["pass"]]
        names += [f"SLO {s.get('gate') or s['metric']}" for s in run.get("slo", []) if s["pass"] is False]
        for name in dict.fromkeys(names):
            counts[name] = counts.get(name, 0) + 1
    return [name if n == 1 else f"{name} ({n} runs)" for name, n in counts.items()]


def headline(doc: dict) -> str:
    """The file's first recorded column (its kind's headline metric) over its finished runs: ``header: value``,
    or ``header: low – high`` across several runs; ``-`` when no run measured it or the file records no columns."""
    if not doc.get("columns"):
        return "-"
    column, header, scale, fmt = doc["columns"][0]
    name, _, stat = column.partition(":")
    values = []
    for run in doc["runs"]:
        m = (run.get("metrics") or {}).get(name) or {}
        if run["status"] == "ok" and isinstance(m.get(stat or "median"), (int, float)):
            values.append(m[stat or "median"] * scale)
    if not values:
        return f"{header}: -"
    low, high = format(min(values), fmt), format(max(values), fmt)
    return f"{header}: {low}" if low == high else f"{header}: {low} – {high}"


def summary_rows(docs: list[dict]) -> list[tuple[str, list[str]]]:
    """One row per result file: (its section's anchor, cells in ``SUMMARY_HEADERS`` order)."""
    rows = []
    for doc, anchor in zip(docs, anchors(docs), strict=True):
        info, runs = doc["scenario"]["scenario"], doc["runs"]
        failed = ", ".join(failed_names(runs)) or "-"
        rows.append(
            (anchor, [info["name"], info["kind"], str(len(runs)), scenario_verdict(runs), failed, headline(doc)])
        )
    return rows


def _summary_table(docs: list[dict]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in SUMMARY_HEADERS)
    body = []
    for anchor, (name, *cells) in summary_rows(docs):
        word = cells[2].split(" ")[0]
        tds = [f'<td><a href="#{e(anchor)}">{e(name)}</a></td>']
        tds += [
            f'<td class="verdict-{e(word)}">{e(c)}</td>' if i == 2 else f"<td>{e(c)}</td>" for i, c in enumerate(cells)
        ]
        body.append(f"<tr>{''.join(tds)}</tr>")
    return _wide(f'<table id="summary"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>', "summary")


def page(docs: list[dict], paths: list[Path], drawn: list[list[tuple[P.Plot, bytes]]]) -> str:
    """The whole HTML page (self-contained) of result files ``docs`` read from ``paths``."""
    e = html.escape
    shown = shown_paths(paths)
    scenarios = [doc["scenario"]["scenario"]["name"] for doc in docs]
    notes = [(name, note) for name, doc in zip(scenarios, docs, strict=True) for note in warnings(doc)]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>moebench report: {e(', '.join(scenarios))}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>moebench report</h1>",
        f'<p class="src">{len(docs)} result file(s): {e(", ".join(shown))}</p>',
        "<h2>Summary</h2>",
        _summary_table(docs),
        "<h2>Environment</h2>",
        _environment_table(docs, scenarios),
    ]
    if notes:
        items = "".join(f"<li><b>{e(name)}</b>: {e(note)}</li>" for name, note in notes)
        parts.append(f'<div class="warn"><b>Warnings</b><ul>{items}</ul></div>')
    else:
        parts.append('<p class="ok">No warnings: every run finished and passed its checks and SLO gates.</p>')
    for doc, path, plots, anchor in zip(docs, shown, drawn, anchors(docs), strict=True):
        parts.append(_section(doc, path, plots, anchor))
    faults = fault_table.rows(docs)
    if faults:  # one table across every file's fault runs, as the text report prints it
        table = _wide(tabulate(faults, headers=fault_table.HEADERS, tablefmt="html", disable_numparse=True))
        parts.append(f'<section id="fault-table"><h2>Fault table</h2>{table}</section>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def shown_paths(paths: list[Path]) -> list[str]:
    """How the page names each result file: relative to the folder all of them share, so a page
    made from ``/tmp/ds/*.json`` says ``a.json``, never the machine's folder (a committed page would
    carry it). Files in different folders keep the part of their path that tells them apart."""
    absolute = [Path(path).absolute() for path in paths]
    if not absolute:
        return []
    root = Path(os.path.commonpath([path.parent for path in absolute]))
    return [path.relative_to(root).as_posix() for path in absolute]


def _environment_table(docs: list[dict], scenarios: list[str]) -> str:
    """One column per distinct environment (the host the results came from), naming its scenarios."""
    envs: dict[tuple, list[str]] = {}
    for name, doc in zip(scenarios, docs, strict=True):
        key = tuple(str(read(doc["environment"])) for _, read in ENV_FIELDS)
        envs.setdefault(key, []).append(name)
    rows = [[label, *(key[i] for key in envs)] for i, (label, _) in enumerate(ENV_FIELDS)]
    rows.append(["scenarios", *(", ".join(names) for names in envs.values())])
    return _wide(tabulate(rows, tablefmt="html", disable_numparse=True), "env")


def _wide(table: str, also: str = "") -> str:
    """``table`` in a box that scrolls sideways: a table wider than the page (a sweep's many
    columns) scrolls inside it instead of widening the whole page."""
    return f'<div class="{" ".join(filter(None, ("wide", also)))}">{table}</div>'


def _section(doc: dict, path: str, plots: list[tuple[P.Plot, bytes]], anchor: str) -> str:
    e = html.escape
    info, env = doc["scenario"]["scenario"], doc["environment"]
    headers, rows = table_cells(doc)
    sha = (env.get("git_sha") or "unknown")[:10] + (" (dirty)" if env.get("git_dirty") else "")
    parts = [
        f'<section id="{e(anchor)}">',
        f"<h2>{e(info['name'])} ({e(info['kind'])})</h2>",
        f"<p>{e(info.get('description', ''))}</p>" if info.get("description") else "",
        f'<p class="src">{e(doc["source"])} · {e(path)} · git {e(sha)}</p>',
        _wide(tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True)),
    ]
    notes = warnings(doc)
    if notes:
        parts.append('<ul class="warn">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    for plot, data in plots:
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        parts.append(
            f'<figure id="{e(plot.name)}"><img alt="{e(plot.title)}" src="{uri}">'
            f"<figcaption>{e(plot.title)}</figcaption></figure>"
        )
    parts.append("</section>")
    return "\n".join(p for p in parts if p)


def csv_rows(docs: list[dict]) -> list[list]:
    """One row per run and metric, in ``CSV_COLUMNS`` order; params as compact JSON (``{}`` when
    nothing is swept); a statistic the file has as null is an empty cell. Runs that did not finish
    have no metrics, so no rows."""
    rows = []
    for doc in docs:
        name = doc["scenario"]["scenario"]["name"]
        for run in doc["runs"]:
            params = json.dumps(run["params"], separators=(",", ":"))
            for metric, m in run["metrics"].items():
                stats = ["" if m.get(k) is None else m[k] for k in ("median", "p90", "p99", "n")]
                rows.append([name, params, metric, m.get("unit") or "", *stats])
    return rows


def write_csv(docs: list[dict], out) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    writer.writerows(csv_rows(docs))
