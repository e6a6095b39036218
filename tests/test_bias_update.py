"""DeepSeek-V3's aux-loss-free balancing in training: ``[routing] score_bias_update`` = γ moves every MoE
block's choice bias after each optimizer step, b_e += γ · sign(mean(load) − load_e), from the step's global
per-expert loads (runtime/router.py ``score_bias_step``, runtime/training.py ``Trainer.step``).

1. the update rule by hand (a flipped sign, or a strict/loose comparison at the mean, changes the numbers);
2. the bias is a buffer outside the optimizer, starting at zero when ``score_bias`` = 0;
3. on a router skewed towards expert 0, training with γ > 0 lowers the load imbalance against γ = 0 from
   the same seed, and b_0 goes down;
4. at W = 2 (gloo; EP and data parallelism) every rank holds the same bias after each step, the one a single
   device computes from the whole global batch (per-rank loads would give each rank its own);
5. the train kind's ``imbalance_max_mean`` per step and its first/last-step metrics; the scenario key's
   refusals in one line.

That the bias moves the choice and never the weights is runtime/router.py's ``gate``, tested in
tests/test_router_variants.py (``test_score_bias_moves_the_choice_not_the_weights_by_hand``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_scenario import write
from test_serve_kind import THROUGHPUT, doc_with, refusal
from test_train_kind import TRAIN

from moebench.kinds import train as train_kind
from moebench.launch.spawn import launch
from moebench.measure.training import _curve
from moebench.metrics import imbalance
from moebench.scenario import load
from runtime.config import MoEConfig, ParallelConfig
from runtime.model import Batch, DecoderConfig, MoEDecoder, Segment, decoder_weights
from runtime.router import score_bias_step
from runtime.training import StepRecord, Trainer

GAMMA = 0.05
T, SEQ, W = 32, 8, 2  # tokens per rank, sequence length, ranks


# -------------------------------------------------------------------------------------------
# 1. The rule by hand


def test_score_bias_step_lowers_overloaded_raises_underloaded_and_keeps_an_expert_at_the_mean():
    bias_E = torch.tensor([0.1, 0.0, -0.2, 0.5])
    loads_E = torch.tensor([6, 2, 4, 4])  # mean 4: expert 0 over, 1 under, 2 and 3 exactly at it
    new_E = score_bias_step(bias_E, loads_E, 0.01)
    assert torch.allclose(new_E, torch.tensor([0.09, 0.01, -0.2, 0.5]), rtol=0, atol=1e-7)
    # a mean that is not an integer (5/3): compared exactly, every expert moves
    assert torch.allclose(score_bias_step(torch.zeros(3), torch.tensor([3, 1, 1]), 0.5), torch.tensor([-0.5, 0.5, 0.5]))
    assert torch.equal(score_bias_step(bias_E, torch.tensor([3, 3, 3, 3]), 0.01), bias_E)  # balanced: no change


# -------------------------------------------------------------------------------------------
# 2. A buffer outside the optimizer


def test_the_bias_is_a_zero_buffer_outside_the_optimizer_when_score_bias_is_zero():
    cfg = DecoderConfig(MoEConfig(16, 32, 4, 2, score_bias_update=GAMMA), layers=1, attention_heads=2)
    model = MoEDecoder(cfg, decoder_weights(cfg, seed=1))
    router = model.moe_layers[0].router
    assert torch.equal(router.score_bias_E, torch.zeros(4))
    assert any(n.endswith("router.score_bias_E") for n, _ in model.named_buffers())
    assert not any(n.endswith("score_bias_E") for n, _ in model.named_parameters())
    trainer = Trainer(model, "adamw", 1e-2)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert id(router.score_bias_E) not in optimized and not router.score_bias_E.requires_grad
    assert MoEConfig(16, 32, 4, 2, score_bias_update=GAMMA).plain_routing is False


# -------------------------------------------------------------------------------------------
# 3. A skewed router trained with and without the update


def _skewed(cfg: DecoderConfig, offset: float = 1.5):
    """The seeded decoder weights with every MoE router's logit for expert 0 offset by ``offset`` (fixed:
    not trained), so expert 0 is overloaded."""
    weights, blocks = decoder_weights(cfg, seed=1), []
    for block in weights.blocks:
        if block.moe is not None:
            bias_E = torch.zeros(cfg.moe.num_experts)
            bias_E[0] = offset
            block = dataclasses.replace(block, moe=dataclasses.replace(block.moe, router_bias_E=bias_E))
        blocks.append(block)
    return dataclasses.replace(weights, blocks=tuple(blocks))


def _cfg(gamma: float, layers: int = 1) -> DecoderConfig:
    return DecoderConfig(MoEConfig(16, 32, 4, 2, scoring="sigmoid", score_bias_update=gamma), layers=layers,
                         attention_heads=2)  # fmt: skip


def _data(cfg: DecoderConfig, steps: int, tokens: int):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(tokens, cfg.hidden, generator=g), torch.randn(tokens, cfg.hidden, generator=g))
            for _ in range(steps)]  # fmt: skip


def _batch(cfg: DecoderConfig, tokens: int) -> Batch:
    return Batch([Segment(0, SEQ)] * (tokens // SEQ), "cpu", cfg)


def test_the_update_lowers_a_skewed_routers_imbalance_against_no_update_from_the_same_seed():
    steps, tokens = 16, 64
    runs = {}
    for gamma in (0.0, GAMMA):
        cfg = _cfg(gamma)
        model = MoEDecoder(cfg, _skewed(cfg))
        trainer = Trainer(model, "adamw", 1e-3)
        records = [trainer.step(x, _batch(cfg, tokens), y, tokens) for x, y in _data(cfg, steps, tokens)]
        late = [imbalance(r.loads_LE[0]) for r in records[-4:]]
        bias = getattr(model.moe_layers[0].router, "score_bias_E", None)
        runs[gamma] = (imbalance(records[0].loads_LE[0]), sum(late) / len(late), bias)
    (first0, late0, _), (first1, late1, bias_E) = runs[0.0], runs[GAMMA]
    assert first0 == first1 > 1.5  # the same first step (the bias starts at zero) on a skewed router
    assert late0 > 1.5 and late1 < 0.8 * late0, runs  # the update balances; without it expert 0 stays overloaded
    # measured (CPU): imbalance 1.72 at step 0 both; last 4 steps 1.77 (γ = 0) vs 1.22; b = [-0.2, 0.2, 0.1, 0.2]
    assert bias_E[0] < -0.15 and bias_E[0] == bias_E.min(), bias_E  # expert 0 pushed down, furthest of all


# -------------------------------------------------------------------------------------------
# 4. Identical on every rank at W = 2, and the single device's


def _biases(cfg: DecoderConfig, mode: str, rank: int, group, steps: int) -> dict:
    """Each MoE block's bias after each step, and the steps' loads: EP or DP over ``group`` (None: one
    device on the whole global batch)."""
    weights = _skewed(cfg)
    if group is None:
        model = MoEDecoder(cfg, weights)
    elif mode == "ep":
        model = MoEDecoder(cfg, weights, ParallelConfig(ep_size=W), group)
    else:
        model = MoEDecoder(cfg, weights, dp_group=group)
    trainer = Trainer(model, "adamw", 1e-3, group)
    tokens = T if group is not None else W * T
    rows = slice(rank * T, rank * T + tokens)
    biases, loads = [], []
    for x, y in _data(cfg, steps, W * T):
        loads.append(trainer.step(x[rows], _batch(cfg, tokens), y[rows], W * T).loads_LE)
        biases.append([layer.router.score_bias_E.clone() for layer in model.moe_layers])
    return {"biases": biases, "loads": loads}


def _rank(ctx, steps: int) -> dict:
    torch.set_num_threads(1)
    return {mode: _biases(_cfg(GAMMA, layers=2), mode, ctx.rank, ctx.group, steps) for mode in ("ep", "dp")}


@pytest.mark.multiproc
def test_w2_ranks_hold_the_same_bias_the_single_device_computes_from_the_global_batch():
    """EP (the exchanged counts) and DP (loads summed in the step's statistics all-reduce): every step's loads
    are the global batch's on both ranks (W·T·K copies per block), and both ranks' biases after every step are
    bitwise equal to each other and to the single device's; the biases moved."""
    steps = 3
    ranks = launch(_rank, W, steps, device="cpu", backend="gloo")
    single = _biases(_cfg(GAMMA, layers=2), "ep", 0, None, steps)
    for mode in ("ep", "dp"):
        for step in range(steps):
            assert ranks[0][mode]["loads"][step] == ranks[1][mode]["loads"][step] == single["loads"][step], mode
            assert all(sum(loads_E) == W * T * 2 for loads_E in ranks[0][mode]["loads"][step])
            for block, ref_E in enumerate(single["biases"][step]):
                assert torch.equal(ranks[0][mode]["biases"][step][block], ref_E), (mode, step, block)
                assert torch.equal(ranks[1][mode]["biases"][step][block], ref_E), (mode, step, block)
    assert all(b.abs().sum() > 0 for b in single["biases"][-1])


# -------------------------------------------------------------------------------------------
# 5. The train kind: the metric, the key


class _FixedLoads:
    """A trainer whose steps return fixed loads (two MoE blocks), for the curve's formula."""

    optimizer = None

    def __init__(self, loads: list[tuple]):
        self.loads = iter(loads)

    def step(self, *args) -> StepRecord:
        return StepRecord(1.0, 0.0, 0.0, 1.0, 0, next(self.loads))


def test_the_curve_records_the_worst_blocks_max_over_mean_load_each_step():
    loads = [((6, 2, 4, 4), (5, 3, 4, 4)), ((4, 4, 4, 4), (2, 6, 4, 4))]  # 1.5 and 1.25; 1.0 and 1.5
    data = [(torch.zeros(1), torch.zeros(1))] * 2
    curve = _curve(_FixedLoads(loads), data, None, 16, torch.device("cpu"))
    assert [r["imbalance_max_mean"] for r in curve] == [1.5, 1.5]


def test_train_evaluate_reports_the_first_and_last_steps_imbalance(tmp_path):
    from test_train_kind import _curve as hand_curve
    from test_train_kind import _record

    (spec,) = load(write(tmp_path, doc_with(TRAIN, train={"steps": 3}))).runs
    curve = [r | {"imbalance_max_mean": v} for r, v in zip(hand_curve([2.0, 1.5, 1.0], [0.1] * 3), (1.8, 1.3, 1.1),
                                                            strict=True)]  # fmt: skip
    metrics, _, _ = train_kind.evaluate(spec, [_record(spec, curve)])
    assert metrics["imbalance_max_mean_initial"]["median"] == 1.8
    assert metrics["imbalance_max_mean_final"]["median"] == 1.1


def test_a_train_file_with_score_bias_update_configures_the_router_and_records_the_key(tmp_path):
    (run,) = load(write(tmp_path, doc_with(TRAIN, routing={"score_bias_update": 0.001}))).runs
    moe = run.moe_config()
    assert (moe.score_bias_update, moe.score_bias, moe.has_score_bias) == (0.001, 0.0, True)
    assert run.resolved()["routing"]["score_bias_update"] == 0.001
    (plain,) = load(write(tmp_path, TRAIN, "plain.toml")).runs
    assert "score_bias_update" not in plain.resolved()["routing"] and plain.moe_config().plain_routing


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (
            doc_with(THROUGHPUT, routing={"score_bias_update": 0.001}),
            '[routing] score_bias_update = 0.001 is invalid for kind = "throughput": accepted only with kind "train"',
        ),
        (
            doc_with(TRAIN, routing={"score_bias_update": -0.001}),
            "[routing] score_bias_update = -0.001 is invalid: accepted a finite number >= 0",
        ),
        (
            doc_with(TRAIN, routing={"score_bias_update": 0.001, "topk_before_softmax": True}),
            "topk_before_softmax",
        ),
    ],
    ids=["other kind", "negative", "with topk_before_softmax"],
)
def test_score_bias_update_is_refused_in_one_line(tmp_path, doc, expected):
    assert expected in refusal(tmp_path, doc)


def test_moe_config_refuses_a_negative_score_bias_update_naming_it():
    with pytest.raises(ValueError, match=r"MoEConfig.score_bias_update = -0.1 is invalid: accepted a finite number"):
        MoEConfig(16, 32, 4, 2, score_bias_update=-0.1)
