"""Orthogonal adaptation: every task of a layer gets its own block of one orthogonal basis, so tasks fine-tuned
apart and summed into one backbone keep their updates intact (no interference), on dense and low-rank ViTs."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_vit

import lowrank_cli
from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.training.merging import apply_deltas, merge_deltas, merge_summary, task_deltas
from lowrank_cli.adapters.methods import check_method, method_for
from lowrank_cli.adapters.orthogonal import OrthogonalLinear, orthogonal_basis
from lowrank_cli.adapters.targets import adapter_targets
from lowrank_cli.errors import UsageError

RANK, ALPHA, TASKS = 2, 6.0, 2
SCALE = ALPHA / RANK


def _vit(compressed: bool):
    model = make_tiny_vit(depth=2)
    if compressed:
        lowrank_cli.factorize(model, kappa=2, device="cpu")  # targets: the factors `first` (72 or 48 outputs), `second`
    return model


def _config(model, block: int, **overrides) -> AdapterConfig:
    settings = {"rank": RANK, "alpha": ALPHA, "targets": tuple(adapter_targets(model, head=["head"])),
                "block": block, "blocks": TASKS}
    return AdapterConfig("orthogonal", **{**settings, **overrides})


def _task(base, block: int, seed: int):
    """A copy of `base` with task `block`'s adapters, A drawn at random (as if trained). Returns (model, method)."""
    model = copy.deepcopy(base)
    method = method_for(_config(base, block))
    method.apply(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in method.adapter_parameters(model):
            p.copy_(0.1 * torch.randn_like(p))
    return model, method


def test_the_basis_is_orthonormal_the_same_everywhere_and_blocks_are_disjoint():
    q = orthogonal_basis("blocks.0.attn.qkv", 576, 8)
    assert torch.allclose(q.T @ q, torch.eye(8, dtype=torch.float64), atol=1e-12)
    assert torch.equal(q, orthogonal_basis("blocks.0.attn.qkv", 576, 8)), "seeded by the name alone"
    assert torch.allclose(orthogonal_basis("blocks.0.attn.qkv", 576, 4), q[:, :4], atol=1e-12), \
        "the leading columns do not depend on the number of tasks"
    assert (orthogonal_basis("blocks.1.attn.qkv", 576, 8) - q).abs().max() > 0.1, "another layer, another basis"
    base = make_tiny_vit(depth=2)
    bases = []
    for block in range(TASKS):
        model = copy.deepcopy(base)
        method_for(_config(base, block)).apply(model)
        bases.append(model.blocks[0].mlp.fc2.basis)
    b0, b1 = bases
    assert b0.shape == (192, RANK)
    assert torch.allclose(b0.T @ b0, torch.eye(RANK), atol=1e-5) and torch.allclose(b1.T @ b1, torch.eye(RANK), atol=1e-5)
    assert (b0.T @ b1).abs().max() <= 1e-5


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_starts_at_the_base_trains_A_only_and_merges_exactly(compressed):
    base = _vit(compressed)
    x = torch.randn(2, 3, 32, 32)
    model = copy.deepcopy(base)
    method = method_for(_config(base, 1))
    method.apply(model)
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    adapters = method.adapters(model)
    assert len(adapters) == len(method.config.targets) == (16 if compressed else 8)
    assert [n for n, _ in method.adapter_parameters(model)] == [f"{n}.coefficients" for n, _ in adapters]
    assert not any(k.endswith(".basis") for k in model.state_dict()), "B is recomputed, not stored"
    model(x).square().sum().backward()
    assert all(p.grad.abs().sum() > 0 for _, p in method.adapter_parameters(model)), "A = 0 still learns: B is not"
    model, method = _task(base, 1, seed=3)
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base(x)).abs().max() > 1e-2
        method.merge(model)
        merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5
    assert method.adapters(model) == [] and set(model.state_dict()) == set(base.state_dict())


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
def test_tasks_merged_apart_and_summed_do_not_interfere(compressed):
    base = _vit(compressed)
    factors, deltas = {}, {}  # per task: {layer: (B, A)}; {parameter: its update}
    for block in range(TASKS):
        model, method = _task(base, block, seed=10 + block)
        factors[block] = {n: (m.basis.clone(), m.coefficients.detach().clone()) for n, m in method.adapters(model)}
        method.merge(model)
        deltas[block] = task_deltas(base, model, exclude=["head"])
    backbone = copy.deepcopy(base)
    apply_deltas(backbone, merge_deltas(deltas, "concat"))
    weights, start = dict(backbone.named_parameters()), dict(base.named_parameters())
    for block in range(TASKS):
        for name, (basis, a) in factors[block].items():
            update = weights[f"{name}.weight"] - start[f"{name}.weight"]
            assert torch.allclose(basis.T @ update, SCALE * a, atol=1e-5, rtol=0), (block, name)
    summary = merge_summary(deltas, merge_deltas(deltas, "concat"))
    assert summary["interference"] == pytest.approx(1.0, abs=1e-6)
    assert abs(summary["cosines"]["0,1"]) <= 1e-6


def test_adapter_tensors_reload_into_a_fresh_copy():
    base = make_tiny_vit(depth=2)
    model, method = _task(base, 0, seed=4)
    again = copy.deepcopy(base)
    method_for(AdapterConfig.from_record(method.config.record())).apply(again)
    assert again.load_state_dict(method.adapter_tensors(model), strict=False).unexpected_keys == []
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_config_records_round_trip_and_old_records_load():
    config = AdapterConfig("orthogonal", rank=4, alpha=4.0, targets=("a", "b"), block=1, blocks=3)
    assert config.record()["block"] == 1 and AdapterConfig.from_record(config.record()) == config
    old = {"method": "lora", "rank": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["x"], "norms": [], "later": 1}
    loaded = AdapterConfig.from_record(old)
    assert loaded == AdapterConfig("lora", rank=8, alpha=8.0, targets=("x",))
    assert loaded.block is None and loaded.blocks is None


def test_settings_are_checked_before_anything_changes():
    model = _vit(compressed=True)  # the smallest targets: attn.proj.first, 48 outputs
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError, match=r"adapter_rank x tasks \(13 x 4 = 52\) must be at most the output features "
                                         r"of the smallest target \(48, 'blocks.0.attn.proj.first'\): lower "
                                         r"adapter_rank to 12 or less"):
        method_for(_config(model, 0, rank=13, blocks=4)).apply(model)
    with pytest.raises(UsageError, match=r"block 2 of 2"):
        method_for(_config(model, 2)).apply(model)
    with pytest.raises(UsageError, match=r"adapter_rank must be at least 1, got None"):
        method_for(_config(model, 0, rank=None)).apply(model)
    assert all(type(m) is not OrthogonalLinear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(UsageError, match=r"method 'orthogonal' is not one of head, full, lora, dora, rlrr"):
        check_method("orthogonal", None, None, 0.0)  # a multi-task mode, not a method of one run
