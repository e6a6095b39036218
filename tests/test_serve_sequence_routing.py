"""Sequence routing while serving (runtime/model.py, runtime/engine.py): a request is routed once, on
its prompt's mean, per MoE block; every decode step reuses that choice; the served outputs are the fp64
reference decoder's under the same rule (each block routing the whole request on its prompt's mean)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from runtime.engine import Request
from runtime.model import Batch, Segment, decoder_weights
from runtime.reference import reference_decoder
from tests.serve_cases import SERVE_TOLERANCE, decoder, decoder_config, engine, outputs, rel_error, requests, run

BASE = decoder_config()
CFG = dataclasses.replace(BASE, moe=dataclasses.replace(BASE.moe, granularity="sequence"))
SPECS = [(5, 4), (3, 6), (7, 3)]  # (input_len, output_len)


def _recorded(eng) -> list:
    """Wrap the engine's model: per forward, (segments, each MoE block's per-sequence routing)."""
    calls, forward = [], eng.model.forward

    def recording(inputs, batch, cache=None):
        h, routed = forward(inputs, batch, cache)
        calls.append((batch.segments, [r.sequence_routing for r in routed]))
        return h, routed

    eng.model.forward = recording
    return calls


@pytest.fixture(scope="module")
def served():
    eng = engine(decoder(CFG), max_running=2, max_batch_tokens=8)
    calls, reqs = _recorded(eng), requests(CFG, SPECS, seed=3)
    run(eng, reqs)
    return reqs, calls


def test_every_decode_step_reuses_the_prefill_choice_of_its_request(served):
    _, calls = served
    by_slot_prefill, checked = {}, 0
    for segments, blocks in calls:
        for b, seg in enumerate(segments):
            rows = [(r.ids_TK[b], r.weights_TK[b]) for r in blocks]
            if seg.start == 0:
                assert seg.length in {n for n, _ in SPECS}  # a whole prompt, never a chunk
                by_slot_prefill[seg.slot] = rows
            else:
                for (ids, w), (ids0, w0) in zip(rows, by_slot_prefill[seg.slot], strict=True):
                    assert torch.equal(ids, ids0) and torch.equal(w, w0)
                checked += 1
    assert checked == sum(out - 1 for _, out in SPECS)  # every decode step of every request


def test_served_outputs_match_the_reference_routing_on_the_prompt_mean(served):
    reqs, _ = served
    w = decoder_weights(CFG, seed=1)  # the served decoder's (tests/serve_cases.py ``decoder``)
    for r in reqs:
        got = outputs(r)
        fed = torch.cat([r.prompt, got[:-1]])  # the prompt, then every output but the last fed back
        ref = reference_decoder(CFG, w, fed, prompt_len=r.input_len)[r.input_len - 1 :]
        assert rel_error(got, ref) <= SERVE_TOLERANCE
        whole = reference_decoder(CFG, w, fed)[r.input_len - 1 :]  # routing on the whole sequence's mean
        assert rel_error(got, whole) > 100 * SERVE_TOLERANCE  # the rule is observable on these requests


def test_a_prompt_longer_than_the_batch_budget_is_refused_not_chunked():
    eng = engine(decoder(CFG), max_running=2, max_batch_tokens=4)
    prompt = requests(CFG, [(5, 2)], seed=0)[0].prompt
    with pytest.raises(ValueError, match="input_len 5 is refused with sequence routing: accepted at most max_batch"):
        eng.add(Request(9, prompt, 2))


def test_a_prompt_waits_for_a_step_whose_budget_holds_it_whole():
    """max_batch_tokens 6: step 1 prefills r0 (4 tokens) and r1 (5) waits, 2 being left (token routing would
    chunk 2 of it in); step 2: r0's decode token and r1 whole; step 3: r1's decode token."""
    eng = engine(decoder(CFG), max_running=2, max_batch_tokens=6)
    stats = run(eng, requests(CFG, [(4, 2), (5, 2)], seed=0))
    assert [(s.prefill_tokens, s.decode_tokens) for s in stats] == [(4, 0), (5, 1), (0, 1)]


def test_packed_sequences_of_one_forward_are_each_routed_on_their_own_mean():
    """The train kind's layout (segments without a cache): each segment is a sequence of its own."""
    x = torch.randn(12, CFG.hidden, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        h, _ = decoder(CFG)(x, Batch([Segment(0, 5), Segment(0, 7)], "cpu", CFG))
    w = decoder_weights(CFG, seed=1)
    assert rel_error(h[:5], reference_decoder(CFG, w, x[:5])) <= 1e-6
    assert rel_error(h[5:], reference_decoder(CFG, w, x[5:])) <= 1e-6
    assert rel_error(h[5:], reference_decoder(BASE, w, x[5:])) > 1e-3  # and not as token routing would
