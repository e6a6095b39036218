"""The serve kind's rank side: the decoder and its engine, requests released on the wall clock, and
an idle engine's TTFT against a bare forward of the same prompt.

Every rank serves its own requests (``workload/requests.py``: request i on rank i mod W) through its
own ``Engine``. Under expert parallelism every rank must step together, so before each step the
ranks agree, with one all-reduce of two flags, whether anyone has work now and whether anyone has
work left; a rank with nothing to compute runs an empty step (its share of each all-to-all). When
no rank has work, every rank sleeps until the next arrival of any rank's request (all ranks know
the whole schedule). Under ``mode = "dp"`` nothing is exchanged in the forward, so each rank serves
on its own, without the agreement: a data-parallel replica does not wait for its peers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moebench.measure.common import progress, sampler
from moebench.measure.eplb import eplb_placements, serve_rebalancer
from moebench.measure.timing import time_interleaved
from moebench.workload.requests import Draw, draw_requests, prompt
from moebench.workload.tokens import layer_weights
from runtime.engine import Engine, Request
from runtime.model import MoEDecoder, decoder_weights, max_context

if TYPE_CHECKING:
    from moebench.spec import RunSpec


def build_decoder(ctx, spec: RunSpec) -> MoEDecoder:
    """This rank's part of the scenario's decoder: seeded weights, the MoE blocks' routing skew as
    the stack kinds calibrate it (``layer_weights``), EP over the world or (mode dp) every expert."""
    cfg, wl = spec.decoder_config(), spec.workload
    moe_blocks = cfg.layers - cfg.dense_layers
    routed = layer_weights(cfg.moe, moe_blocks, wl["seed"], wl["skew"], wl["skew_param"]) if moe_blocks else []
    par = spec.parallel_config()
    group = ctx.group if par.ep_size > 1 else None
    placements = eplb_placements(spec, moe_blocks)
    return MoEDecoder(cfg, decoder_weights(cfg, wl["seed"], routed), par, group, ctx.device, placements=placements)


def _engine(model: MoEDecoder, spec: RunSpec, draws: list[Draw], clock, batching: str | None = None,
            slots: int | None = None) -> Engine:  # fmt: skip
    """An engine for the run's requests (cache slots as long as the longest); ``batching`` None: the run's;
    ``slots`` None: ``max_running``."""
    serve = spec.serve
    max_len = max(max_context(d.input_len, d.output_len) for d in draws)
    batching = batching or serve["batching"]
    return Engine(model, slots or serve["max_running"], serve["max_batch_tokens"], max_len, batching, clock=clock)


def _agree(busy: bool, left: bool, group, device) -> tuple[bool, bool]:
    """(anyone busy now, anyone with work left) over the group (the flags on ``device``: NCCL needs them there)."""
    if group is None:
        return busy, left
    flags = torch.tensor([int(busy), int(left)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    busy_any, left_any = flags.tolist()  # sync: the group decides together, on the host, whether to step
    return bool(busy_any), bool(left_any)


def drive(engine: Engine, pending: list[Request], arrivals: list[float], group, clock, sleep=time.sleep,
          rebalancer=None) -> list[dict]:  # fmt: skip
    """Serve ``pending`` (this rank's requests, in arrival order; ``arrival_s`` on ``clock``) until
    every rank of ``group`` is done; ``arrivals``: every rank's arrival times. Returns one record per
    step this rank ran: its loop iteration's time (releasing arrivals, the group's agreement and the
    step), the step's (scheduling, inputs, forward, bookkeeping), the forward's, and the tokens.
    ``clock`` and ``sleep`` are the wall clock's (tests drive a fake one). ``rebalancer``: EPLB's
    (``moebench.measure.eplb.Rebalancer``): a due move before each step, the step's loads recorded after it;
    inside the window (a deployment pays for its moves). Every rank of the group steps together, so every
    rank makes the same moves."""
    pending, upcoming, steps = list(pending), sorted(arrivals), []
    while True:
        start = clock()
        while pending and pending[0].arrival_s <= start:
            engine.add(pending.pop(0))
        busy, left = _agree(engine.has_work(), engine.has_work() or bool(pending), group, engine.model.device)
        if not left:
            return steps
        if not busy:  # nobody has work: wait for the next request to arrive, on any rank
            upcoming = [a for a in upcoming if a > start]
            if upcoming:
                sleep(max(upcoming[0] - clock(), 0.0))
            continue
        if rebalancer is not None:
            rebalancer.before_step()
        s = engine.step()
        if rebalancer is not None:
            rebalancer.hook(s)
        steps.append({"iteration_s": s.end_s - start, "step_s": s.end_s - s.start_s, "forward_s": s.forward_s,
                      "tokens": s.tokens, "decode_tokens": s.decode_tokens})  # fmt: skip


def _requests(draws: list[Draw], spec: RunSpec, rank: int, device) -> list[Request]:
    cfg, seed = spec.decoder_config(), spec.workload["seed"]
    return [
        Request(d.id, prompt(d, cfg.hidden, cfg.vocab, seed).to(device), d.output_len, d.arrival_s)
        for d in draws
        if d.rank == rank
    ]


def _record(r: Request, rank: int) -> dict:
    return {
        "id": r.id,
        "rank": rank,
        "input_len": r.input_len,
        "output_len": r.output_len,
        "arrival_s": r.arrival_s,
        "scheduled_s": r.scheduled_s,
        "first_token_s": r.first_token_s,
        "finish_s": r.finish_s,
        "token_times_s": list(r.token_times_s),
    }


def _warm_up(ctx, spec: RunSpec, model: MoEDecoder, draws: list[Draw], ep) -> None:
    """``warmup`` rounds of each rank's first ``max_running`` requests, all at once and cut to two output
    tokens, untimed (lazy initialisation, the allocator, the first collectives)."""
    for _ in range(spec.scenario["warmup"]):
        engine = _engine(model, spec, draws, time.perf_counter)
        first = _requests(draws, spec, ctx.rank, ctx.device)[: spec.serve["max_running"]]
        for r in first:  # a prefill and a decode step each: what the window runs, without its length
            r.arrival_s, r.output_len = 0.0, min(r.output_len, 2)
        drive(engine, first, [0.0], ep, time.perf_counter)
        del engine  # its KV cache, before the next round's


def _idle_ttft(ctx, spec: RunSpec, model: MoEDecoder, draws: list[Draw], world, ep) -> dict:
    """``repeats`` alternating rounds of (one request to an idle engine, until its first token) and
    (a bare causal forward of the same prompt, no cache, no engine): every rank with a prompt of its
    own (request rank mod the count's). An untimed barrier precedes each: without it, a data-parallel
    rank done early would start its clock while another still works on the round before."""
    cfg, seed = spec.decoder_config(), spec.workload["seed"]
    draw = draws[ctx.rank % len(draws)]
    x = prompt(draw, cfg.hidden, cfg.vocab, seed).to(ctx.device)
    engine = _engine(model, spec, draws, time.perf_counter, slots=1)  # one request: one slot of KV cache

    def together():
        if world is not None:
            dist.barrier(world)  # sync: the next timed call starts on every rank at once (timed apart, dropped)

    def first_token():
        drive(engine, [Request(-1, x, 1)], [0.0], ep, time.perf_counter)

    def bare():
        with torch.no_grad():
            model.full(x)

    fns = {"sync1": together, "engine": first_token, "sync2": together, "bare": bare}
    timed = time_interleaved(fns, warmup=1, repeats=spec.scenario["repeats"], device=ctx.device, group=world)
    return {"idle_ttft": list(timed["engine"].samples_s), "bare_prefill": list(timed["bare"].samples_s),
            "idle_prompt_len": draw.input_len}  # fmt: skip


def _window(ctx, spec: RunSpec, model: MoEDecoder, draws: list[Draw], world, ep, batching: str, rebalancer=None):
    """Serve this rank's requests on the wall clock from a common start; (engine, steps, seconds). The
    engine (its KV cache) and the prompts are made before the window starts. ``rebalancer``: ``drive``'s."""
    mine = _requests(draws, spec, ctx.rank, ctx.device)
    t0 = [0.0]

    def clock() -> float:
        return time.perf_counter() - t0[0]

    engine = _engine(model, spec, draws, clock, batching)
    arrivals = [d.arrival_s for d in draws if ep is not None or d.rank == ctx.rank]  # ep None: on its own
    if world is not None:
        dist.barrier(world)  # sync: every rank's window starts together
    t0[0] = time.perf_counter()
    steps = drive(engine, mine, arrivals, ep, clock, rebalancer=rebalancer)
    return engine, steps, clock()


def _batching_rounds(ctx, spec: RunSpec, model: MoEDecoder, draws: list[Draw], world, ep) -> dict:
    """``[serve] baseline_rounds`` rounds of the same requests and arrivals served with continuous, then
    static batching: each round's window length under each (the same output tokens, so the ratio of
    the lengths is that of the throughputs)."""
    rounds = {"continuous": [], "static": []}
    for _ in range(spec.serve["baseline_rounds"]):
        for batching, lengths in rounds.items():
            lengths.append(_window(ctx, spec, model, draws, world, ep, batching)[2])  # its engine freed here
    return rounds


def measure_serve(ctx, spec: RunSpec, interval: float | None) -> dict:
    """Warm up, serve the run's requests on the wall clock, then time the idle TTFT, then (with
    ``baseline_rounds``) continuous against static batching."""
    world = ctx.group if ctx.world_size > 1 else None  # the window's common start, the rounds' max over ranks
    ep = ctx.group if spec.parallel_config().ep_size > 1 else None  # the ranks that must step together
    draws = draw_requests(spec.serve, ctx.world_size, spec.workload["seed"])
    model = build_decoder(ctx, spec)
    _warm_up(ctx, spec, model, draws, ep)
    progress(ctx, f"serving {len(draws)} requests", draws[-1].arrival_s)
    static = eplb = moving = None
    if spec.eplb["interval"]:  # the same requests under the static placement first, for eplb_speedup
        static = serve_rebalancer(ctx, spec, model, ep, eplb=False)
        _, static_steps, _ = _window(ctx, spec, model, draws, world, ep, spec.serve["batching"], static)
        static = static.record([s["forward_s"] for s in static_steps])
        eplb = serve_rebalancer(ctx, spec, model, ep, eplb=True)
        eplb.rehearse()  # the first timed move pays no one-time costs
    with sampler(ctx, interval) as s:
        engine, steps, window_s = _window(ctx, spec, model, draws, world, ep, spec.serve["batching"], eplb)
    if eplb is not None:
        moving = eplb.record([s["forward_s"] for s in steps])
        eplb.reset()  # the idle and batching rounds below run on the static placement and epoch 0's routers
    finite = all(bool(torch.isfinite(torch.as_tensor(r.last, dtype=torch.float32)).all()) for r in engine.finished)
    records, cache_bytes = [_record(r, ctx.rank) for r in engine.finished], engine.cache.nbytes
    del engine  # its KV cache, before the next engine's
    return {
        "requests": records,
        "steps": steps,
        "window_s": window_s,
        "finite": finite,
        "kv_cache_bytes_per_token": spec.decoder_config().kv_cache_bytes_per_token(),
        "kv_cache_bytes": cache_bytes,
        "telemetry": s.summary(),
        **_idle_ttft(ctx, spec, model, draws, world, ep),
        "batching_rounds": _batching_rounds(ctx, spec, model, draws, world, ep),
        **({"eplb": {"static": static, "eplb": moving}} if eplb else {}),
    }
