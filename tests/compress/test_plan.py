"""The factorization plan: PELA's rank rule, rank multiples, targets, overrides. Pure: shapes only."""

import pytest
import torch
from helpers import make_tiny_vit

from lowrank_cli.compress.plan import make_plan, pela_rank, saves_params
from lowrank_cli.errors import UsageError
from lowrank_cli.models.structure import block_linear_names, select_targets


@pytest.mark.parametrize(
    "d_in,d_out,multiple,expected",
    [
        (768, 2304, 1, 288),  # DeiT-B qkv
        (768, 768, 1, 192),  # proj
        (768, 3072, 1, 307),  # fc1: floor(768*3072 / (2*3840)) = floor(307.2)
        (3072, 768, 1, 307),  # fc2
        (768, 2304, 8, 288),
        (768, 768, 8, 192),
        (768, 3072, 8, 304),
        (3072, 768, 8, 304),
        (768, 3072, 64, 256),
    ],
)
def test_deit_b_rank_table_at_kappa_2(d_in, d_out, multiple, expected):
    assert pela_rank(d_in, d_out, 2.0, multiple) == expected


def test_rank_rule_keeps_at_least_kappa_compression():
    for d_in, d_out in [(768, 3072), (100, 37), (64, 64), (5, 1000)]:
        for kappa in (1.5, 2, 3, 7.5):
            r = pela_rank(d_in, d_out, kappa)
            if r:
                assert d_in * d_out / (r * (d_in + d_out)) >= kappa
                assert d_in * d_out / ((r + 1) * (d_in + d_out)) < kappa  # the largest such rank


def test_default_targets_are_the_block_linears_only():
    model = make_tiny_vit()
    names = block_linear_names(model)
    assert len(names) == 4 * 4  # depth 4 x (qkv, proj, fc1, fc2)
    assert all(n.startswith("blocks.") for n in names)
    assert "head" not in names
    assert set(select_targets(model)) == set(names)


def test_include_exclude_and_exclude_wins():
    model = make_tiny_vit()
    got = select_targets(model, include=[r"blocks\.[01]\..*", "head"], exclude=[r".*\.fc2", "head"])
    assert got == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                   "blocks.1.attn.qkv", "blocks.1.attn.proj", "blocks.1.mlp.fc1"]
    # full match: 'qkv' alone is not a module name
    with pytest.raises(UsageError, match=r"^include 'qkv' matches no nn.Linear"):
        select_targets(model, include=["qkv"])
    with pytest.raises(UsageError, match=r"^exclude 'blocks\\.11\\..\*' matches no"):
        select_targets(model, exclude=[r"blocks\.11\..*"])
    with pytest.raises(UsageError, match="not a valid regular expression"):
        select_targets(model, include=["blocks.(("])


def test_rank_pattern_overrides_and_errors():
    model = make_tiny_vit()
    plan = make_plan(model, kappa=2, rank_multiple=8, rank_pattern=[r".*\.fc1=16", r"blocks\.0\..*=8"])
    ranks = plan.ranks
    assert ranks["blocks.0.mlp.fc1"] == 16  # first match wins
    assert ranks["blocks.0.attn.qkv"] == 8
    assert ranks["blocks.1.attn.qkv"] == pela_rank(192, 576, 2, 8)
    with pytest.raises(UsageError, match="above its full rank 192"):
        make_plan(model, rank_pattern=[r".*\.proj=500"])
    with pytest.raises(UsageError, match="is not REGEX=RANK"):
        make_plan(model, rank_pattern=["16"])
    with pytest.raises(UsageError, match="matches no target layer"):
        make_plan(model, rank_pattern=[r"head=4"])


def test_layers_that_would_not_shrink_stay_dense_and_are_listed():
    model = make_tiny_vit()
    # proj is 192x192: rank 96 costs exactly as much as the dense weight, so it must stay dense
    plan = make_plan(model, rank_pattern=[r".*\.proj=96"])
    assert all(name.endswith("proj") for name in plan.dense)
    assert len(plan.dense) == 4 and "would not reduce parameters" in next(iter(plan.dense.values()))
    assert not saves_params(192, 192, 96) and saves_params(192, 192, 95)
    # a multiple larger than the rank rounds the rank to 0: dense as well
    assert len(make_plan(model, kappa=2, rank_multiple=128).dense) == 16


@pytest.mark.parametrize("kappa", [1.0, 0.5, -2, float("nan"), float("inf")])
def test_kappa_must_be_above_one(kappa):
    with pytest.raises(UsageError, match="kappa must be a number > 1"):
        make_plan(make_tiny_vit(), kappa=kappa)


def test_plan_touches_no_tensor_values():
    with torch.device("meta"):
        model = make_tiny_vit()
    assert len(make_plan(model).ranks) == 16


def test_a_ratio_is_the_kappa_that_keeps_one_minus_it():
    """SVD-LLM's ratio R removes R of a layer's parameters: kappa 1 / (1 - R), whose binary form is not exact."""
    import lowrank_cli
    from lowrank_cli.compress.factorize_options import Ranking

    kappa = Ranking(ratio=0.4).per_layer_kappa
    assert kappa == pytest.approx(5 / 3) and Ranking(kappa=3).per_layer_kappa == 3
    # an 11 x 110 layer at R 0.4 keeps 726 of its 1210 parameters: rank 726 / 121 = 6, which binary floats miss
    assert 11 * 110 / (kappa * 121) < 6 and pela_rank(11, 110, kappa) == 6
    model = make_tiny_vit()
    result = lowrank_cli.factorize(model, ratio=0.5, rank_multiple=1)
    assert {r.rank for r in result.layers} == {pela_rank(r.d_in, r.d_out, 2.0) for r in result.layers}
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(UsageError, match=rf"ratio must be in \(0, 1\) .*, got {bad}"):
            lowrank_cli.factorize(make_tiny_vit(), ratio=bad)
    with pytest.raises(UsageError, match="ratio and kappa both set every layer's ratio"):
        lowrank_cli.factorize(make_tiny_vit(), ratio=0.4, kappa=2)
