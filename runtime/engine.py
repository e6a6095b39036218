"""A serving engine over one rank's ``MoEDecoder``: requests in, tokens out, one forward per step.

Each ``step()``:
  1. schedules, under ``max_batch_tokens`` tokens, first one decode token for every running request
     past its prompt, then the next chunk of every running request still in its prompt (chunked
     prefill: a prompt longer than what is left of the budget is computed over several steps), then
     (``batching = "continuous"``) admits waiting requests, oldest first, while fewer than
     ``max_running`` run and budget is left, each with its first chunk;
  2. runs the batch's prefill chunks and decode tokens together in one forward, with the KV cache;
  3. gives each request whose prompt is complete, or that decoded, its next output token (the output
     hidden state, or with a vocabulary the greedy token), stamped with the clock after the step,
     and retires the requests that have all their tokens (their cache slot is free for the next).
With sequence routing (``MoEConfig.granularity = "sequence"``) a prompt is never chunked: it is
scheduled whole when the budget left holds it (else it waits), since the router's choice for the request,
kept while it decodes, is made on the whole prompt's mean (runtime/model.py).
``batching = "static"``: the baseline users know: when nothing runs, up to ``max_running`` waiting
requests form a batch, which runs until every one of them has finished; only then is the next formed.

A request's output token g ≥ 1 is computed from output g − 1 fed back (with ``vocab`` = 0, the
output hidden state itself; else its token's embedding). The engine never reads the wall clock but
through ``clock`` (default ``time.perf_counter``); on a CUDA device each step ends with a
synchronize, so that a token's time is when it exists.

Under expert parallelism every rank of the EP group must call ``step`` the same number of times: a
rank with nothing to compute still joins every MoE block's all-to-all with zero rows. Deciding when
to step (and when every rank is done) is the caller's: it needs the group's agreement.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from runtime.model import Batch, DecoderConfig, KVCache, MoEDecoder, Segment, max_context

BATCHING = ("continuous", "static")


@dataclass
class Request:
    """One request. ``prompt``: hidden states [N, D] (vocab 0) or token ids [N]; ``arrival_s`` on the
    engine's clock. The engine fills the rest."""

    id: int
    prompt: torch.Tensor
    output_len: int
    arrival_s: float = 0.0
    slot: int | None = None  # its KV-cache slot while it runs
    computed: int = 0  # prompt tokens in the cache
    scheduled_s: float | None = None  # start of the step that first computed it (queueing ends)
    token_times_s: list[float] = field(default_factory=list)  # when each output token existed
    outputs: list = field(default_factory=list)  # every output (with ``keep_outputs``): [D] tensors or token ids
    last: object = None  # the latest output: the next decode step's input

    @property
    def input_len(self) -> int:
        return int(self.prompt.shape[0])

    @property
    def generated(self) -> int:
        return len(self.token_times_s)

    @property
    def prefilled(self) -> bool:
        return self.computed == self.input_len

    @property
    def done(self) -> bool:
        return self.generated == self.output_len

    @property
    def first_token_s(self) -> float | None:
        return self.token_times_s[0] if self.token_times_s else None

    @property
    def finish_s(self) -> float | None:
        return self.token_times_s[-1] if self.done else None


@dataclass(frozen=True)
class StepStats:
    """One step: its clock times, the forward's share, and what it computed."""

    start_s: float
    end_s: float
    forward_s: float  # the model's forward of the batch: its positions, RoPE tables and masks, the blocks, the LM head
    prefill_tokens: int
    decode_tokens: int
    running: int  # requests in this step's batch
    loads_LE: tuple = ()  # per MoE block, copies routed to each expert over the EP group (host)
    received_LW: tuple = ()  # per MoE block, copies each rank's experts received (host)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


def _check_prompt(request: Request, cfg: DecoderConfig) -> None:
    """Without a vocabulary a prompt is hidden states [N, D] of a floating dtype; with one, token ids
    [N] of an integer dtype in [0, vocab)."""
    p = request.prompt
    if cfg.vocab == 0:
        accepted = f"hidden states [N, {cfg.hidden}] of a floating dtype (the decoder has no vocabulary)"
        ok = p.dim() == 2 and p.shape[1] == cfg.hidden and p.is_floating_point()
    else:
        accepted = f"token ids [N] of an integer dtype in [0, {cfg.vocab})"
        ok = p.dim() == 1 and not (p.is_floating_point() or p.is_complex() or p.dtype == torch.bool)
        ok = ok and (p.numel() == 0 or (int(p.min()) >= 0 and int(p.max()) < cfg.vocab))  # sync: once, at add
    if not ok:
        raise ValueError(
            f"Request {request.id}: prompt of shape {list(p.shape)}, dtype {p.dtype} is invalid: accepted {accepted}"
        )


class Engine:
    """Continuous (or static) batching over one rank's decoder; see the module docstring."""

    def __init__(
        self,
        model: MoEDecoder,
        max_running: int,
        max_batch_tokens: int,
        max_len: int,
        batching: str = "continuous",
        *,
        clock: Callable[[], float] = time.perf_counter,
        keep_outputs: bool = False,
    ):
        """``max_len``: cache positions per slot (the longest ``max_context`` the engine will serve).
        ``keep_outputs``: keep every output in ``Request.outputs`` (tests, equivalence), not only the last."""
        if batching not in BATCHING:
            raise ValueError(f"Engine batching = {batching!r} is invalid: accepted one of {', '.join(BATCHING)}")
        for name, value in (("max_running", max_running), ("max_batch_tokens", max_batch_tokens), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Engine {name} = {value!r} is invalid: accepted an integer >= 1")
        if max_batch_tokens < max_running:  # every running request must get its decode token each step
            raise ValueError(
                f"Engine max_batch_tokens = {max_batch_tokens} is invalid with max_running = {max_running}: "
                "accepted max_batch_tokens >= max_running (each running request decodes one token per step)"
            )
        self.model, self.batching, self.clock, self.keep_outputs = model, batching, clock, keep_outputs
        self.whole_prompts = model.cfg.moe.granularity == "sequence"  # never chunk a prompt (module docstring)
        self.max_running, self.max_batch_tokens = max_running, max_batch_tokens
        self.cache = KVCache(model.cfg, max_running, max_len, model.device)  # allocated once
        self._free = list(range(max_running - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []

    def add(self, request: Request) -> None:
        """Queue a request (it has arrived). A prompt or length the forward could not take is refused
        here, not in a later step, where it would fail the whole batch's forward."""
        _check_prompt(request, self.model.cfg)
        need = max_context(request.input_len, request.output_len)
        if self.whole_prompts and request.input_len > self.max_batch_tokens:
            raise ValueError(
                f"Request {request.id}: input_len {request.input_len} is refused with sequence routing: accepted "
                f"at most max_batch_tokens ({self.max_batch_tokens}), the prompt being computed whole"
            )
        if request.input_len < 1 or request.output_len < 1 or need > self.cache.max_len:
            raise ValueError(
                f"Request {request.id}: input_len {request.input_len}, output_len {request.output_len}: accepted "
                f"at least 1 each, and input_len + output_len − 1 ≤ the engine's max_len ({self.cache.max_len})"
            )
        request.prompt = request.prompt.to(self.model.device)
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _schedule(self, now: float) -> list[tuple[Request, int]]:
        """(request, tokens) of this step's batch, in row order (see the module docstring)."""
        budget, plan = self.max_batch_tokens, []
        for r in self.running:  # decode tokens first: max_batch_tokens >= max_running fits them all
            if r.prefilled:
                plan.append((r, 1))
                budget -= 1
        for r in self.running:  # then the prompts in progress, oldest first
            if not r.prefilled and budget > 0 and not (self.whole_prompts and r.input_len > budget):
                n = min(r.input_len - r.computed, budget)
                plan.append((r, n))
                budget -= n
        form = self.batching == "continuous" or not self.running  # static: only an empty engine forms a batch
        while form and self.waiting and self._free and (budget > 0 or self.batching == "static"):
            if self.whole_prompts and self.batching == "continuous" and self.waiting[0].input_len > budget:
                break  # oldest first: it waits for a step whose budget holds its whole prompt
            r = self.waiting.popleft()
            r.slot = self._free.pop()
            self.running.append(r)
            if budget > 0 and not (self.whole_prompts and r.input_len > budget):
                n = min(r.input_len, budget)
                plan.append((r, n))
                budget -= n
        for r, _ in plan:
            if r.scheduled_s is None:
                r.scheduled_s = now
        return plan

    def _inputs(self, plan: list[tuple[Request, int]]) -> torch.Tensor:
        """The step's packed inputs: prompt chunks, and each decoding request's previous output fed back
        (hidden states; or token ids, gathered into one host-to-device copy)."""
        vocab, device = self.model.cfg.vocab, self.model.device
        if vocab:
            fed = [r.last for r, _ in plan if r.prefilled]
            ids = iter(torch.tensor(fed, dtype=torch.long).to(device).split(1)) if fed else iter(())
        parts = []
        for r, n in plan:
            if not r.prefilled:
                parts.append(r.prompt[r.computed : r.computed + n])
            else:
                parts.append(next(ids) if vocab else r.last.reshape(1, -1))
        if parts:
            return torch.cat(parts)
        if vocab:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.zeros(0, self.model.cfg.hidden, device=device)

    @torch.no_grad()
    def step(self) -> StepStats:
        """Schedule, run one forward, hand out tokens and retire finished requests (module docstring).
        With nothing to compute it still runs the (empty) forward: an EP rank's share of the exchanges."""
        start = self.clock()
        plan = self._schedule(start)
        segments = [
            Segment(r.input_len + r.generated - 1, 1, r.slot) if r.prefilled else Segment(r.computed, n, r.slot)
            for r, n in plan
        ]
        inputs = self._inputs(plan)
        forward_start = self.clock()  # the forward's own preparation (positions, RoPE, masks) is the model's
        batch = Batch(segments, self.model.device, self.model.cfg)
        h_TD, routed = self.model(inputs, batch, self.cache)
        decoding = [r.prefilled for r, _ in plan]  # before this step's prompt tokens count
        emits = [i for i, (r, n) in enumerate(plan) if decoding[i] or r.computed + n == r.input_len]
        rows = [batch.rows[i] + plan[i][1] - 1 for i in emits]  # each emitting segment's last row
        if self.model.cfg.vocab:
            outputs = self.model.logits(h_TD[rows]).argmax(-1).tolist()  # sync: the greedy tokens to the host
        else:
            outputs = list(h_TD[rows].unbind(0))
            if h_TD.device.type == "cuda":
                torch.cuda.synchronize(h_TD.device)  # sync: a token's time is when it exists
        end = self.clock()
        for (r, n), decode in zip(plan, decoding, strict=True):
            if not decode:
                r.computed += n
        for i, out in zip(emits, outputs, strict=True):
            r = plan[i][0]
            r.token_times_s.append(end)
            r.last = out
            if self.keep_outputs:
                r.outputs.append(out)
        for r in [r for r in self.running if r.done]:
            self.running.remove(r)
            self._free.append(r.slot)
            r.slot = None
            self.finished.append(r)
        decode_tokens = sum(decoding)
        prefill_tokens = sum(n for (_, n), decode in zip(plan, decoding, strict=True) if not decode)
        loads = tuple(tuple(r.counts_WE.sum(0).tolist()) for r in routed)  # host counts: no sync
        received = tuple(tuple(r.received_W.tolist()) for r in routed)
        return StepStats(start, end, end - forward_start, prefill_tokens, decode_tokens, len(plan), loads, received)
