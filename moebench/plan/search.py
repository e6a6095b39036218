"""``moebench plan --search``: the fewest-GPU degrees (EP, TP, PP, DP) that meet every SLO.

Candidates: EP and PP divide experts and layers, TP divides heads, kv heads (or is divided by
them) and the FFN width and fits in a node, DP leaves every data rank at least one sequence.
A candidate is feasible when none of the findings that depend on the degrees is an error
(memory, SLOs, indivisible degrees, idle ranks, capacity). Each answer says what binds it: the
constraint closest to its limit, and what dominates that constraint's time.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from moebench.plan.findings import findings
from moebench.plan.model import Estimate, estimate
from moebench.plan.spec import Plan

# Findings that a choice of degrees can cause or cure; the rest describe the plan text.
DEGREE_CODES = ("memory.", "slo.", "degrees.", "capacity.drops")


def _divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending, in O(√n) (a plan may state up to 1e9 layers or experts)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def candidates(p: Plan, max_gpus: int) -> list[Plan]:
    m, node = p.model, p.hardware.gpus_per_node
    tps = [t for t in _divisors(m.heads) if t <= node and m.ffn_hidden % t == 0
           and (m.kv_heads % t == 0 or t % m.kv_heads == 0)]  # fmt: skip
    out, pps = [], _divisors(m.layers)
    for ep in _divisors(m.experts):
        for tp in tps:
            for pp in pps:
                if ep * tp * pp > max_gpus:
                    break
                for dp in range(1, p.workload.batch // ep + 1):
                    if ep * tp * pp * dp > max_gpus:
                        break
                    out.append(p.with_parallel(ep=ep, tp=tp, pp=pp, dp=dp))
    return out


@dataclass(frozen=True)
class Answer:
    estimate: Estimate
    blocking: tuple[str, ...]  # codes of the degree-dependent errors ("" when feasible)
    margins: dict[str, float]  # constraint -> used / allowed (<= 1 is within)

    @property
    def feasible(self) -> bool:
        return not self.blocking

    @property
    def gpus(self) -> int:
        return self.estimate.plan.parallel.gpus

    def binds(self) -> str:
        """The tightest constraint, and what its time is made of."""
        name = max(self.margins, key=self.margins.get)
        e = self.estimate
        if name == "memory":
            mem = e.memory
            parts = {"weights": mem.weights, "KV cache": mem.kv_cache, "activations": mem.activations}
            return f"memory ({self.margins[name]:.0%} of the GPU, mostly {max(parts, key=parts.get)})"
        phase = e.decode if name == "tpot" else e.prefill
        if name == "throughput_per_gpu":
            phase = e.decode if e.plan.workload.output_tokens * e["tpot"] > e["ttft"] else e.prefill
        parts = phase.layer.parts()
        return f"{name} ({self.margins[name]:.0%} of its limit; its layers are {max(parts, key=parts.get)}-bound)"


def judge(p: Plan) -> Answer:
    e = estimate(p)
    blocking = tuple(sorted({f.code for f in findings(e) if f.severity == "error" and f.code.startswith(DEGREE_CODES)}))
    margins = {"memory": e.memory.total / p.hardware.memory}
    for key in ("ttft", "tpot"):
        if (limit := getattr(p.slo, key)) is not None:
            margins[key] = e[key] / limit
    if (limit := p.slo.throughput_per_gpu) is not None:
        margins["throughput_per_gpu"] = limit / e["throughput_per_gpu"]
    return Answer(e, blocking, margins)


@dataclass(frozen=True)
class SearchResult:
    best: list[Answer]  # feasible, fewest GPUs first, then lowest TTFT
    tried: int
    smaller_failures: Counter  # blocking code -> candidates with fewer GPUs than the best that it blocks


def search(p: Plan, top: int = 5, max_gpus: int = 4096) -> SearchResult:
    answers = [judge(c) for c in candidates(p, max_gpus)]
    feasible = sorted((a for a in answers if a.feasible), key=lambda a: (a.gpus, a.estimate["ttft"]))
    fewest = feasible[0].gpus if feasible else max_gpus + 1
    failures = Counter(code for a in answers if a.gpus < fewest for code in a.blocking)
    return SearchResult(feasible[:top], len(answers), failures)


def to_json(result: SearchResult) -> dict:
    return {
        "tried": result.tried,
        "answers": [
            {
                "gpus": a.gpus,
                "degrees": {k: getattr(a.estimate.plan.parallel, k) for k in ("ep", "tp", "pp", "dp")},
                "ttft": a.estimate["ttft"],
                "tpot": a.estimate["tpot"],
                "throughput_per_gpu": a.estimate["throughput_per_gpu"],
                "memory_per_gpu": a.estimate["memory_per_gpu"],
                "margins": a.margins,
                "binds": a.binds(),
            }
            for a in result.best
        ],
        "fewer_gpus_fail_on": dict(result.smaller_failures.most_common()),
    }


def render(doc: dict, fmt: str = "simple") -> str:
    from tabulate import tabulate

    from moebench.plan.spec import human

    if not doc["answers"]:
        reasons = ", ".join(f"{code} ({n})" for code, n in doc["fewer_gpus_fail_on"].items())
        return f"search: none of {doc['tried']} assignments meets every SLO; they fail on {reasons}"
    rows = [
        [a["gpus"], "·".join(str(a["degrees"][k]) for k in ("ep", "tp", "pp", "dp")), human(a["ttft"], "s"),
         human(a["tpot"], "s"), human(a["throughput_per_gpu"], "tokens/s"), human(a["memory_per_gpu"], "B"), a["binds"]]
        for a in doc["answers"]
    ]  # fmt: skip
    headers = ["GPUs", "EP·TP·PP·DP", "TTFT", "TPOT", "tput/GPU", "mem/GPU", "binds"]
    lines = [f"search: {doc['tried']} assignments tried; the fewest-GPU ones meeting every SLO:", ""]
    lines.append(tabulate(rows, headers=headers, tablefmt=fmt))
    if doc["fewer_gpus_fail_on"]:
        reasons = ", ".join(f"{code} ({n})" for code, n in doc["fewer_gpus_fail_on"].items())
        lines += ["", f"assignments with fewer GPUs fail on: {reasons}"]
    else:
        lines += ["", "no assignment with fewer GPUs exists"]
    return "\n".join(lines)
