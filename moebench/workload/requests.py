"""The serve kind's requests: arrival times, lengths, ranks and prompts, all from the seed.

Arrivals follow vLLM's ``bench serve`` convention: inter-arrival gaps are gamma-distributed with
shape ``burstiness`` and mean 1 / ``request_rate`` (shape 1 is a Poisson process; < 1 burstier,
> 1 more regular); the first request arrives at t = 0, and ``request_rate`` = inf sends every request
at t = 0. Lengths are an integer, or ``[min, max]`` drawn uniformly (both ends included) per
request. Request i is served by rank i mod W (round-robin in arrival order: each rank's attention
serves its own requests). Prompts are unit-variance hidden states (vocab 0) or token ids, seeded
by request id, so any rank can rebuild any request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

REQUEST_STREAM = 1_000_000  # torch generator streams of prompts: REQUEST_STREAM + request id


@dataclass(frozen=True)
class Draw:
    """One request as the workload draws it."""

    id: int
    rank: int
    arrival_s: float  # from the start of the timed window
    input_len: int
    output_len: int


def _lengths(rng: np.random.Generator, value, n: int) -> list[int]:
    if isinstance(value, list):
        low, high = value
        return [int(v) for v in rng.integers(low, high + 1, size=n)]
    return [int(value)] * n


def arrivals(rng: np.random.Generator, n: int, rate: float, burstiness: float) -> list[float]:
    """n arrival times: 0, then cumulative gamma(shape = burstiness, scale = 1/(rate·burstiness)) gaps."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:n]


def draw_requests(serve: dict, world_size: int, seed: int) -> list[Draw]:
    """Every request of a run (all ranks'), in arrival order: ``serve`` is the run's [serve] table."""
    rng = np.random.default_rng([seed, 21])
    n = serve["requests"]
    times = arrivals(rng, n, float(serve["request_rate"]), float(serve["burstiness"]))
    inputs, outputs = _lengths(rng, serve["input_len"], n), _lengths(rng, serve["output_len"], n)
    return [Draw(i, i % world_size, times[i], inputs[i], outputs[i]) for i in range(n)]


def prompt(draw: Draw, hidden: int, vocab: int, seed: int) -> torch.Tensor:
    """The request's prompt: [input_len, hidden] unit-variance states (vocab 0) or [input_len] token ids."""
    gen = torch.Generator().manual_seed((seed << 22) + REQUEST_STREAM + draw.id)  # ids < 2**20: no two collide
    if vocab:
        return torch.randint(0, vocab, (draw.input_len,), generator=gen)
    return torch.randn(draw.input_len, hidden, generator=gen)
