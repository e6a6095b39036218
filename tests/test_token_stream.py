"""The decode-like token stream ([workload] steps, correlation): step 0 is today's input, each later
step correlates with the one before by ρ at unit variance, so a real router routes consecutive
steps alike; bad values of both keys are refused with one line."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from moebench.scenario import ScenarioError, load
from moebench.workload.tokens import CALIBRATION_STREAM, MAX_STEPS, step_stream, token_stream, tokens
from runtime import MoEConfig, init_weights
from runtime.router import route

T, D = 256, 512  # 131,072 elements per step: the Pearson r of one lag has a standard error of (1 − ρ²)/362


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation over all elements, in fp64."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


# -------------------------------------------------------------------------------------------
# Seeding


def test_step_0_is_todays_input_and_one_step_is_todays_workload():
    stream = token_stream(4, 32, 16, seed=5, rank=3, correlation=0.7)
    assert torch.equal(stream[0], tokens(32, 16, 5, 3))  # also after the later steps were built from it
    assert len(token_stream(1, 32, 16, 5, 3, 0.7)) == 1
    assert torch.equal(token_stream(1, 32, 16, 5, 3, 0.7)[0], tokens(32, 16, 5, 3))


def test_each_step_follows_the_formula_from_the_one_before_and_its_own_noise():
    rho = 0.6
    stream = token_stream(4, 32, 16, seed=2, rank=1, correlation=rho)
    for s in range(1, 4):
        z = tokens(32, 16, 2, step_stream(s, 1))
        expected = rho * stream[s - 1].double() + math.sqrt(1 - rho**2) * z.double()
        torch.testing.assert_close(stream[s].double(), expected, rtol=0, atol=1e-6)


def test_the_same_seed_gives_the_same_stream_and_another_seed_or_rank_another():
    a = token_stream(5, 32, 16, seed=9, rank=0, correlation=0.5)
    assert all(torch.equal(x, y) for x, y in zip(a, token_stream(5, 32, 16, 9, 0, 0.5), strict=True))
    for other in (token_stream(5, 32, 16, 10, 0, 0.5), token_stream(5, 32, 16, 9, 1, 0.5)):
        assert not any(torch.equal(x, y) for x, y in zip(a, other, strict=True))


def test_the_noise_of_every_step_and_rank_is_its_own_stream_apart_from_every_other_workload_stream():
    """At ρ = 0 a step is its noise alone: no two (step, rank) share it, nor does any other stream of the seed."""
    fresh = {(s, r): x for r in range(4) for s, x in enumerate(token_stream(4, 8, 8, seed=1, rank=r))}
    for (a, x), (b, y) in itertools.combinations(fresh.items(), 2):
        assert not torch.equal(x, y), (a, b)
    others = list(range(4))  # tokens of ranks 0-3
    others += [500_000 + r for r in range(4)]  # gradients
    others += [1_000 * (b + 1) + r for b in range(4) for r in range(4)]  # load_balance batches
    others += [10_000, 20_000, CALIBRATION_STREAM, CALIBRATION_STREAM + 1]
    for (s, r), x in fresh.items():
        if s > 0:
            assert not any(torch.equal(x, tokens(8, 8, 1, stream)) for stream in others), (s, r)
    last_rank = 2**16 - 1  # world_size <= 2**16
    assert step_stream(1, 0) > CALIBRATION_STREAM + 1 and step_stream(MAX_STEPS - 1, last_rank) < 3 * 10**12
    assert all(step_stream(s, last_rank) < step_stream(s + 1, 0) for s in (1, 2, MAX_STEPS - 2))


def test_out_of_range_arguments_are_refused():
    for steps, rank, rho in ((1, 0, 1.0), (1, 0, -0.1), (1, 0, math.nan), (0, 0, 0.0), (MAX_STEPS + 1, 0, 0.0)):
        with pytest.raises(ValueError):
            token_stream(steps, 4, 4, 0, rank, rho)
    with pytest.raises(ValueError):
        token_stream(2, 4, 4, 0, 2**16, 0.0)


# -------------------------------------------------------------------------------------------
# Statistics


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_consecutive_steps_correlate_by_rho_and_every_step_keeps_unit_variance(rho):
    stream = token_stream(11, T, D, seed=0, rank=0, correlation=rho)
    n = T * D
    tolerance = 6 * (1 - rho**2) / math.sqrt(n) + 1e-4  # six standard errors of a sample Pearson r
    for s in (1, 2, 10):  # a step built from step 0 instead of the one before would give ρ^s here
        assert abs(pearson(stream[s], stream[s - 1]) - rho) < tolerance, s
    assert abs(pearson(stream[10], stream[8]) - rho**2) < 6 / math.sqrt(n)  # lag 2: ρ²
    x = stream[10].double()
    assert abs(float(x.var()) - 1) < 6 * math.sqrt(2 / n)  # (1 − ρ) or (1 − ρ²) for √(1 − ρ²) would not hold
    assert abs(float(x.mean())) < 6 / math.sqrt(n)


def top1_repeats(rho: float, experts: int = 16, hidden: int = 256, num_tokens: int = 4096, steps: int = 5) -> tuple:
    """The fraction of tokens whose top-1 expert at step s is the one at s − 1 under a seeded random
    router, over every pair of consecutive steps; and the chance level Σ_e share_e² at independent steps."""
    router_ED = init_weights(MoEConfig(hidden, 8, experts, 1), seed=7).router_ED
    stream = token_stream(steps, num_tokens, hidden, seed=3, rank=0, correlation=rho)
    ids = [route(x_TD @ router_ED.T, 1, False)[2][:, 0] for x_TD in stream]
    same = sum(int((a == b).sum()) for a, b in itertools.pairwise(ids)) / (num_tokens * (steps - 1))
    share_E = torch.bincount(torch.cat(ids), minlength=experts).double() / (num_tokens * steps)
    return same, float((share_E**2).sum())


def test_a_real_router_routes_consecutive_steps_alike_at_high_correlation_and_by_chance_at_zero():
    same_0, chance = top1_repeats(0.0)
    same_5, _ = top1_repeats(0.5)
    same_9, _ = top1_repeats(0.9)
    # 16,384 pairs: the standard error at ρ = 0 is 0.002; measured 0.064 against a chance level of 0.064
    assert abs(same_0 - chance) < 0.02 and 1 / 16 <= chance < 0.1
    assert 0.15 < same_5 < 0.35  # measured 0.25
    assert same_9 > 0.5 and same_9 > 5 * same_0  # measured 0.61


# -------------------------------------------------------------------------------------------
# The scenario keys

SCENARIO = """
[scenario]
name = "s"
kind = "throughput"

[model]
hidden = 8
ffn_hidden = 16
num_experts = 4

[workload]
tokens_per_rank = 16
"""


def scenario_file(tmp_path, line: str = "") -> str:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO + line + "\n")
    return str(path)


def test_the_keys_default_to_one_step_and_no_correlation_and_sweep(tmp_path):
    (run,) = load(scenario_file(tmp_path)).runs
    assert (run.workload["steps"], run.workload["correlation"]) == (1, 0.0)
    runs = load(scenario_file(tmp_path, f"steps = [1, {MAX_STEPS}]\ncorrelation = [0, 0.5, 0.999]")).runs
    assert [r.params for r in runs[:3]] == [{"steps": 1, "correlation": c} for c in (0, 0.5, 0.999)]
    assert len(runs) == 6 and runs[-1].params == {"steps": MAX_STEPS, "correlation": 0.999}


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("correlation = 1.0", "1.0"),
        ("correlation = 1", "1"),
        ("correlation = 1.5", "1.5"),
        ("correlation = -0.1", "-0.1"),
        ("correlation = nan", "nan"),
        ("correlation = inf", "inf"),
        ('correlation = "0.5"', '"0.5"'),
        ("correlation = true", "true"),
        ("correlation = [0.5, 1.0]", "1.0"),
    ],
)
def test_a_correlation_outside_0_to_1_is_refused_with_one_line(tmp_path, line, shown):
    path = scenario_file(tmp_path, line)
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert str(err.value) == (
        f"{path}: [workload] correlation = {shown} is invalid: accepted a finite number >= 0 and < 1"
    )


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("steps = 0", "0"),
        ("steps = -1", "-1"),
        ("steps = 1.5", "1.5"),
        ('steps = "4"', '"4"'),
        ("steps = true", "true"),
        (f"steps = {MAX_STEPS + 1}", str(MAX_STEPS + 1)),
    ],
)
def test_a_step_count_that_is_not_a_positive_integer_is_refused_with_one_line(tmp_path, line, shown):
    path = scenario_file(tmp_path, line)
    with pytest.raises(ScenarioError) as err:
        load(path)
    assert str(err.value) == f"{path}: [workload] steps = {shown} is invalid: accepted an integer from 1 to 65536"
