"""Expert re-placement while running (``[eplb] interval`` > 0) in the timed kinds: the run's stream of
steps twice, in the same run, on the same inputs and the same drift — once under the static placement and
once re-placed from the measured load every ``interval`` steps — after the step's own timed window.

Per step, each pass records its step time (the slowest rank's, as every timed step) and its
``balancedness`` (vLLM's: Σ over layers of the mean copies a rank's experts receive / Σ over layers of the
max). The EPLB pass keeps the routed copies of the last ``window`` steps (``runtime.eplb.LoadWindow``); after
every ``interval``-th step every layer is re-placed (``runtime.eplb.rebalance`` on its window's loads, then
``MoELayer.set_placement``), timed with the group's barrier around it, its bytes counted. Just before and
just after each move, every layer's outputs on a probe of the step's tokens are computed with the
batch-invariant ``rowwise`` experts and compared bitwise (check ``rebalance_exact``).

Drift (``[workload] drift_every`` = n > 0): from step n on, every n steps each layer's experts swap
popularity: the router rows (gate and calibrated offset) are permuted by a seeded permutation per epoch
and layer, so expert π(e)'s old share goes to expert e. At layer 0 this is exactly the skew with another
expert order; deeper layers see a changed residual stream, so their shares move too but are not
recalibrated.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from moebench import metrics as M
from moebench.measure.common import build_stack, ratios, stream_routes
from moebench.workload.tokens import layer_weights
from runtime.eplb import LoadWindow, rebalance, static_placement
from runtime.weights import MoEWeights

if TYPE_CHECKING:
    from moebench.spec import RunSpec

PROBE_TOKENS = 16  # tokens per rank the exactness probe runs (rowwise experts: one GEMV pair per copy)
RECOVERED = 0.9  # balancedness a re-placed run counts as recovered at (issue target; docs/results.md)
EPLB_METRICS = ("balancedness", "balancedness_static", "rebalance_time_s", "rebalance_bytes", "eplb_speedup",
                "eplb_recovery_steps")  # fmt: skip
EPLB_COLUMNS = (
    ("balancedness", "balanced", 1, ".3f"),
    ("balancedness_static", "balanced static", 1, ".3f"),
    ("eplb_speedup", "eplb speedup", 1, ".2f"),
    ("rebalance_time_s", "rebalance (ms)", 1e3, ".2f"),
)


def check_eplb(spec: RunSpec) -> None:
    """The rules of ``[eplb]`` and ``[workload] drift_every`` (``ValueError``, one line)."""
    cfg, wl, par = spec.eplb, spec.workload, spec.parallel
    E, W, R = spec.model["num_experts"], spec.world_size, par["redundant_experts"]
    if wl["drift_every"] and wl["skew"] == "trace":
        raise ValueError(
            f'[workload] drift_every = {wl["drift_every"]} is invalid with skew = "trace": accepted 0, or a skew '
            "of routing (a trace replays its own experts)"
        )
    if wl["drift_every"] and spec.kind == "train":
        raise ValueError(
            f'[workload] drift_every = {wl["drift_every"]} is invalid for kind = "train": accepted in kinds '
            "throughput, latency and serve (a trained router learns its own popularity)"
        )
    if wl["drift_every"] and not cfg["interval"]:
        raise ValueError(
            f"[workload] drift_every = {wl['drift_every']} without [eplb] interval is refused: accepted with "
            "interval >= 1 (the drift is applied in the EPLB passes)"
        )
    if not cfg["interval"]:
        return
    if W < 2 or par.get("mode") == "dp":
        raise ValueError(
            f"[eplb] interval = {cfg['interval']} needs expert parallelism: accepted world_size >= 2 and mode ep"
        )
    if (E + R) % W:
        raise ValueError(
            f"[parallel] redundant_experts = {R} is invalid with num_experts = {E} and world_size = {W}: accepted "
            "num_experts + redundant_experts a multiple of world_size (every rank holds as many slots)"
        )
    if R > E * (W - 1):
        raise ValueError(f"[parallel] redundant_experts = {R} is invalid: accepted at most {E * (W - 1)}")
    steps = {"throughput": ("[workload] steps", wl["steps"]), "latency": ("[workload] steps", wl["steps"]),
             "train": ("[train] steps", spec.train.get("steps"))}.get(spec.kind)  # fmt: skip
    if steps is not None and steps[1] <= cfg["interval"]:
        raise ValueError(
            f"{steps[0]} = {steps[1]} is invalid with [eplb] interval = {cfg['interval']}: accepted more steps than "
            "the interval (else nothing is ever re-placed)"
        )
    if steps is not None and wl["drift_every"] >= steps[1]:
        raise ValueError(
            f"[workload] drift_every = {wl['drift_every']} is invalid with {steps[0]} = {steps[1]}: accepted fewer "
            "steps than the run's (else popularity never changes)"
        )
    if W % cfg["nodes"]:
        raise ValueError(f"[eplb] nodes = {cfg['nodes']} is invalid with world_size = {W}: accepted a divisor of it")
    if cfg["nodes"] > 1 and E % cfg["nodes"]:
        raise ValueError(f"[eplb] nodes = {cfg['nodes']} is invalid with num_experts = {E}: accepted a divisor of it")
    if wl["train"]:
        raise ValueError(
            f"[eplb] interval = {cfg['interval']} with [workload] train = true is refused: accepted with train = "
            'false (a forward stream; kind "train" re-places while training)'
        )


def drift_permutation(num_experts: int, seed: int, epoch: int, layer: int) -> torch.Tensor:
    """π of ``epoch`` at ``layer``: expert e takes the router row of expert π[e] (epoch 0: identity)."""
    if epoch == 0:
        return torch.arange(num_experts)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 20_000 + epoch * 4096 + layer)
    return torch.randperm(num_experts, generator=gen)


def drifted(weights: list[MoEWeights], seed: int, epoch: int) -> list[MoEWeights]:
    """The stack's weights with each layer's router rows permuted for ``epoch`` (module docstring): the gate
    rows, the calibrated offsets and the choice bias (``score_bias_E``) move together."""
    out = []
    for l, w in enumerate(weights):
        perm = drift_permutation(w.router_ED.shape[0], seed, epoch, l)
        out.append(dataclasses.replace(w, router_ED=w.router_ED[perm], router_bias_E=_permuted(w.router_bias_E, perm),
                                       score_bias_E=_permuted(w.score_bias_E, perm)))  # fmt: skip
    return out


def _permuted(bias_E: torch.Tensor | None, perm: torch.Tensor) -> torch.Tensor | None:
    return None if bias_E is None else bias_E[perm]


def balance(received_LW) -> float:
    """A step's balancedness over layers from each layer's copies received per rank."""
    return M.balancedness([list(r) for r in received_LW])


def _barrier(ctx, group) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize(ctx.device)  # sync: the step's (or the moves') work is done before the clock reads
    if group is not None:
        dist.barrier(group=group)


class Rebalancer:
    """The re-placement loop of one run, over its MoE layers (module docstring).

    ``reset`` puts every layer on the static placement (and, with ``weights``, the routers of drift epoch 0)
    and empties the window. ``after_step`` records a step's loads; every ``interval``-th step makes a move
    due, and every ``drift_every``-th step loads the next epoch's routers (``weights``: the layers' global
    weights; None: no drift). ``before_step`` makes a due move before the next step, so nothing moves after
    a run's last step: every layer is re-placed from the window (moving ``optimizer``'s state with the
    weights when training), with the exactness checks around it. ``eplb`` False: record and drift, never
    move (the static pass)."""

    def __init__(self, ctx, spec: RunSpec, layers, group, eplb: bool, weights: list[MoEWeights] | None = None):
        self.ctx, self.spec, self.layers, self.group, self.eplb = ctx, spec, list(layers), group, eplb
        self.weights = weights
        self.reset()

    def reset(self) -> None:
        E, W, R = self.spec.model["num_experts"], self.spec.world_size, self.spec.parallel["redundant_experts"]
        for layer in self.layers:
            layer.set_placement(static_placement(E, W, R))
        if self.weights is not None:
            for layer, w in zip(self.layers, self.weights, strict=True):
                layer.load_router_weights(w)
        self.window = LoadWindow(len(self.layers), E, self.spec.eplb["window"])
        self.steps, self.moves, self.balance, self.due = 0, [], [], False

    def rehearse(self, probe=None) -> None:
        """One untimed move from the window as it is, then ``reset``: the first timed move pays no one-time
        costs (allocations, the collective's first use)."""
        self._move(probe, None)
        self.reset()

    def before_step(self, probe=None, optimizer=None) -> None:
        """Make the move ``after_step`` made due, if any. ``probe``: the tokens [T, D] each layer's exactness
        probe runs (None: seeded ones)."""
        if self.due:
            self.moves.append(self._move(probe, optimizer) | {"after_step": self.steps - 1})
            self.due = False

    def after_step(self, loads_LE, received_LW) -> None:
        """One step's routed copies per expert and copies received per rank, per layer (host lists)."""
        self.steps += 1
        self.balance.append(balance(received_LW))
        self.window.record(loads_LE)
        self.due = self.eplb and self.steps % self.spec.eplb["interval"] == 0
        drift = self.spec.workload["drift_every"]
        if self.weights is not None and drift and self.steps % drift == 0:  # the next step's popularity
            epoch = self.steps // drift
            for layer, w in zip(self.layers, drifted(self.weights, self.spec.workload["seed"], epoch), strict=True):
                layer.load_router_weights(w)

    def hook(self, stats) -> None:
        """``after_step`` from a step record that carries ``loads_LE`` and ``received_LW`` (the engine's)."""
        self.after_step(stats.loads_LE, stats.received_LW)

    def _probe_tokens(self, probe) -> torch.Tensor:
        if probe is not None:
            return probe
        D, dtype = self.spec.model["hidden"], self.layers[0].moe.torch_dtype
        gen = torch.Generator().manual_seed(self.spec.workload["seed"] * 1_000_003 + 30_000 + self.ctx.rank)
        return torch.randn(probe_rows(self.spec, self.layers[0].moe.seq_len), D, generator=gen).to(
            self.ctx.device, dtype
        )

    def _outputs(self, x_TD: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's output on the same probe tokens, rowwise experts (batch-invariant)."""
        outs = []
        for layer in self.layers:
            layer.set_schedule(expert_backend="rowwise")
            with torch.no_grad():
                outs.append(layer(x_TD).out_TD)
            layer.set_schedule(expert_backend=layer.moe.expert_backend)
        return outs

    def _fingerprints(self) -> list[dict[int, tuple[float, ...]]]:
        """Per layer, each logical expert's weight fingerprint (fp64 sums and sums of squares of both
        matrices) over every rank's slots; None for an expert whose copies disagree."""
        local = self._local_prints()
        gathered = [None] * self.spec.world_size
        if self.group is not None:
            dist.all_gather_object(gathered, local, group=self.group)
        else:
            gathered = [local]
        out = []
        for l in range(len(self.layers)):
            prints: dict[int, tuple | None] = {}
            for rank in gathered:
                for e, fp in rank[l]:
                    prints[e] = fp if prints.get(e, fp) == fp else None
            out.append(prints)
        return out

    def _move(self, probe, optimizer) -> dict:
        spec, ctx, group = self.spec, self.ctx, self.group
        W, R, nodes = spec.world_size, spec.parallel["redundant_experts"], spec.eplb["nodes"]
        x_TD = self._probe_tokens(probe)
        before, prints = self._outputs(x_TD), self._fingerprints()
        _barrier(ctx, group)
        t0 = time.perf_counter()
        sent = 0
        for layer, loads in zip(self.layers, self.window.loads(), strict=True):
            placement = rebalance([float(v) for v in loads], W, R, nodes, groups=nodes if nodes > 1 else None)
            sent += layer.set_placement(placement, optimizer)
        _barrier(ctx, group)
        elapsed = time.perf_counter() - t0
        outputs = all(torch.equal(a, b) for a, b in zip(before, self._outputs(x_TD), strict=True))
        weights = all(
            layer_prints.get(e) is not None and layer_prints[e] == fp
            for layer_prints, now in zip(prints, self._local_prints(), strict=True)
            for e, fp in now
        )
        return {"time_s": elapsed, "bytes_sent": sent, "exact": outputs and weights, "outputs_equal": outputs,
                "weights_equal": weights}  # fmt: skip

    def _local_prints(self) -> list[list[tuple[int, tuple[float, ...]]]]:
        """This rank's slots' (logical expert, fingerprint) per layer, as ``_fingerprints`` takes them."""
        out = []
        for layer in self.layers:
            sums = [f(w.double()).flatten(1).sum(1) for w in (layer.experts.w_in_LDH, layer.experts.w_down_LFD)
                    for f in (lambda t: t, torch.square)]  # fmt: skip
            values = torch.stack(sums, dim=1).tolist()  # sync: the fingerprints to the host, once per move
            out.append(list(zip(layer.experts.experts_L, map(tuple, values), strict=True)))
        return out

    def record(self, times_s: list[float]) -> dict:
        """What the pass reports: its step times, balancedness per step and moves."""
        return {"step": list(times_s), "balancedness": list(self.balance), "moves": list(self.moves)}


def probe_rows(spec: RunSpec, seq_len: int | None) -> int:
    """Rows of the exactness probe: ``PROBE_TOKENS`` (at most the tokens per rank), rounded up to whole
    sequences of ``seq_len`` under sequence routing (``seq_len`` divides the tokens per rank)."""
    rows = min(PROBE_TOKENS, spec.workload["tokens_per_rank"] or PROBE_TOKENS)
    return rows if not seq_len else -(-rows // seq_len) * seq_len


def _run_pass(ctx, spec: RunSpec, stack, stream, routes, weights, group, eplb: bool, rehearse: bool = False) -> dict:
    """One pass over the stream (module docstring); the EPLB pass re-places, the static one never.
    ``rehearse``: one untimed move first (``Rebalancer.rehearse``)."""
    rebalancer = Rebalancer(ctx, spec, stack.layers, group, eplb, weights)  # static placement, drift epoch 0
    rows = probe_rows(spec, stack.layers[0].moe.seq_len)
    times = []
    for s in range(len(stream)):
        probe = stream[s] if routes is not None else stream[s][:rows]  # a replayed trace: every row
        if routes is not None:
            for layer, ids_TK in zip(stack.layers, routes[s], strict=True):
                layer.router.use(ids_TK)
        if rehearse and s == 0:
            rebalancer.rehearse(probe)
        rebalancer.before_step(probe)  # a due move, outside the step's time
        _barrier(ctx, group)
        t0 = time.perf_counter()
        with torch.no_grad():
            _, results = stack(stream[s])
        _barrier(ctx, group)  # sync (CUDA) and barrier: the step ends when the slowest rank is done
        times.append(time.perf_counter() - t0)
        loads, received = [r.counts_WE.sum(0).tolist() for r in results], [r.received_W.tolist() for r in results]
        rebalancer.after_step(loads, received)
    return rebalancer.record(times)


def eplb_placements(spec: RunSpec, layers: int) -> list | None:
    """The layers' starting placements when the run re-places (``[eplb] interval``): the static one; else None."""
    if not spec.eplb["interval"]:
        return None
    E, W, R = spec.model["num_experts"], spec.world_size, spec.parallel["redundant_experts"]
    return [static_placement(E, W, R)] * layers


def serve_rebalancer(ctx, spec: RunSpec, model, group, eplb: bool) -> Rebalancer:
    """A ``Rebalancer`` over a decoder's MoE layers, drifting their routers when ``[workload] drift_every``."""
    wl, layers = spec.workload, model.moe_layers
    weights = layer_weights(spec.moe_config(), len(layers), wl["seed"], wl["skew"], wl["skew_param"])
    return Rebalancer(ctx, spec, layers, group, eplb, weights if wl["drift_every"] else None)


def eplb_timings(ctx, spec: RunSpec, stream: list[torch.Tensor], group) -> dict:
    """The static pass and the EPLB pass over ``stream`` (one list of inputs per step)."""
    wl = spec.workload
    weights = layer_weights(spec.moe_config(), spec.model["layers"], wl["seed"], wl["skew"], wl["skew_param"])
    stack = build_stack(ctx, spec, placements=eplb_placements(spec, spec.model["layers"]))
    routes = stream_routes(ctx, spec)
    _run_pass(ctx, spec, stack, stream[:1], routes, weights, group, eplb=False, rehearse=True)  # warm-up, untimed
    static = _run_pass(ctx, spec, stack, stream, routes, weights, group, eplb=False)
    moving = _run_pass(ctx, spec, stack, stream, routes, weights, group, eplb=True)
    return {"eplb": {"static": static, "eplb": moving}}


# -------------------------------------------------------------------------------------------
# Parent side


def recovery_steps(balance: list[float], drift_every: int, horizon: int, threshold: float = RECOVERED) -> int | None:
    """The most steps any change of popularity (steps n, 2n, ... with n = ``drift_every``) took to bring
    ``balance`` back to ``threshold`` or above; 0 when it was there at the change step itself. A change is
    judged only when ``horizon`` (interval + window: the target) steps follow it in the run; one that did not
    recover before the next change or the end counts as the steps it had. None: no change was judged."""
    worst = None
    for change in range(drift_every, len(balance), drift_every) if drift_every else ():
        if change + horizon > len(balance):
            continue
        end = min(change + drift_every, len(balance))
        back = next((s for s in range(change, end) if balance[s] >= threshold), end)
        worst = max(worst or 0, back - change)
    return worst


def _speedups(static_s: list[float], eplb_s: list[float], same_steps: bool) -> list[float]:
    """Step by step when both passes ran the same steps (throughput, latency, train); else (serve, whose two
    windows schedule the same requests into steps of their own) one ratio of the total forward times."""
    if same_steps:
        return ratios(static_s, eplb_s)
    return [sum(static_s) / sum(eplb_s)]


def eplb_metrics(spec: RunSpec, per_rank: list[dict]) -> dict:
    """Metrics of the two passes (``EPLB_METRICS``; docs/results.md)."""
    if "eplb" not in per_rank[0]:
        return {}
    static, moving = per_rank[0]["eplb"]["static"], per_rank[0]["eplb"]["eplb"]
    moves = [r["eplb"]["eplb"]["moves"] for r in per_rank]
    out = {
        "balancedness": M.metric([float(np.median(moving["balancedness"]))], "ratio", "higher", exact=True),
        "balancedness_static": M.metric([float(np.median(static["balancedness"]))], "ratio", "higher", exact=True),
        "eplb_speedup": M.metric(_speedups(static["step"], moving["step"], spec.kind != "serve"), "ratio", "higher"),
    }
    if moves[0]:
        out["rebalance_time_s"] = M.metric([m["time_s"] for m in moves[0]], "s", "lower")
        sent = [sum(rank[i]["bytes_sent"] for rank in moves) for i in range(len(moves[0]))]
        out["rebalance_bytes"] = M.metric(sent, "B", "lower", exact=True)
    horizon = spec.eplb["interval"] + spec.eplb["window"]
    steps = recovery_steps(moving["balancedness"], spec.workload["drift_every"], horizon)
    if steps is not None:
        out["eplb_recovery_steps"] = M.metric([steps], "steps", "lower", exact=True)
    return out


def eplb_checks(per_rank: list[dict]) -> list[dict]:
    """``rebalance_exact``: every move left every layer's probe outputs bitwise equal, on every rank."""
    if "eplb" not in per_rank[0] or not per_rank[0]["eplb"]["eplb"]["moves"]:
        return []
    results = [m["exact"] for r in per_rank for m in r["eplb"]["eplb"]["moves"]]
    moves = len(per_rank[0]["eplb"]["eplb"]["moves"])
    return [
        {
            "name": "rebalance_exact",
            "pass": all(results),
            "detail": f"{sum(results)} of {len(results)} (move, rank) probes bitwise equal across {moves} moves",
        }
    ]


def eplb_details(spec: RunSpec, per_rank: list[dict]) -> dict:
    """The per-step series of both passes and the moves, for the report's plot."""
    if "eplb" not in per_rank[0]:
        return {}
    static, moving = per_rank[0]["eplb"]["static"], per_rank[0]["eplb"]["eplb"]
    return {
        "eplb": {
            "interval": spec.eplb["interval"],
            "window": spec.eplb["window"],
            "drift_every": spec.workload["drift_every"],
            "balancedness_static": static["balancedness"],
            "balancedness": moving["balancedness"],
            "step_time_static_s": static["step"],
            "step_time_s": moving["step"],
            "moves": [{"after_step": m["after_step"], "time_s": m["time_s"]} for m in moving["moves"]],
        }
    }
