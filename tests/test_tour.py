"""The default set (``scenarios/*.toml``, what ``nox -s bench`` and ``moebench run scenarios`` run) stays
a tour: every capability shown by at least one file, each tour file (``tour-*.toml``) a few runs, the tour a
bounded number of runs; beside it, the seed plans' sweeps, each of its own bounded size: the serving
workload (``seed-serve.toml``: request rate × batching × EP/DP) and training (``seed-train.toml``: EP/DP at
W 1, 2, 4 against one device; ``train-recompute.toml``; ``train-memory.toml``: bytes per rank against E;
``alerts.toml``: the deployment plan's alerts, one load that fires and one that does not; ``real-models.toml``:
four Hugging Face MoE blocks through equivalence and throughput).

Counted with the loader's own expansion (``moebench.runner.load_all``, what ``moebench run`` plans),
never by timing: the bound holds on a busy host as on a quiet one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moebench.runner import load_all
from moebench.scenario import RunSpec, discover

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"

# The whole tour's runs. A run costs a few seconds on a quiet 2-core CPU host even when small (the
# ranks start and import torch; the old default set averaged 5.8 s a run over 106 runs, 10 min 18 s),
# so 20 runs keep the tour near 2 minutes there, under the 3 a newcomer's first command may take; the seed
# plan's serving sweep (seed-serve.toml, 12 runs) adds about 2.2 more to `nox -s bench` (docs/measurements.md).
MAX_TOUR_RUNS = 20
MAX_RUNS_PER_FILE = 3  # one point, or a same-run comparison of two or three (e.g. LRU vs Belady)
# the default set's seed-plan sweeps, and each one's bound in runs
SEED_FILES = {
    "seed-serve.toml": 12,
    "seed-train.toml": 6,
    "train-recompute.toml": 3,
    "train-memory.toml": 8,
    "eplb.toml": 4,
    "seq-routing.toml": 2,
    "alerts.toml": 2,  # the deployment plan's monitoring: one load that fires expert_overload, one that does not
    "real-models.toml": 8,  # four HF MoE blocks through equivalence and throughput (skipped without transformers)
}


def _offloaded(r: RunSpec) -> bool:
    return r.offload.get("cache_slots") is not None


def _plain_timed(r: RunSpec, kind: str) -> bool:
    return r.kind == kind and not _offloaded(r) and not r.parallel["overlap_chunks"] and r.workload["skew"] != "trace"


# capability -> what one file's runs must do to show it (all runs of that file together)
CAPABILITIES = {
    "throughput": lambda runs: any(_plain_timed(r, "throughput") for r in runs),
    "latency": lambda runs: any(_plain_timed(r, "latency") for r in runs),
    "load balance under the seed plan's gate": lambda runs: any(
        r.kind == "load_balance" and any(s.metric == "load_cv" for s in r.slos) for r in runs
    ),
    "Zipf-skewed routing": lambda runs: any(r.workload["skew"] == "zipf" for r in runs),
    "equivalence, top-2 with capacity dropping": lambda runs: any(
        r.kind == "equivalence" and r.model["top_k"] == 2 and r.routing["capacity_factor"] > 0 for r in runs
    ),
    "equivalence, dropless": lambda runs: any(
        r.kind == "equivalence" and r.routing["capacity_factor"] == 0 for r in runs
    ),
    "dispatch over the raw all-to-all (EP > 1)": lambda runs: any(
        r.kind == "dispatch" and r.world_size > 1 for r in runs
    ),
    "experts over the loop floor": lambda runs: any(r.kind == "experts" for r in runs),
    "offload, a policy beside Belady in the same file": lambda runs: (
        {r.offload["policy"] for r in runs if _offloaded(r)} > {"belady"}  # belady and another
    ),
    "overlap (C > 1, timed against C = 1 in the run)": lambda runs: any(
        (r.parallel["overlap_chunks"] or 1) > 1 and r.world_size > 1 for r in runs
    ),
    "fault detection by the watchdog": lambda runs: any(
        r.kind == "fault" and r.fault.get("type") in ("crash", "hang") and not r.fault.get("checkpoint_every")
        for r in runs
    ),
    "failover to a replica": lambda runs: any(
        r.kind == "fault" and r.fault.get("type") in ("expert_loss", "rank_loss") and r.parallel["redundant_experts"]
        for r in runs
    ),
    "checkpoint and resume": lambda runs: any(
        r.kind == "fault" and r.fault.get("checkpoint_every") and r.workload["train"] for r in runs
    ),
    "EPLB: re-placed against static in the same run, with drift, at EP 2 and 4": lambda runs: (
        any(r.eplb["interval"] and r.workload["drift_every"] for r in runs)
        and {r.world_size for r in runs if r.eplb["interval"]} >= {2, 4}
    ),
    "routing trace replay": lambda runs: any(r.workload["skew"] == "trace" for r in runs),
    "sequence routing beside token routing on the same workload": lambda runs: (
        {r.routing["granularity"] for r in runs} == {"token", "sequence"} and len({r.kind for r in runs}) == 1
    ),
    "equivalence, sequence routing": lambda runs: any(
        r.kind == "equivalence" and r.routing["granularity"] == "sequence" and r.world_size > 1 for r in runs
    ),
    "serving: a request-rate sweep, continuous vs static batching, EP vs DP": lambda runs: (
        len({str(r.serve["request_rate"]) for r in runs if r.kind == "serve"}) >= 3
        and {r.serve["batching"] for r in runs if r.kind == "serve"} == {"continuous", "static"}
        and {r.parallel["mode"] for r in runs if r.kind == "serve" and r.world_size > 1} == {"ep", "dp"}
    ),
    "training: convergence against the single-device run, EP and DP at W 1, 2 and 4": lambda runs: (
        {(r.parallel["mode"], r.world_size) for r in runs if r.kind == "train"}
        >= {(m, w) for m in ("ep", "dp") for w in (1, 2, 4)}
    ),
    "training: activation recomputation none vs experts vs layer": lambda runs: (
        {r.model["recompute"] for r in runs if r.kind == "train"} == {"none", "experts", "layer"}
    ),
    "alerts: one load fires the deployment plan's expert_overload, one fires none": lambda runs: (
        any(r.alerts and r.workload["skew"] == "uniform" for r in runs)
        and any(r.alerts and r.workload["skew"] == "zipf" for r in runs)
    ),
    "other implementations (HF blocks) against the fp64 reference and timed against the runtime": lambda runs: (
        {r.kind for r in runs if r.model["impl"].startswith("hf:")} >= {"equivalence", "throughput"}
    ),
    "training: memory per rank against num_experts, EP vs DP": lambda runs: (
        len({r.model["num_experts"] for r in runs if r.kind == "train"}) >= 2
        and {r.parallel["mode"] for r in runs if r.kind == "train" and r.world_size > 1} == {"ep", "dp"}
    ),
}


@pytest.fixture(scope="module")
def tour():
    """{file name: its runs}, as `moebench run scenarios` would plan them on this host."""
    files: dict[str, list] = {}
    for sc in load_all([str(SCENARIOS)], {}):  # a file listing several kinds is one scenario per kind
        files.setdefault(Path(sc.path).name, []).extend(sc.runs)
    return files


def test_the_tour_is_the_top_level_files_only_never_the_sweeps_or_the_regress_set(tour):
    assert [p.parent for p in discover([SCENARIOS])] == [SCENARIOS] * len(tour)  # `run DIR` does not recurse
    assert set(tour) == {p.name for p in SCENARIOS.glob("*.toml")}
    tour_names = {runs[0].name for runs in tour.values()}
    elsewhere = {sc.name for sc in load_all([str(SCENARIOS / d) for d in ("sweeps", "regress", "calibrate")], {})}
    assert not tour_names & elsewhere  # a tour result never pairs with a sweep's in `moebench compare`


@pytest.mark.parametrize("capability", list(CAPABILITIES))
def test_every_capability_is_shown_by_a_tour_file(tour, capability):
    showing = [name for name, runs in tour.items() if CAPABILITIES[capability](runs)]
    assert showing, f"no tour file shows {capability}"


def test_each_tour_file_is_a_few_runs_and_the_whole_tour_at_most_the_bound(tour):
    counts = {name: len(runs) for name, runs in tour.items() if name not in SEED_FILES}
    assert all(name.startswith("tour-") for name in counts), counts  # the default set: tour files and seed files
    assert all(1 <= n <= MAX_RUNS_PER_FILE for n in counts.values()), counts
    assert sum(counts.values()) <= MAX_TOUR_RUNS, counts
    assert all(1 <= len(tour[name]) <= bound for name, bound in SEED_FILES.items()), SEED_FILES


def test_the_full_sweeps_are_kept_in_their_own_folder(tour):
    sweeps = {Path(sc.path).name: len(sc.runs) for sc in load_all([str(SCENARIOS / "sweeps")], {})}
    # the sweeps the tour's files point to, with their points
    assert sweeps["offload.toml"] == 4 * 3 * 3 and sweeps["faults.toml"] == 6 and sweeps["overlap.toml"] == 4
    assert sum(sweeps.values()) > 5 * sum(len(runs) for name, runs in tour.items() if name not in SEED_FILES)
