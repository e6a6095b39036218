"""The serving engine (runtime/engine.py) on one rank, on a fake clock: which requests each step of
continuous and static batching computes (hand-worked StepStats), chunked prefill, token times and
``scheduled_s``, slot reuse, a request's outputs independent of what it was batched with (within
``SERVE_TOLERANCE``), and the engine's refusals."""

from __future__ import annotations

import pytest
import torch

from runtime.engine import Engine, Request, StepStats
from tests.serve_cases import (
    SERVE_TOLERANCE,
    decoder,
    decoder_config,
    engine,
    outputs,
    rel_error,
    requests,
    run,
)

CFG = decoder_config()
MODEL = decoder(CFG)
VOCAB_CFG = decoder_config(vocab=29)
VOCAB_MODEL = decoder(VOCAB_CFG)


def _counts(stats: list[StepStats]) -> list[tuple[int, int, int]]:
    return [(s.prefill_tokens, s.decode_tokens, s.running) for s in stats]


def _progress(eng: Engine, reqs: list[Request]) -> list[list[int]]:
    """Step until done; per step, the ids of the requests it computed (a prompt chunk or a token)."""
    for r in reqs:
        eng.add(r)
    steps = []
    while eng.has_work():
        before = [(r.computed, r.generated) for r in reqs]
        eng.step()
        steps.append([r.id for r, b in zip(reqs, before, strict=True) if (r.computed, r.generated) != b])
    return steps


def test_continuous_batching_admits_under_the_token_budget_step_by_step():
    """max_running 3, max_batch_tokens 4; (input_len, output_len) = r0 (5, 4), r1 (3, 6), r2 (8, 2),
    r3 (2, 5), r4 (6, 3). Decode tokens first, then prompts in progress, then admissions, oldest first:
      1: r0 prefill 4                          -> budget spent; r1 waits
      2: r0 prefill 1 (token 1), r1 3 (token 1)
      3: decode r0 r1, r2 prefill 2
      4: decode r0 r1, r2 prefill 2
      5: decode r0 (its 4th: done), r1, r2 prefill 2
      6: decode r1, r2 prefill 2 (token 1), r3 admitted into r0's slot: 1 of its 2
      7: decode r1 (6th: done) r2 (2nd: done), r3 prefill 1 (token 1)
      8: decode r3, r4 admitted: prefill 3
      9: decode r3, r4 prefill 3 (token 1)
     10, 11: decode r3 r4 (r3's 5th and r4's 3rd: both done)"""
    eng = engine(MODEL, max_running=3, max_batch_tokens=4)
    reqs = requests(CFG, [(5, 4), (3, 6), (8, 2), (2, 5), (6, 3)], seed=0)
    stats = run(eng, reqs)
    assert _counts(stats) == [
        (4, 0, 1), (4, 0, 2), (2, 2, 3), (2, 2, 3), (2, 2, 3), (3, 1, 3), (1, 2, 3), (3, 1, 2), (3, 1, 2),
        (0, 2, 2), (0, 2, 2),
    ]  # fmt: skip
    ends = [s.end_s for s in stats]
    assert [r.token_times_s for r in reqs] == [
        ends[1:5], ends[1:7], ends[5:7], ends[6:11], ends[8:11]
    ]  # fmt: skip
    assert [r.id for r in eng.finished] == [0, 1, 2, 3, 4]
    assert all(s.tokens <= 4 and s.running <= 3 for s in stats)


def test_continuous_batching_admits_under_max_running_then_into_a_freed_slot():
    """max_running 2, max_batch_tokens 8; r0 (3, 3), r1 (2, 2), r2 (2, 4):
    1: r0 prefill 3, r1 prefill 2 (budget 3 left, but no free slot: r2 waits)
    2: decode r0 r1 (r1's 2nd: done, its slot freed)
    3: decode r0 (done), r2 admitted into r1's slot, prefill 2
    4-6: decode r2"""
    eng = engine(MODEL, max_running=2, max_batch_tokens=8)
    reqs = requests(CFG, [(3, 3), (2, 2), (2, 4)], seed=1)
    slots = {}
    for r in reqs:
        eng.add(r)
    stats = []
    while eng.has_work():
        stats.append(eng.step())
        slots.update({r.id: r.slot for r in eng.running if r.id not in slots})
    assert _counts(stats) == [(5, 0, 2), (0, 2, 2), (2, 1, 2), (0, 1, 1), (0, 1, 1), (0, 1, 1)]
    assert slots == {0: 0, 1: 1, 2: 1}
    assert all(r.slot is None for r in reqs)  # retired requests hold no slot


def test_static_batching_forms_the_next_batch_only_after_all_finished():
    """max_running 2: r0 and r1 form a batch; r2 waits while r0 still decodes even though r1's slot is
    free (continuous batching admits it at once)."""
    specs = [(3, 4), (2, 1), (2, 2)]
    static = _progress(engine(MODEL, 2, 16, "static"), requests(CFG, specs, seed=2))
    assert static == [[0, 1], [0], [0], [0], [2], [2]]
    continuous = _progress(engine(MODEL, 2, 16, "continuous"), requests(CFG, specs, seed=2))
    assert continuous == [[0, 1], [0, 2], [0, 2], [0]]


def test_static_batch_prefills_in_chunks_when_its_prompts_exceed_the_budget():
    """Static: max_running 2, max_batch_tokens 4, prompts 4 and 3: both join the batch in step 1 (it is
    formed when the engine is empty), but r1 has no budget until step 2; r2 waits for both to finish."""
    eng = engine(MODEL, 2, 4, "static")
    reqs = requests(CFG, [(4, 2), (3, 2), (1, 1)], seed=3)
    steps = _progress(eng, reqs)
    assert steps == [[0], [0, 1], [1], [2]]
    # the fake clock: step k (from 0) reads start 3k, forward start 3k + 1, end 3k + 2
    assert [r.scheduled_s for r in reqs] == [0, 3, 9]  # the start of the step that first computed it
    assert [r.token_times_s for r in reqs] == [[2, 5], [5, 8], [11]]


def test_prompt_longer_than_max_batch_tokens_is_prefilled_in_chunks():
    eng = engine(MODEL, max_running=2, max_batch_tokens=4)
    (req,) = requests(CFG, [(10, 3)], seed=4)
    stats = run(eng, [req])
    assert _counts(stats) == [(4, 0, 1), (4, 0, 1), (2, 0, 1), (0, 1, 1), (0, 1, 1)]
    assert req.scheduled_s == stats[0].start_s
    assert req.token_times_s == [stats[2].end_s, stats[3].end_s, stats[4].end_s]  # first token: the last chunk
    (whole,) = requests(CFG, [(10, 3)], seed=4)
    run(engine(MODEL, max_running=1, max_batch_tokens=16), [whole])
    assert rel_error(outputs(req), outputs(whole)) <= SERVE_TOLERANCE


def test_request_with_one_output_finishes_at_its_prefill():
    eng = engine(MODEL, max_running=2, max_batch_tokens=8)
    (req,) = requests(CFG, [(5, 1)], seed=5)
    (stats,) = run(eng, [req])
    assert (stats.prefill_tokens, stats.decode_tokens, stats.running) == (5, 0, 1)
    assert req.done and req.first_token_s == req.finish_s == stats.end_s == 2
    assert eng.finished == [req] and not eng.running and req.slot is None
    assert outputs(req).shape == (1, CFG.hidden)
    ref = MODEL.full(req.prompt)[-1]  # the last prompt row's output hidden state
    assert rel_error(outputs(req)[0], ref) <= SERVE_TOLERANCE


def test_token_times_and_queueing_on_the_fake_clock():
    """A request admitted late: ``scheduled_s`` is the start of its first step (queueing ends there),
    each token's time the end of the step that made it; ``forward_s`` within the step."""
    eng = engine(MODEL, max_running=1, max_batch_tokens=8)
    reqs = requests(CFG, [(2, 2), (3, 2)], seed=6)
    stats = run(eng, reqs)
    assert [(s.start_s, s.end_s, s.forward_s) for s in stats] == [(0, 2, 1), (3, 5, 1), (6, 8, 1), (9, 11, 1)]
    assert [r.scheduled_s for r in reqs] == [0, 6]
    assert [r.token_times_s for r in reqs] == [[2, 5], [8, 11]]
    assert [(r.first_token_s, r.finish_s) for r in reqs] == [(2, 5), (8, 11)]


def test_empty_engine_still_steps_with_zero_tokens():
    """An EP rank with nothing to do joins every step with an empty forward."""
    for model in (MODEL, VOCAB_MODEL):
        stats = engine(model, max_running=2, max_batch_tokens=4).step()
        assert (stats.prefill_tokens, stats.decode_tokens, stats.running) == (0, 0, 0)


def test_freed_slot_serves_a_shorter_request_as_a_fresh_engine_does():
    """r1 reuses r0's slot after r0 filled it with 9 positions: its outputs are those of a fresh engine."""
    eng = engine(MODEL, max_running=1, max_batch_tokens=16, max_len=12)
    reqs = requests(CFG, [(6, 4), (3, 4)], seed=7)
    run(eng, reqs)
    (fresh,) = requests(CFG, [(6, 4), (3, 4)], seed=7)[1:]
    run(engine(MODEL, max_running=1, max_batch_tokens=16, max_len=12), [fresh])
    assert rel_error(outputs(reqs[1]), outputs(fresh)) <= SERVE_TOLERANCE


SPECS = [(5, 4), (3, 6), (8, 2), (2, 5), (6, 3), (1, 4), (9, 2)]
BATCHINGS = [
    ("continuous", 3, 4),  # prompts chunked by 4, decode and prefill mixed
    ("continuous", 4, 7),
    ("continuous", 7, 64),  # everything prefilled at once
    ("static", 3, 5),
    ("static", 4, 64),
]


@pytest.mark.parametrize(("batching", "max_running", "max_batch_tokens"), BATCHINGS)
def test_outputs_do_not_depend_on_what_else_was_batched(batching, max_running, max_batch_tokens):
    """Each request alone (one at a time, unchunked) vs all seven batched: hidden states within
    SERVE_TOLERANCE, greedy tokens (vocab 29) equal."""
    for cfg, model in ((CFG, MODEL), (VOCAB_CFG, VOCAB_MODEL)):
        alone = []
        for i in range(len(SPECS)):
            req = requests(cfg, SPECS, seed=8)[i]
            run(engine(model, max_running=1, max_batch_tokens=16), [req])
            alone.append(outputs(req))
        batched = requests(cfg, SPECS, seed=8)
        run(engine(model, max_running, max_batch_tokens, batching), batched)
        for r, ref in zip(batched, alone, strict=True):
            if cfg.vocab:
                assert outputs(r).tolist() == ref.tolist(), f"request {r.id}"
            else:
                assert rel_error(outputs(r), ref) <= SERVE_TOLERANCE, f"request {r.id}"


def test_greedy_tokens_are_fed_back():
    """With a vocabulary, output g ≥ 1 is the decode of output g − 1's token: the sequence prompt +
    tokens[:-1] run whole gives the same greedy tokens at its last positions."""
    (req,) = requests(VOCAB_CFG, [(4, 5)], seed=9)
    run(engine(VOCAB_MODEL, max_running=1, max_batch_tokens=8), [req])
    tokens = outputs(req)
    seq = torch.cat([req.prompt, tokens[:-1]])
    with torch.no_grad():
        greedy = VOCAB_MODEL.logits(VOCAB_MODEL.full(seq)).argmax(-1)
    assert greedy[3:].tolist() == tokens.tolist()


def test_engine_refuses_a_budget_below_max_running():
    with pytest.raises(ValueError, match=r"max_batch_tokens = 2 is invalid with max_running = 3"):
        Engine(MODEL, max_running=3, max_batch_tokens=2, max_len=8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(batching="dynamic"), r"batching = 'dynamic' is invalid: accepted one of continuous, static"),
        (dict(max_running=0), r"max_running = 0 is invalid: accepted an integer >= 1"),
        (dict(max_batch_tokens=True), r"max_batch_tokens = True is invalid"),
        (dict(max_len=0), r"Engine max_len = 0 is invalid: accepted an integer >= 1"),
    ],
)
def test_engine_refuses_bad_arguments(kw, match):
    args = {"max_running": 2, "max_batch_tokens": 4, "max_len": 8, **kw}
    with pytest.raises(ValueError, match=match):
        Engine(MODEL, **args)


def test_request_must_fit_max_len():
    """A request uses input_len + output_len − 1 positions (its last output is never fed back)."""
    eng = engine(MODEL, max_running=2, max_batch_tokens=4, max_len=10)
    (fits,) = requests(CFG, [(7, 4)], seed=10)
    eng.add(fits)  # 7 + 4 − 1 = 10 positions: exactly max_len
    (long,) = requests(CFG, [(8, 4)], seed=10)
    with pytest.raises(ValueError, match=r"Request 0: input_len 8, output_len 4: accepted .* max_len \(10\)"):
        eng.add(long)
    for n, out in ((0, 2), (3, 0)):
        (bad,) = requests(CFG, [(n, out)], seed=10)
        with pytest.raises(ValueError, match=rf"input_len {n}, output_len {out}: accepted at least 1 each"):
            eng.add(bad)
    assert list(eng.waiting) == [fits]


@pytest.mark.parametrize(
    ("vocab", "prompt", "accepted"),
    [
        (0, torch.zeros(3), r"hidden states \[N, 16\] of a floating dtype"),  # ids given to a vocab-less decoder
        (0, torch.zeros(3, 8), r"hidden states \[N, 16\]"),
        (0, torch.zeros(3, 16, dtype=torch.long), r"of a floating dtype"),
        (29, torch.zeros(3, 16), r"token ids \[N\] of an integer dtype in \[0, 29\)"),
        (29, torch.tensor([1, 29, 2]), r"in \[0, 29\)"),
        (29, torch.tensor([-1, 2]), r"in \[0, 29\)"),
    ],
)
def test_request_with_a_prompt_the_decoder_cannot_take_is_refused_at_add(vocab, prompt, accepted):
    """Refused when queued, before any step: at a step it would fail the whole batch's forward."""
    eng = engine(VOCAB_MODEL if vocab else MODEL, max_running=2, max_batch_tokens=4)
    with pytest.raises(ValueError, match=rf"^Request 7: prompt of shape .* is invalid: accepted .*{accepted}"):
        eng.add(Request(7, prompt, 2))
    assert not eng.has_work()
