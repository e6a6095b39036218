"""Tiny decoders, seeded requests and a serve loop shared by the serving tests (test_engine.py,
test_serve_parallel.py), and the tolerance a request's outputs are held to across batchings and layouts."""

from __future__ import annotations

import itertools

import torch

from runtime import DecoderConfig, MoEConfig, ParallelConfig
from runtime.engine import Engine, Request
from runtime.model import MoEDecoder, decoder_weights

# A request's fp32 outputs served alone vs batched with others (continuous or static, any
# max_batch_tokens, so other chunkings), or at EP 1 / 2 / 4 or mode dp, agree within ‖a − b‖/‖b‖ ≤
# SERVE_TOLERANCE over all of its output hidden states. Measured (this CPU, torch 2.13, the configs
# below, seeds 0-7, up to 6 outputs a request): the first output (the prompt's) differs by at most
# 7e-7; each output fed back as the next input carries the earlier ones' error, which grows by up
# to ~2x an output, so a request's whole outputs differ by at most 4.0e-6 (batched vs alone) and
# 2.6e-6 (EP 2 / EP 4 / mode dp vs one rank; EP W and mode dp at W agree bitwise here: the layouts' only
# difference from one rank is which requests share a batch). 1e-5 is a few times above that. The
# MoE blocks must be dropless (capacity_factor 0): with a capacity, which copies are dropped
# depends on the batch. Greedy tokens (vocab > 0) must be equal.
SERVE_TOLERANCE = 1e-5

HIDDEN = 16
VOCAB = 29


def decoder_config(vocab: int = 0, **kw) -> DecoderConfig:
    """Every block kind at once: a dense first block, then MoE blocks with a shared expert, GQA 4/2."""
    moe = MoEConfig(hidden_size=HIDDEN, ffn_hidden_size=24, num_experts=4, top_k=2, activation="swiglu")
    base = dict(layers=3, attention_heads=4, kv_heads=2, dense_layers=1, shared_experts=1, vocab=vocab)
    return DecoderConfig(moe, **{**base, **kw})


def decoder(cfg: DecoderConfig, par: ParallelConfig | None = None, group=None, seed: int = 1) -> MoEDecoder:
    return MoEDecoder(cfg, decoder_weights(cfg, seed=seed), par, group)


def prompts(cfg: DecoderConfig, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Seeded prompts: hidden states [N, D] (vocab 0) or token ids [N]; the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    if cfg.vocab:
        return [torch.randint(0, cfg.vocab, (n,), generator=gen) for n in lengths]
    return [torch.randn(n, cfg.hidden, generator=gen) for n in lengths]


def engine(model: MoEDecoder, max_running: int, max_batch_tokens: int, batching: str = "continuous",
           max_len: int = 32) -> Engine:  # fmt: skip
    """An engine on a fake clock (0, 1, 2, ... per call: a step reads it 3 times), keeping every output."""
    return Engine(model, max_running, max_batch_tokens, max_len, batching,
                  clock=itertools.count().__next__, keep_outputs=True)  # fmt: skip


def requests(cfg: DecoderConfig, specs: list[tuple[int, int]], seed: int) -> list[Request]:
    """Fresh requests (input_len, output_len) with seeded prompts; ids 0, 1, ..."""
    ps = prompts(cfg, [n for n, _ in specs], seed)
    return [Request(i, p, out) for i, (p, (_, out)) in enumerate(zip(ps, specs, strict=True))]


def run(eng: Engine, reqs: list[Request]) -> list:
    """Queue every request, step until none is left; the steps' ``StepStats``."""
    for r in reqs:
        eng.add(r)
    stats = []
    while eng.has_work():
        stats.append(eng.step())
    return stats


def outputs(r: Request) -> torch.Tensor:
    """A finished request's outputs: [output_len, D] hidden states, or [output_len] token ids."""
    if r.outputs and isinstance(r.outputs[0], torch.Tensor):
        return torch.stack(r.outputs)
    return torch.tensor(r.outputs)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """‖x − ref‖ / ‖ref‖ in fp64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()
