"""Every fine-tuning method merges exactly: the merged model's outputs equal the adapted model's (1e-5, fp32), on
dense nn.Linear and on LowRankLinear alike, and the merged model has the input's layers, shapes and ranks."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_vit
from torch import nn

import lowrank_cli
from lowrank_cli.adapters.base import METHODS, AdapterConfig
from lowrank_cli.adapters.methods import check_method, method_for
from lowrank_cli.adapters.targets import adapter_targets, norm_names
from lowrank_cli.errors import UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear

ADAPTING = ("lora", "dora", "rlrr")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.dense = nn.Linear(16, 24)
        self.low = LowRankLinear(24, 16, rank=4)

    def forward(self, x):
        return x + self.low(torch.relu(self.dense(self.norm(x))))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


LAYERS = {"dense": ["blocks.0.dense", "blocks.1.dense"],
          "lowrank": ["blocks.0.low.first", "blocks.0.low.second", "blocks.1.low.first", "blocks.1.low.second"]}


def _config(method: str, targets: list[str], model: nn.Module) -> AdapterConfig:
    low_rank = method in ("lora", "dora")
    return AdapterConfig(method, rank=2 if low_rank else None, alpha=4.0 if low_rank else None,
                         targets=tuple(targets), norms=tuple(norm_names(model, ["head"])) if method == "rlrr" else ())


def _perturb(method, model: nn.Module) -> None:
    """Move every adapter parameter away from its identity start, so that the merge has something to merge."""
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in method.adapter_parameters(model):
            p.add_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("name", METHODS)
def test_merge_is_exact_on_dense_and_lowrank_layers(name, kind):
    torch.manual_seed(0)
    model = Tiny().eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    x = torch.randn(5, 7, 16)
    plain = model(x)
    method = method_for(_config(name, LAYERS[kind], model))
    method.apply(model)
    assert torch.allclose(model(x), plain, atol=1e-6), "adapters start at the identity"
    _perturb(method, model)
    adapted = model(x)
    if method.adds_modules:
        assert not torch.allclose(adapted, plain, atol=1e-3), "the perturbed adapters change the outputs"
    method.merge(model)
    assert torch.allclose(model(x), adapted, atol=1e-5, rtol=0), (model(x) - adapted).abs().max()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    assert all(type(m) in (Tiny, Block, nn.ModuleList, nn.LayerNorm, nn.Linear, LowRankLinear) for m in model.modules())
    assert method.adapters(model) == []


@pytest.mark.parametrize("compressed", [False, True], ids=["dense", "compressed"])
@pytest.mark.parametrize("name", ADAPTING)
def test_merge_is_exact_on_a_timm_vit(name, compressed):
    model = make_tiny_vit(depth=2)
    if compressed:
        lowrank_cli.factorize(model, kappa=2, device="cpu")
    ranks = {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    count = sum(p.numel() for p in model.parameters())
    method = method_for(_config(name, adapter_targets(model, head=["head"]), model))
    method.apply(model)
    _perturb(method, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        adapted = model(x)
        method.merge(model)
        merged = model(x)
    assert (merged - adapted).abs().max() <= 1e-5
    assert {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("name", METHODS)
def test_trainable_parameters_of_each_method(name):
    model = Tiny()
    method = method_for(_config(name, LAYERS["lowrank"], model))
    method.apply(model)
    trainable = [n for n, _ in method.trainable(model, ["head"])]
    if name == "full":
        assert trainable == [n for n, _ in model.named_parameters()]
        return
    assert {"head.weight", "head.bias"} <= set(trainable)
    others = [n for n in trainable if not n.startswith("head.")]
    if name == "head":
        assert others == []
    else:
        assert others and all("base_layer" not in n for n in others)
        if name == "rlrr":
            assert "blocks.0.low.second.shift" in others and "blocks.0.norm.scale" in others
            assert "blocks.0.low.first.shift" not in others  # `first` has no bias to shift
        if name == "dora":
            assert any("lora_magnitude_vector" in n for n in others)


def test_rlrr_starts_at_the_identity_and_every_scale_learns():
    model = Tiny()
    method = method_for(_config("rlrr", LAYERS["dense"], model))
    method.apply(model)
    model(torch.randn(4, 16)).square().sum().backward()
    grads = {n: p.grad for n, p in method.adapter_parameters(model)}
    assert grads["blocks.0.dense.scale_left"].abs().sum() > 0  # s_left = 0, s_right = 1: the residual is 0 ...
    assert grads["blocks.0.dense.scale_right"].abs().sum() == 0  # ... and s_right learns once s_left moved


def test_targets_patterns():
    model = Tiny()
    assert adapter_targets(model, [r"blocks\.0\.low"], head=["head"]) == ["blocks.0.low.first", "blocks.0.low.second"]
    assert adapter_targets(model, [r"blocks\.\d\.dense"]) == ["blocks.0.dense", "blocks.1.dense"]
    with pytest.raises(UsageError, match="matches no linear layer"):
        adapter_targets(model, [r"blocks\.0\.nothing"])
    with pytest.raises(UsageError, match="outside the head"):
        adapter_targets(model, ["head"], head=["head"])
    with pytest.raises(UsageError, match="not a valid regular expression"):
        adapter_targets(model, ["blocks.("])


def test_method_settings_are_checked():
    with pytest.raises(UsageError, match="adapter_rank must be at least 1"):
        check_method("lora", 0, None, 0.0)
    with pytest.raises(UsageError, match="is for method lora or dora"):
        check_method("rlrr", 8, None, 0.0)
    with pytest.raises(UsageError, match="not one of"):
        check_method("prefix", None, None, 0.0)


def test_dora_without_peft_names_the_extra(monkeypatch):
    import builtins

    from lowrank_cli.errors import EnvironmentProblem

    real = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    with pytest.raises(EnvironmentProblem, match=r"lowrank-cli\[finetune\]"):
        check_method("dora", None, None, 0.0)
