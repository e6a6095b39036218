"""Invalid configurations raise ValueError naming the field and the bad value; edge cases construct.

Each check matches ``Class.field = value`` (or ``Class.field has N entries``) in the message, so a
validator that blames the wrong field, or drops the value, fails the test.
"""

from __future__ import annotations

import re

import pytest
import torch

from runtime import MoEConfig, MoELayer, ParallelConfig, init_weights
from runtime.placement import place_experts

MOE = {"hidden_size": 8, "ffn_hidden_size": 16, "num_experts": 4}


def moe(**overrides) -> MoEConfig:
    return MoEConfig(**{**MOE, **overrides})


def names(cls: str, field: str, value: object) -> str:
    """Regex for ``cls.field = repr(value) is invalid``."""
    return re.escape(f"{cls}.{field} = {value!r} is invalid")


# ---------------------------------------------------------------------------------------------
# MoEConfig


@pytest.mark.parametrize("top_k", [5, 100])
def test_moe_config_rejects_top_k_above_num_experts(top_k):
    with pytest.raises(ValueError, match=names("MoEConfig", "top_k", top_k) + r".*num_experts \(4\)"):
        moe(top_k=top_k)


@pytest.mark.parametrize("top_k", [0, -1])
def test_moe_config_rejects_top_k_below_one(top_k):
    with pytest.raises(ValueError, match=names("MoEConfig", "top_k", top_k)):
        moe(top_k=top_k)


@pytest.mark.parametrize("field", ["hidden_size", "ffn_hidden_size", "num_experts"])
@pytest.mark.parametrize("value", [0, -4])
def test_moe_config_rejects_non_positive_sizes(field, value):
    with pytest.raises(ValueError, match=names("MoEConfig", field, value) + ".*integer >= 1"):
        moe(**{field: value})


@pytest.mark.parametrize("field", ["hidden_size", "ffn_hidden_size", "num_experts", "top_k"])
@pytest.mark.parametrize("value", [2.5, 4.0, True, "8"], ids=repr)
def test_moe_config_rejects_non_integer_sizes(field, value):
    with pytest.raises(ValueError, match=names("MoEConfig", field, value)):
        moe(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "accepted"),
    [
        ("activation", "relu", "'gelu', 'swiglu'"),
        ("dtype", "float64", "'float32', 'bfloat16', 'float16'"),
        ("expert_backend", "cutlass", "'auto', 'grouped_mm', 'bmm', 'loop'"),
    ],
)
def test_moe_config_rejects_unknown_choices_and_lists_the_accepted_ones(field, value, accepted):
    with pytest.raises(ValueError, match=names("MoEConfig", field, value) + ".*" + re.escape(accepted)):
        moe(**{field: value})


@pytest.mark.parametrize("field", ["capacity_factor", "aux_loss_coef", "z_loss_coef"])
@pytest.mark.parametrize("value", [-0.5, -1, float("nan"), float("inf"), float("-inf"), "1.0", True], ids=repr)
def test_moe_config_rejects_negative_non_finite_or_non_numeric_coefficients(field, value):
    with pytest.raises(ValueError, match=names("MoEConfig", field, value) + ".*finite number >= 0"):
        moe(**{field: value})


@pytest.mark.parametrize("value", ["yes", 1, None], ids=repr)
def test_moe_config_rejects_non_boolean_normalize_topk(value):
    with pytest.raises(ValueError, match=names("MoEConfig", "normalize_topk", value)):
        moe(normalize_topk=value)


# ---------------------------------------------------------------------------------------------
# ParallelConfig


@pytest.mark.parametrize("ep_size", [0, -2, 1.5, True], ids=repr)
def test_parallel_config_rejects_non_positive_or_non_integer_ep_size(ep_size):
    with pytest.raises(ValueError, match=names("ParallelConfig", "ep_size", ep_size)):
        ParallelConfig(ep_size=ep_size)


def test_parallel_config_rejects_unknown_placement():
    with pytest.raises(ValueError, match=names("ParallelConfig", "placement", "random") + ".*'round_robin'"):
        ParallelConfig(ep_size=2, placement="random")


def test_parallel_config_load_balanced_requires_expert_loads():
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_loads", None) + ".*load_balanced"):
        ParallelConfig(ep_size=2, placement="load_balanced")


def test_parallel_config_custom_requires_expert_to_rank():
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_to_rank", None) + ".*custom"):
        ParallelConfig(ep_size=2, placement="custom")


@pytest.mark.parametrize("expert_to_rank", [(0, 1, 2, 1), (0, -1, 1, 0), (0, 1, True, 0), (0, 1.0, 1, 0)], ids=repr)
def test_parallel_config_rejects_custom_map_with_a_rank_outside_the_group(expert_to_rank):
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_to_rank", expert_to_rank) + r".*\[0, 1\]"):
        ParallelConfig(ep_size=2, placement="custom", expert_to_rank=expert_to_rank)


@pytest.mark.parametrize("value", [0, -1, 2.0], ids=repr)
def test_parallel_config_rejects_non_positive_max_experts_per_rank(value):
    with pytest.raises(ValueError, match=names("ParallelConfig", "max_experts_per_rank", value)):
        ParallelConfig(ep_size=2, max_experts_per_rank=value)


@pytest.mark.parametrize("loads", [(1.0, float("nan")), (1.0, -2.0), (float("inf"), 1.0), (1.0, "2")], ids=repr)
def test_parallel_config_rejects_nan_negative_or_infinite_expert_loads(loads):
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_loads", loads) + ".*finite numbers >= 0"):
        ParallelConfig(ep_size=2, placement="load_balanced", expert_loads=loads)


# ---------------------------------------------------------------------------------------------
# place_experts: layouts that cannot be placed


def test_place_experts_rejects_more_ranks_than_experts():
    with pytest.raises(ValueError, match=names("ParallelConfig", "ep_size", 4) + r".*num_experts \(2\)"):
        place_experts(moe(num_experts=2), ParallelConfig(ep_size=4))


@pytest.mark.parametrize("placement", ["round_robin", "contiguous", "load_balanced"])
def test_place_experts_rejects_a_slot_limit_too_small_for_all_experts(placement):
    loads = (1.0,) * 6 if placement == "load_balanced" else None
    par = ParallelConfig(ep_size=4, placement=placement, max_experts_per_rank=1, expert_loads=loads)
    with pytest.raises(ValueError, match=names("ParallelConfig", "max_experts_per_rank", 1) + ".*>= 2"):
        place_experts(moe(num_experts=6), par)


@pytest.mark.parametrize("expert_to_rank", [(0, 1, 0), (0, 1, 0, 1, 0)])
def test_place_experts_rejects_custom_map_of_the_wrong_length(expert_to_rank):
    par = ParallelConfig(ep_size=2, placement="custom", expert_to_rank=expert_to_rank)
    expected = re.escape(f"ParallelConfig.expert_to_rank has {len(expert_to_rank)} entries") + r".*\(4\)"
    with pytest.raises(ValueError, match=expected):
        place_experts(moe(), par)


def test_place_experts_rejects_custom_map_leaving_a_rank_empty():
    par = ParallelConfig(ep_size=3, placement="custom", expert_to_rank=(0, 0, 1, 1))
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_to_rank", (0, 0, 1, 1)) + r".*\[2, 2, 0\]"):
        place_experts(moe(), par)


def test_place_experts_rejects_custom_map_over_the_slot_limit():
    par = ParallelConfig(ep_size=2, placement="custom", expert_to_rank=(0, 0, 0, 1))
    with pytest.raises(ValueError, match=names("ParallelConfig", "expert_to_rank", (0, 0, 0, 1)) + r".*\[3, 1\]"):
        place_experts(moe(), par)  # default limit: ceil(4 / 2) = 2 per rank


@pytest.mark.parametrize("loads", [(1.0, 2.0, 3.0), (1.0,) * 5])
def test_place_experts_rejects_load_vector_of_the_wrong_length(loads):
    par = ParallelConfig(ep_size=2, placement="load_balanced", expert_loads=loads)
    expected = re.escape(f"ParallelConfig.expert_loads has {len(loads)} entries") + r".*\(4\)"
    with pytest.raises(ValueError, match=expected):
        place_experts(moe(), par)


# ---------------------------------------------------------------------------------------------
# MoELayer


def test_moe_layer_with_ep_size_above_one_requires_a_process_group():
    with pytest.raises(ValueError, match=re.escape("ParallelConfig.ep_size = 2 needs a process group") + ".*None"):
        MoELayer(moe(), ParallelConfig(ep_size=2), group=None)


# ---------------------------------------------------------------------------------------------
# Valid edge configurations


def test_top_k_equal_to_num_experts_is_valid_and_routes_every_token_to_every_expert():
    cfg = moe(top_k=4)
    layer = MoELayer(cfg)
    layer.load_global_weights(init_weights(cfg))
    out = layer(torch.randn(3, 8))
    assert out.out_TD.shape == (3, 8)
    assert out.counts_WE.tolist() == [[3, 3, 3, 3]]


def test_a_single_expert_is_valid_and_takes_every_token():
    cfg = moe(num_experts=1)
    layer = MoELayer(cfg)
    layer.load_global_weights(init_weights(cfg))
    out = layer(torch.randn(5, 8))
    assert layer.local_experts == (0,)
    assert out.counts_WE.tolist() == [[5]]
    assert bool(torch.isfinite(out.out_TD).all())


def test_capacity_factor_zero_is_valid_and_means_dropless():
    cfg = moe(capacity_factor=0)
    assert cfg.dropless
    assert not moe(capacity_factor=1.0).dropless
    layer = MoELayer(cfg)
    layer.load_global_weights(init_weights(cfg))
    out = layer(torch.randn(16, 8))
    assert out.capacity is None
    assert out.tokens_dropped == 0


def test_valid_parallel_configs_normalise_their_sequences_to_tuples():
    loads = ParallelConfig(ep_size=2, placement="load_balanced", expert_loads=[3, 1, 2, 0])
    custom = ParallelConfig(ep_size=2, placement="custom", expert_to_rank=[1, 0, 0, 1])
    assert loads.expert_loads == (3.0, 1.0, 2.0, 0.0)
    assert custom.expert_to_rank == (1, 0, 0, 1)
