"""Inject many random faults, one run each, and count what went wrong with the handling.

    python -m moebench.tools.fault_soak [--faults 100] [--seed 0] [--timeout 2.0]

Each fault is a ``fault`` kind run (``moebench/kinds/fault/kind.py``) with a random type (crash, hang,
nan, straggler, expert_loss, rank_loss), world size (2 or 4 gloo ranks), rank, layer, step,
expert, redundant experts (0 to 2) and ``on_expert_loss``, on a small 2-layer stack. It reports,
over all of them:

- ``hangs``: runs that took longer than the watchdog timeout + ``HANG_MARGIN_S`` (the launcher
  never returned in time: a hang of the handling itself); must be 0;
- ``orphans``: rank processes alive after their run ended (any ``rank_entry.py`` child left);
  must be 0;
- ``late``: faults detected later than the timeout + 5 s after the injection; must be 0;
- ``undetected`` and ``misnamed``: the fault was not seen, or seen and named wrong (the check
  ``fault_detected``); must be 0;
- ``inexact``: a loss the replicas covered whose output still changed (the check
  ``failover_exact``); must be 0.

Exits 1 when any count is not 0. The README quotes its output. Not in the unit suite (minutes).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from moebench import runner
from moebench.kinds.fault.kind import ON_EXPERT_LOSS, STRAGGLER_STEPS, TYPES
from moebench.scenario import load

HANG_MARGIN_S = 60.0  # a run may take this much beyond its watchdog timeout before it counts as hung
LAYERS, EXPERTS, STEPS = 2, 8, 8

SCENARIO = """
[scenario]
name = "soak"
kind = "fault"
warmup = 2
repeats = {repeats}
[model]
hidden = 64
ffn_hidden = 128
num_experts = {experts}
top_k = 2
layers = {layers}
[parallel]
world_size = {world}
device = "cpu"
threads_per_rank = 1
redundant_experts = {redundant}
[workload]
tokens_per_rank = 64
[fault]
type = "{type}"
rank = {rank}
layer = {layer}
expert = {expert}
at_step = {at_step}
detect_timeout_s = {timeout}
on_expert_loss = "{on_loss}"
"""


def _rank_children() -> list[int]:
    """Live processes whose parent is this one and that run ``rank_entry.py`` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"rank_entry.py" in cmd:
            found.append(int(pid))
    return found


def soak(faults: int, seed: int, timeout: float, folder: Path) -> dict:
    """Run ``faults`` random fault runs; return the counts and one row per fault."""
    rng = random.Random(seed)
    counts = dict.fromkeys(("faults", "hangs", "orphans", "late", "undetected", "misnamed", "inexact"), 0)
    rows, problems = [], []
    for i in range(faults):
        world = rng.choice((2, 4))
        kind = rng.choice(TYPES)
        last = STEPS - STRAGGLER_STEPS if kind == "straggler" else STEPS - 1  # a straggler is named after 2 steps
        fault = {
            "type": kind,
            "rank": rng.randrange(world),
            "layer": rng.randrange(LAYERS),
            "expert": rng.randrange(EXPERTS),
            "at_step": rng.randint(1, last),
        }
        extra = {"redundant": rng.randrange(3), "on_loss": rng.choice(ON_EXPERT_LOSS)}
        path = folder / f"soak-{i}.toml"
        sizes = {"repeats": STEPS - 2, "experts": EXPERTS, "layers": LAYERS, "world": world}
        text = SCENARIO.format(**sizes, timeout=timeout, **fault, **extra)
        path.write_text(text)
        (spec,) = load(path).runs
        start = time.monotonic()
        run = runner.run_one(spec, None)
        took = time.monotonic() - start
        check = run["checks"][0] if run["checks"] else {"pass": False}
        detail = run["details"].get("fault", {})
        after = run["metrics"].get("detected_after_s", {}).get("median")
        counts["faults"] += 1
        counts["hangs"] += took > timeout + HANG_MARGIN_S
        counts["orphans"] += len(_rank_children())
        counts["undetected"] += not detail.get("detected", False)
        counts["misnamed"] += bool(detail.get("detected")) and not check["pass"]
        counts["late"] += after is not None and after > timeout + 5
        counts["inexact"] += any(c.get("name") == "failover_exact" and not c["pass"] for c in run["checks"])
        if not all(c["pass"] for c in run["checks"]) or run["status"] != "ok":
            what = "; ".join(c.get("detail", "") for c in run["checks"] if not c["pass"]) or run.get("error")
            problems.append(f"#{i} {fault['type']} on {world} ranks ({extra}): {run['status']}: {what}")
        rows.append([i, fault["type"], world, fault["rank"], fault["layer"], fault["at_step"], run["status"],
                     check["pass"], None if after is None else after * 1e3, took])  # fmt: skip
    return {"counts": counts, "rows": rows, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=2.0, help="the watchdog's detect_timeout_s")
    parser.add_argument("--rows", action="store_true", help="print one row per fault too")
    args = parser.parse_args(argv)
    if args.faults < 1 or args.timeout < 0.5:
        parser.error("--faults must be >= 1 and --timeout >= 0.5")
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.faults, args.seed, args.timeout, Path(tmp))
    if args.rows:
        headers = ["#", "type", "ranks", "rank", "layer", "step", "status", "named", "detected (ms)", "run (s)"]
        print(tabulate(result["rows"], headers=headers, floatfmt=".1f"))
    counts = result["counts"]
    print(tabulate([counts.values()], headers=list(counts)))
    for line in result["problems"]:  # what each fault that went wrong reported
        print(line)
    must = ("hangs", "orphans", "late", "undetected", "misnamed", "inexact")
    print(f"seed {args.seed}, watchdog {args.timeout:g} s; must be 0: {', '.join(must)}")
    bad = any(counts[k] for k in must)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
