"""``moebench run``: load scenarios, run every expanded run, judge it, and write the results.

1. Load and validate every file first: a bad scenario stops everything before any run (exit 2).
2. For each scenario, for each run: launch the ranks (spawned here, or torchrun's), measure,
   evaluate metrics, checks and SLOs, and rewrite the scenario's result file atomically, so a
   crash or Ctrl-C later keeps every run already finished.
3. A run that raises is recorded with its error and the others go on; so is a result file that
   cannot be written (one line naming it; exit 1).
4. Print each scenario's table, rendered from the JSON just written.
5. Ctrl-C stops the ranks and raises ``Interrupted``, whose message says how many runs are kept.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import os
import re
import sys
import time
from pathlib import Path

import torch

from moebench import adapters, kinds
from moebench.launch.spawn import is_rank_zero, last_line, launch, resolve_device, under_torchrun
from moebench.measure import host
from moebench.measure.environment import environment, short_sha
from moebench.measure.telemetry import combine_summaries
from moebench.report.results import SCHEMA, json_safe, read, render, verdict, write_atomic
from moebench.scenario import RunSpec, Scenario, ScenarioError, discover, load_file
from moebench.workload import trace as routing_trace
from moebench.workload.tokens import layer_weights


def load_all(paths: list[str], overrides: dict) -> list[Scenario]:
    """Every scenario file under ``paths``, validated, with devices checked against this host."""
    scenarios = [sc for p in discover(paths) for sc in load_file(p, overrides)]
    names = {}
    for sc in scenarios:
        if sc.name in names:
            raise ScenarioError(f'{sc.path}: [scenario] name = "{sc.name}" is also used by {names[sc.name]}')
        names[sc.name] = sc.path
        for spec in sc.runs:
            _check_host(spec)
    return scenarios


def run_device(spec: RunSpec) -> tuple[str, str]:
    """The (device, backend) a run uses. ``device = "auto"`` means CUDA when the run has a GPU per
    rank (or runs under torchrun on a GPU host), else the CPU with gloo ranks."""
    device, backend = spec.parallel["device"], spec.parallel["backend"]
    if device == "auto":
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        fits = gpus > 0 and (under_torchrun() or spec.world_size <= gpus)
        device = "cuda" if fits and backend != "gloo" else "cpu"
    return resolve_device(device, backend)


def _check_host(spec: RunSpec) -> None:
    """Refuse runs this host cannot start (no GPU for cuda, too few GPUs for NCCL ranks)."""
    try:
        _, backend = run_device(spec)
    except ValueError as err:
        raise ScenarioError(f"{spec.path}: [parallel] {err}") from None
    if backend == "nccl" and not under_torchrun() and spec.world_size > torch.cuda.device_count():
        raise ScenarioError(
            f"{spec.path}: [parallel] world_size = {spec.world_size} is invalid with NCCL on this host: "
            f'accepted at most {torch.cuda.device_count()} (one rank per visible GPU), or device = "cpu"'
        )


def _judge_slos(spec: RunSpec, metrics: dict) -> list[dict]:
    verdicts = []
    for slo in spec.slos:
        entry = {"gate": slo.key, "metric": slo.metric, "stat": slo.stat, "op": slo.op, "limit": slo.limit}
        entry["source"] = slo.source
        m = metrics.get(slo.metric)
        if m is None:
            verdicts.append({**entry, "value": None, "pass": None, "detail": "not measured in this run"})
            continue
        value = m[slo.stat]
        ok = value <= slo.limit if slo.op == "max" else value >= slo.limit  # NaN fails both
        verdicts.append({**entry, "value": value, "pass": bool(ok)})
    return verdicts


def run_one(
    spec: RunSpec, interval: float | None, record_dir: Path | None = None, trace_dir: Path | None = None
) -> dict:
    """Launch, measure and judge one run; never raises for a failure of the run itself. ``record_dir``:
    write its routing trace there (--record-routing); ``trace_dir``: its profiler traces (--trace)."""
    device, backend = run_device(spec)
    run = {"params": spec.params, "config": spec.resolved(), "world_size": spec.world_size}
    run.update({"device": device, "backend": backend, "status": "ok", "error": None})
    run.update({"metrics": {}, "checks": [], "slo": [], "telemetry": None, "details": {}})
    load_before, cpu_before = host.load_avg(), host.cpu_snapshot()
    if under_torchrun() and spec.world_size != int(os.environ["WORLD_SIZE"]):
        run.update(
            status="skipped",
            error=f"torchrun started {os.environ['WORLD_SIZE']} ranks, this run needs {spec.world_size}",
        )
        return _record_host(run, spec, load_before, cpu_before)
    try:
        missing = adapters.unavailable(spec.model.get("impl", adapters.RUNTIME), device)
    except Exception as err:  # a user's factory whose unavailable() raises: this run's error, not the whole run's
        run.update(status="error", error=f"{type(err).__name__}: {last_line(err)}")
        return _record_host(run, spec, load_before, cpu_before)
    if missing:  # the implementation needs what this host lacks: skipped, as a GPU run is on a CPU host
        run.update(status="skipped", error=missing)
        return _record_host(run, spec, load_before, cpu_before)
    start, threads = time.perf_counter(), None
    try:
        if record_dir is not None:
            spec = dataclasses.replace(spec, record_routing=True)
        if trace_dir is not None:
            spec = dataclasses.replace(spec, trace_dir=str(Path(trace_dir) / run_label(spec)))
        _calibrate_routers(spec)
        kind = kinds.get(spec.kind)
        if kind.launch is not None:  # the fault kind: a watchdog, and its verdict as the result
            per_rank = kind.launch(spec, interval, device, backend)
        else:
            per_rank = launch(kinds.measure, spec.world_size, spec, interval, device=device, backend=backend)
        threads = per_rank[0].get("threads")
        metrics, checks, details = kinds.evaluate(spec, per_rank)
        if "alerts" in details:  # the alerts a run with [alerts] fired (moebench/measure/series.py)
            run["alerts"] = details.pop("alerts")
        telemetry = combine_summaries([r["telemetry"] for r in per_rank], kinds.window_tokens(spec))
        run.update(metrics=metrics, checks=checks, details=details, telemetry=telemetry)
        run["slo"] = _judge_slos(spec, metrics)
        if record_dir is not None and is_rank_zero():
            run["routing_trace"] = _record_routes(spec, per_rank, record_dir)
        if trace_dir is not None and is_rank_zero():
            run["profile_trace"] = _profile_traces(spec, per_rank)
    except Exception as err:
        run.update(status="error", error=f"{type(err).__name__}: {last_line(err)}")
    run["wall_time_s"] = time.perf_counter() - start
    return _record_host(run, spec, load_before, cpu_before, threads)


def _record_host(
    run: dict, spec: RunSpec, load_before: list[float] | None, cpu_before: host.CpuSnapshot, threads: int | None = None
) -> dict:
    """Add the host's state (``host``) and whether it was too busy to time (``host_busy``) to ``run``;
    ``threads``: the torch threads rank 0 ran with (None: the run never started; the default is recorded)."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", spec.world_size))  # the ranks sharing this host
    threads = threads or host.threads_per_rank(ranks, spec.parallel.get("threads_per_rank", 0))
    own_scale = ranks if under_torchrun() else 1  # torchrun's other local ranks are siblings, not our children
    run["host"] = host.record(load_before, cpu_before, threads, ranks, own_scale, device=run["device"])
    run["host_busy"] = host.judge(run["host"])[0]
    return run


def default_out_dir() -> Path:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path("results") / "runs" / f"{stamp}-{short_sha()}"


def _log(message: str) -> None:
    if is_rank_zero():
        print(message, file=sys.stderr, flush=True)


def _calibrate_routers(spec: RunSpec) -> None:
    """Fit the skew's router offsets here, once: the ranks then read them from the calibration cache
    (``moebench.workload.tokens``) rather than each fitting the same offsets at the same time."""
    wl = spec.workload
    if spec.kind != "experts" and wl["skew"] != "trace":
        layer_weights(spec.moe_config(), spec.model["layers"], wl["seed"], wl["skew"], wl["skew_param"])


def run_label(spec: RunSpec) -> str:
    """A file name for one run: its scenario's name and swept params, file-system safe."""
    label = re.sub(r"[^A-Za-z0-9_.=-]", "_", spec.name + "".join(f"-{k}={v}" for k, v in spec.params.items()))
    if len(label) > 200:  # cut, and keep runs apart by a digest of their params
        label = label[:180] + "-" + hashlib.sha256(repr(spec.params).encode()).hexdigest()[:12]
    return label


def _record_routes(spec: RunSpec, per_rank: list[dict], record_dir: Path) -> dict:
    """Write the run's expert choices as a routing trace (``moebench.workload.trace``), atomically. Returns
    ``{"path": ...}``, or ``{"path": None, "note": why}``: a trace that cannot be written costs the
    trace, never the run's results."""
    if "routes" in per_rank[0]:
        routes = [[r["routes"]] for r in per_rank]
    elif per_rank[0].get("batches") and "routes" in per_rank[0]["batches"][0]:
        routes = [[b["routes"] for b in r["batches"]] for r in per_rank]
    else:
        return {"path": None, "note": f"kind = {spec.kind} records no routing (it routes no workload batch)"}
    path = Path(record_dir) / f"{run_label(spec)}.npz"
    params = {"scenario": spec.name, **spec.params, "ranks": spec.world_size}
    params["tokens_per_rank"] = spec.workload["tokens_per_rank"]
    try:
        routing_trace.save(path, routing_trace.assemble(routes), spec.model["num_experts"], params)
    except OSError as err:
        _log(f"moebench: routing trace {path} not written: {err.strerror or err}")
        return {"path": None, "note": f"not written: {err.strerror or err}"}
    return {"path": str(path)}


def _profile_traces(spec: RunSpec, per_rank: list[dict]) -> dict:
    """The run's profiler traces (``moebench.measure.profile_trace``), one per rank: ``{"paths": [...]}`` in
    rank order, with a ``note`` for the ranks that wrote none (null paths), or for a kind without a step."""
    if "profile_trace" not in per_rank[0]:
        note = f"kind = {spec.kind} has no step to trace (--trace covers throughput and latency runs)"
        _log(f"moebench: {spec.name}: {note}")
        return {"paths": [], "note": note}
    out = {"paths": [r["profile_trace"]["path"] for r in per_rank]}
    notes = [r["profile_trace"]["note"] for r in per_rank if r["profile_trace"]["path"] is None]
    if notes:
        out["note"] = "; ".join(notes)
        _log(f"moebench: profiler trace {out['note']}")
    return out


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_scenarios``; the message says which finished runs were kept."""


def run_scenarios(
    scenarios: list[Scenario],
    out_dir: Path,
    interval: float | None,
    fmt="plain",
    record_dir: Path | None = None,
    trace_dir: Path | None = None,
    invocation: dict | None = None,
) -> int:
    """Run everything; write one JSON per scenario under ``out_dir``. Returns the exit code.
    ``invocation``: how the command was invoked (``cli.invocation``), recorded in each result file."""
    kept = {}  # scenario name -> runs in its result file
    try:
        return _run_all(scenarios, out_dir, interval, fmt, kept, record_dir, trace_dir, invocation)
    except KeyboardInterrupt:
        runs = sum(kept.values())
        raise Interrupted(
            f"{runs} finished run{'s' * (runs != 1)} kept in {out_dir}/" if runs else "no run finished"
        ) from None


def _write(path: Path, doc: dict) -> bool:
    """Write a result file; on failure say so in one line (the run is still judged and shown)."""
    try:
        write_atomic(path, doc)
        return True
    except OSError as err:
        _log(f"moebench: error: {path}: cannot write the result file: {err.strerror or err}")
        return False


def _run_all(
    scenarios: list[Scenario],
    out_dir: Path,
    interval: float | None,
    fmt,
    kept: dict,
    record_dir: Path | None,
    trace_dir: Path | None,
    invocation: dict | None = None,
) -> int:
    env = environment()
    total, done, all_ok = sum(len(sc.runs) for sc in scenarios), 0, True
    _log(f"moebench: {total} runs from {len(scenarios)} scenarios; results in {out_dir}/")
    for sc in scenarios:
        doc = {
            "schema": SCHEMA,
            "source": sc.path,
            "invocation": invocation,
            "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "scenario": sc.sections,
            "columns": [list(column) for column in kinds.get(sc.sections["scenario"]["kind"]).columns],
            "environment": dict(env),
            "runs": [],
        }
        written = False
        for spec in sc.runs:
            done += 1
            _log(f"[{done}/{total}] {sc.name} {spec.params or ''} ...")
            run = run_one(spec, interval, record_dir, trace_dir)
            doc["runs"].append(run)
            all_ok &= verdict(run) in ("ok", "skipped")
            ran = [r for r in doc["runs"] if r["status"] != "skipped"]
            doc["environment"]["world_sizes"] = sorted({r["world_size"] for r in ran})
            doc["environment"]["backends"] = sorted({r["backend"] for r in ran})
            _log(f"[{done}/{total}] {sc.name} {spec.params or ''}: {verdict(run)} in {run.get('wall_time_s', 0):.1f} s")
            if is_rank_zero():
                written = _write(out_dir / f"{sc.name}.json", doc)
                all_ok &= written
                if written:
                    kept[sc.name] = len(doc["runs"])
        if is_rank_zero():
            saved = read(out_dir / f"{sc.name}.json") if written else json_safe(doc)
            print(render(saved, fmt) + "\n", flush=True)
    return 0 if all_ok else 1
