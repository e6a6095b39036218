"""The fault kind: step a stack as the throughput kind does, inject a fault on schedule, and
record whether and how fast it was detected and named.

``[fault] type`` (a list sweeps it):

- ``crash``   the rank's process exits at (``at_step``, ``layer``);
- ``hang``    the rank stops itself (SIGSTOP) there, as a rank stuck inside or before a collective;
- ``nan``     local expert ``expert`` (a global id; its owner injects) returns NaN rows at
              ``at_step`` in ``layer``;
- ``straggler`` from ``at_step`` on, rank ``rank`` spins ``slowdown`` − 1 times its own compute
              after every layer: a device that many times slower;
- ``expert_loss`` the primary copy of expert ``expert`` in layer ``layer`` is lost at ``at_step``;
- ``rank_loss`` every expert copy of rank ``rank`` is lost at ``at_step`` and the rank is masked.
  These two run with ``[parallel] redundant_experts`` replicas and ``[fault] on_expert_loss``
  ("reroute" or "drop"): ``moebench/kinds/fault/loss.py``.

Detection. crash and hang: the launcher's watchdog (``launch(..., watchdog_s=detect_timeout_s)``,
``moebench/launch/watchdog.py``): every rank beats at every layer; the run ends with a
``RankFailure`` naming the rank and its last step and layer; ``detected_after_s`` is the time from
the last beat (the injection follows it at once) to the verdict. nan: a per-layer, per-expert
finite check (a forward hook on every layer's experts) names the rank, layer and expert, and the
ranks agree to stop after that step (one all-reduce of a flag per step); ``detected_after_s`` is
from the injection to the check. straggler: each rank's CPU time per step is all-gathered after the
step; its straggler score is min over ranks of t / t_rank (docs/results.md, "Straggler score"); the first step after the
injection at which the same rank has had the lowest score, below ``STRAGGLER_SCORE``, for
``STRAGGLER_STEPS`` steps in a row names it.

Recovery: a crash, hang or nan run is stopped (every rank ended); a straggler needs none; an
expert or rank loss fails over (``fault_loss``).
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from moebench import metrics as M
from moebench.kinds.fault import loss as fault_loss
from moebench.kinds.fault import resume as fault_resume
from moebench.measure.common import setup
from moebench.text import clip
from runtime.placement import place_experts

if TYPE_CHECKING:
    from moebench.spec import RunSpec

NAME = "fault"
ORDER = 7
FEATURES = frozenset({"fault", "redundancy"})  # [fault] and redundant experts belong to this kind
TYPES = ("crash", "hang", "nan", "straggler", *fault_loss.TYPES)
ON_EXPERT_LOSS = ("reroute", "drop")
STRAGGLER_SCORE = 0.8  # a rank this much slower than the fastest (t_min / t_rank below it) is named ...
# ... when it is so for this many steps in a row: one step of a busy host's noise named a wrong
# rank once in a unit-suite run on 4 ranks over 2 cores (rank 2 for the straggler rank 1)
STRAGGLER_STEPS = 2
MAX_SLOWDOWN = 100.0  # a straggler's largest slowdown: its watchdog allows slowdown x detect_timeout_s
COLUMNS = (("detected_after_s", "detected after (ms)", 1e3, ".1f"),)
METRICS = ("detected_after_s",)
DETAIL_KEYS = (
    "injected",
    "detected",
    "culprit_rank",
    "culprit_layer",
    "culprit_expert",
    "recovered",
    "steps_lost",
    "tokens_rerouted",
    "rel_error_vs_healthy",
)


def window_tokens(spec: RunSpec) -> int:
    return spec.workload["tokens_per_rank"] * spec.world_size * (spec.scenario["warmup"] + spec.scenario["repeats"])


def validate(spec: RunSpec) -> None:
    """What the scenario loader refuses of a fault run (the loader has already refused a [fault] or
    redundant experts for another kind): no type, a rank, layer, step or expert the run does not have."""
    f, redundant = spec.fault, spec.parallel.get("redundant_experts", 0)
    if f.get("type") is None:
        raise ValueError(f"[fault] type is missing: accepted one of {', '.join(TYPES)}")
    top = spec.model["num_experts"] * (spec.world_size - 1)
    if redundant > top:
        raise ValueError(
            f"[parallel] redundant_experts = {redundant} is invalid: accepted 0 to num_experts x (world_size - 1) "
            f"= {top} (a replica goes to a rank without a copy of its expert)"
        )
    if f["type"] in fault_loss.TYPES and spec.workload["skew"] == "trace":
        raise ValueError(
            f'[fault] type = "{f["type"]}" with [workload] skew = "trace" is invalid: accepted a generated skew '
            "(a replayed trace fixes every token's choice, and a masked rank has no rows to replay)"
        )
    if f["type"] in ("rank_loss", "straggler") and spec.world_size < 2:
        why = "no rank is left to serve" if f["type"] == "rank_loss" else "a lone rank is never slower than the fastest"
        raise ValueError(
            f'[fault] type = "{f["type"]}" with world_size = 1 is invalid: accepted world_size >= 2 ({why})'
        )
    if f["type"] == "straggler" and f["slowdown"] > MAX_SLOWDOWN:
        raise ValueError(
            f"[fault] slowdown = {clip(str(f['slowdown']))} is invalid: accepted 1 to {MAX_SLOWDOWN:g} (a rank slower "
            'than that is down, not straggling: type = "hang"; the watchdog allows a slowed layer slowdown x '
            "detect_timeout_s)"
        )
    steps = spec.scenario["warmup"] + spec.scenario["repeats"]
    if f["type"] == "straggler" and not 1 <= f["at_step"] <= steps - STRAGGLER_STEPS:
        top = steps - STRAGGLER_STEPS
        accepted = f"1 to warmup + repeats - {STRAGGLER_STEPS} = {top}" if top >= 1 else "none: warmup + repeats >= 3"
        raise ValueError(
            f'[fault] at_step = {f["at_step"]} is invalid for type = "straggler": accepted {accepted} (the steps '
            f"before are its healthy baseline, and it is named after {STRAGGLER_STEPS} slow steps)"
        )
    bounds = (
        ("rank", spec.world_size - 1, "world_size - 1"),
        ("layer", spec.model["layers"] - 1, "layers - 1"),
        ("expert", spec.model["num_experts"] - 1, "num_experts - 1"),
        ("at_step", steps - 1, "warmup + repeats - 1"),
    )
    for key, top, what in bounds:
        if not 0 <= f[key] <= top:
            raise ValueError(f"[fault] {key} = {f[key]} is invalid: accepted 0 to {what} = {top}")
    _check_reroute(spec)
    if spec.workload["train"] != (f["checkpoint_every"] is not None):
        raise ValueError(
            f"[fault] checkpoint_every = {f['checkpoint_every']} with [workload] train = "
            f"{str(spec.workload['train']).lower()} is invalid: accepted both set (a training run that checkpoints, "
            "crashed and resumed) or neither (forward steps)"
        )
    if spec.workload["train"] and (f["type"] != "crash" or redundant):
        raise ValueError(
            f'[fault] type = "{f["type"]}" with [workload] train = true is invalid: accepted type = "crash" '
            "and redundant_experts = 0 (training resumes from a checkpoint after a crash)"
        )
    if f["type"] in fault_loss.TYPES and f["at_step"] == 0:
        raise ValueError(
            f'[fault] at_step = 0 is invalid for type = "{f["type"]}": accepted 1 or more (the steps before are '
            "its healthy baseline)"
        )


def _check_reroute(spec: RunSpec) -> None:
    """Refuse a loss that, with no replica to cover it, leaves fewer experts than top_k to reroute each
    token to (the ranks would stop at the loss: ``runtime/redundancy.py``'s reroute needs top_k)."""
    f, experts, top_k = spec.fault, spec.model["num_experts"], spec.model["top_k"]
    if f["type"] not in fault_loss.TYPES or f["on_expert_loss"] != "reroute" or spec.parallel["redundant_experts"]:
        return
    if f["type"] == "expert_loss":
        left = experts - 1
    else:
        home = place_experts(spec.moe_config(), spec.parallel_config())
        left = experts - sum(1 for rank in home if rank == f["rank"])
    if left < top_k:
        raise ValueError(
            f'[fault] on_expert_loss = "reroute" with type = "{f["type"]}" is invalid here: the loss leaves {left} of '
            f"{experts} experts, fewer than top_k = {top_k} to reroute a token to: accepted on_expert_loss = "
            '"drop", redundant_experts that cover the loss, or more experts'
        )


def watchdog_s(spec: RunSpec) -> float:
    """The launcher's watchdog (and the ranks' collective timeout) for a fault run: ``detect_timeout_s``,
    times ``slowdown`` for a straggler. The straggler's peers wait in each layer's all-to-all, sending
    no heartbeat, while it spins through its slowed layer: slowdown times as long as a healthy one.
    With the plain timeout a slowed layer longer than it would read as a hang (or time out the peers'
    collective) and stop the run before the straggler could be named."""
    f = spec.fault
    return f["detect_timeout_s"] * (f["slowdown"] if f["type"] == "straggler" else 1.0)


# -------------------------------------------------------------------------------------------
# Rank side


def track_straggler(cpu_W: list[float], suspect: tuple | None) -> tuple | None:
    """One step's per-rank CPU times -> (rank, steps in a row, score) of the rank with the lowest
    straggler score (min over ranks of t / t_rank) while that score is below ``STRAGGLER_SCORE``;
    None on a step where no rank is that slow. ``suspect``: the previous step's answer."""
    scores = [min(cpu_W) / t for t in cpu_W]
    slow = min(range(len(scores)), key=scores.__getitem__)
    if scores[slow] >= STRAGGLER_SCORE:
        return None
    run = suspect[1] + 1 if suspect is not None and suspect[0] == slow else 1
    return slow, run, scores[slow]


def _spin(seconds: float) -> None:
    """Busy for ``seconds``: a slower device burns its time, it does not sleep."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


class _Experts:
    """Forward hooks on every layer's experts: the NaN injection and the per-expert finite check."""

    def __init__(self, stack):
        self.poison, self.found, self.found_at = None, None, None
        for l, layer in enumerate(stack.layers):
            layer.experts.register_forward_hook(self._hook(l, layer))

    def _hook(self, l: int, layer):
        def hook(module, args, out_RD):
            _, runs, run_experts = (*args, None)[:3]
            run_experts = run_experts if run_experts is not None else list(range(len(runs)))
            for rows, local in zip(torch.split(out_RD, runs), run_experts, strict=True):
                expert = layer.replicas.logical_of_P[layer.local_experts[local]]
                if self.poison == (l, expert) and rows.numel():
                    rows.fill_(float("nan"))  # the injected fault: this expert's rows this step
                if self.found is None and rows.numel() and not bool(torch.isfinite(rows).all()):  # sync: a host bool
                    self.found, self.found_at = (l, expert), time.monotonic()  # monotonic: one clock for all ranks
            return out_RD

        return hook


def measure(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Step the stack, beating at every layer, and inject the fault on schedule (module docstring)."""
    f = spec.fault
    if f["type"] in fault_loss.TYPES:
        return fault_loss.measure_loss(ctx, spec)
    if fault_resume.resumable(spec):
        return fault_resume.measure_train(ctx, spec)
    stack, group, x_TD = setup(ctx, spec)
    stack = fault_loss.with_replicas(ctx, spec, stack, x_TD)
    experts = _Experts(stack)
    owner = stack.layers[0].expert_to_rank[f["expert"]]
    steps = spec.scenario["warmup"] + spec.scenario["repeats"]
    injected_at, detected, cpu_WS, wall_S = None, None, [], []
    suspect = None  # track_straggler's
    with torch.no_grad():
        for step in range(steps):
            cpu0, wall0, h_TD = time.process_time(), time.perf_counter(), x_TD
            for l, layer in enumerate(stack.layers):
                ctx.beat(step, l)
                here = step == f["at_step"] and l == f["layer"]
                if here and f["type"] in ("crash", "hang") and ctx.rank == f["rank"]:
                    if f["type"] == "crash":
                        os._exit(17)
                    os.kill(os.getpid(), signal.SIGSTOP)  # stopped until the watchdog kills it
                if here and f["type"] == "nan" and ctx.rank == owner:
                    experts.poison, injected_at = (l, f["expert"]), time.monotonic()
                layer_cpu = time.process_time()
                h_TD = h_TD + layer(h_TD).out_TD
                straggling = f["type"] == "straggler" and ctx.rank == f["rank"] and step >= f["at_step"]
                if straggling:
                    if injected_at is None:
                        injected_at = time.monotonic()
                    _spin((f["slowdown"] - 1) * (time.process_time() - layer_cpu))
            experts.poison = None
            wall_S.append(time.perf_counter() - wall0)
            cpu = torch.tensor([time.process_time() - cpu0], dtype=torch.float64)
            flag = torch.tensor([1.0 if experts.found else 0.0])
            if group is not None:
                gathered = [torch.zeros_like(cpu) for _ in range(ctx.world_size)]
                dist.all_gather(gathered, cpu, group=group)
                cpu_WS.append([float(t) for t in gathered])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)  # every rank stops together
            else:
                cpu_WS.append([float(cpu)])
            if f["type"] == "straggler" and step >= f["at_step"] and detected is None:
                # every rank sees the same gathered times, so every rank names the same suspect
                suspect = track_straggler(cpu_WS[-1], suspect)
                if suspect is not None and suspect[1] >= STRAGGLER_STEPS:
                    detected = {"rank": suspect[0], "step": step, "at": time.monotonic(), "score": suspect[2]}
            if flag.item():
                break
    return {
        "nan": None
        if experts.found is None
        else {"rank": ctx.rank, "layer": experts.found[0], "expert": experts.found[1], "at": experts.found_at},
        "nan_after_s": None if experts.found is None or injected_at is None else experts.found_at - injected_at,
        "straggler": detected,
        "straggler_after_s": None if detected is None or injected_at is None else detected["at"] - injected_at,
        "cpu_WS": cpu_WS,
        "wall_S": wall_S,
        "steps_run": len(cpu_WS),
        "telemetry": {"available": False, "reason": "not sampled in fault runs"},
    }


# Per type, what naming the fault right means: the culprit keys that must match the injection.
# A nan is named by layer and expert (its rank is the expert's owner, found by placement).
NAMED_BY = {
    "crash": ("rank", "layer"),
    "hang": ("rank", "layer"),
    "nan": ("layer", "expert"),
    "straggler": ("rank",),
    "expert_loss": ("rank", "layer", "expert"),
    "rank_loss": ("rank",),
}


def _stopped(spec: RunSpec, per_rank: list[dict], fault: dict, steps: int) -> tuple:
    """crash, hang: the watchdog's verdict (``launch``), then the resume, if the run checkpoints."""
    failure = per_rank[0].get("failure")
    if failure is None:
        return None, fault, []
    expected_how = {"crash": "crashed", "hang": "hung"}[spec.fault["type"]]
    fault |= {"detected": failure["how"] == expected_how, "culprit_rank": failure["rank"]}
    fault |= {"culprit_layer": failure["layer"], "recovered": "no: stopped, every rank ended"}
    fault["steps_lost"] = steps - failure["step"]
    fault, extra = fault_resume.evaluate_resume(spec, per_rank, fault)
    return failure["after_s"], fault, extra


def _nan(spec: RunSpec, per_rank: list[dict], fault: dict, steps: int) -> tuple:
    """The first finite check that fired: NaN spreads to every later layer, and every rank reports its first."""
    found = min((r["nan"] for r in per_rank if r.get("nan")), key=lambda n: (n["layer"], n["at"]), default=None)
    if found is None:
        return None, fault, []
    fault |= {"detected": True, "culprit_rank": found["rank"], "culprit_layer": found["layer"]}
    fault |= {"culprit_expert": found["expert"], "recovered": "no: stopped after the step"}
    fault["steps_lost"] = steps - per_rank[0]["steps_run"]
    return next((r["nan_after_s"] for r in per_rank if r.get("nan_after_s") is not None), None), fault, []


def _straggler(spec: RunSpec, per_rank: list[dict], fault: dict, steps: int) -> tuple:
    """The straggler score per rank and the step's inflation, and the rank the detector named."""
    at = spec.fault["at_step"]
    cpu_WS, wall = np.array(per_rank[0]["cpu_WS"]), np.array(per_rank[0]["wall_S"])
    after_W = np.median(cpu_WS[at:], axis=0)
    fault["straggler_score_W"] = (after_W.min() / after_W).tolist()  # docs/results.md, "Straggler score"
    fault["step_inflation"] = float(np.median(wall[at:]) / np.median(wall[:at]))
    found = per_rank[0]["straggler"]
    if found is None:
        return None, fault, []
    fault |= {"detected": True, "culprit_rank": found["rank"], "steps_lost": 0, "recovered": "not needed"}
    fault["named_at_step"] = found["step"]
    return next((r["straggler_after_s"] for r in per_rank if r.get("straggler_after_s") is not None), None), fault, []


def _loss(spec: RunSpec, per_rank: list[dict], fault: dict, steps: int) -> tuple:
    """expert_loss, rank_loss: failover, reroute or drop (``fault_loss``)."""
    return fault_loss.evaluate_loss(spec, per_rank, fault)


# What each type's observer reads of the ranks' ``measure`` output: (rank 0's, every rank's).
_LOSS_ALL = ("detected_after_s", "masked", "diff_S", "norm_S", "lost_S")
NEEDS = {
    "nan": (("nan", "nan_after_s", "steps_run"), ()),
    "straggler": (("cpu_WS", "wall_S", "straggler", "straggler_after_s"), ()),
    **dict.fromkeys(fault_loss.TYPES, (("detected", "uncovered", "layers", "wall_S", *_LOSS_ALL), _LOSS_ALL)),
}


def _check_rank_data(spec: RunSpec, per_rank: list[dict]) -> None:
    """Refuse to judge a run whose ranks' data is missing, saying why: the run was stopped (a rank that
    raised, crashed or fell silent where no such fault was injected: the watchdog's verdict), or which
    rank sent which key not. crash and hang: a stopped run is their verdict (``_stopped``)."""
    kind = spec.fault["type"]
    if kind in ("crash", "hang"):
        return
    failure = per_rank[0].get("failure") if per_rank else None
    if failure is not None:
        raise RuntimeError(
            f"the {kind} run was stopped before it finished, so there is no per-step data to judge: "
            + (failure.get("message") or f"rank {failure.get('rank')} {failure.get('how')}")
        )
    first, every = NEEDS[kind]
    for rank, data in enumerate(per_rank):
        missing = [key for key in (first if rank == 0 else every) if key not in data]
        if missing:
            raise RuntimeError(f"the {kind} run's rank {rank} sent no {', '.join(missing)}: its data is incomplete")


# (spec, per_rank, fault, steps) -> (detected_after_s or None, fault details, extra checks)
OBSERVE = {"crash": _stopped, "hang": _stopped, "nan": _nan, "straggler": _straggler}
OBSERVE |= dict.fromkeys(fault_loss.TYPES, _loss)


def evaluate(spec: RunSpec, per_rank: list[dict]) -> tuple[dict, list[dict], dict]:
    f, steps = spec.fault, spec.scenario["warmup"] + spec.scenario["repeats"]
    injected = {k: f[k] for k in ("type", "rank", "layer", "expert", "at_step")}
    if f["type"] in ("nan", "expert_loss"):  # the expert's owner injects
        injected["rank"] = place_experts(spec.moe_config(), spec.parallel_config())[f["expert"]]
    if f["type"] in fault_loss.TYPES:
        injected["on_expert_loss"] = f["on_expert_loss"]
        injected["redundant_experts"] = spec.parallel["redundant_experts"]
    fault = dict.fromkeys(DETAIL_KEYS) | {"injected": injected, "detected": False}
    _check_rank_data(spec, per_rank)
    after, fault, extra = OBSERVE[f["type"]](spec, per_rank, fault, steps)
    want = {f"culprit_{key}": injected[key] for key in NAMED_BY[f["type"]]}
    named = fault["detected"] and all(fault[k] == v for k, v in want.items())
    check = {
        "name": "fault_detected",
        "pass": bool(named),
        "detail": f"{f['type']} injected at rank {f['rank']}, step {f['at_step']}, layer {f['layer']}"
        + (f", expert {f['expert']}" if f["type"] in ("nan", "expert_loss") else "")
        + (f"; detected, named rank {fault['culprit_rank']}" if fault["detected"] else "; not detected")
        + ("" if named or not fault["detected"] else f"; expected {want}"),
    }
    metrics = {} if after is None else {"detected_after_s": M.metric([after], "s", "lower", exact=True)}
    return metrics, [check, *extra], {"fault": fault}
