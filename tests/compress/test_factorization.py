"""The factorization pass: exactness at full rank, Eckart-Young errors, parameter counts, F.linear detection."""

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import make_tiny_vit
from torch import nn

import lowrank_cli
from lowrank_cli.compress.plan import LayerPlan, Plan, make_plan
from lowrank_cli.compress.svd import truncated_svd
from lowrank_cli.errors import EnvironmentProblem, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear


def test_full_rank_reproduces_dense_outputs():
    model = make_tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(x)
    full = Plan([LayerPlan(p.name, p.d_in, p.d_out, min(p.d_in, p.d_out), "full") for p in make_plan(model).layers])
    result = lowrank_cli.factorize(model, plan=full)
    assert len(result.layers) == 16
    assert all(isinstance(model.get_submodule(r.name), LowRankLinear) for r in result.layers)
    with torch.no_grad():
        low = model(x)
    torch.testing.assert_close(low, dense, rtol=1e-4, atol=1e-4)
    assert result.max_rel_error < 1e-5


def test_truncation_error_is_the_eckart_young_tail():
    model = make_tiny_vit()
    dense_weights = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    result = lowrank_cli.factorize(model, kappa=3, rank_multiple=1)
    assert result.layers
    for r in result.layers:
        w = dense_weights[r.name]
        s = torch.linalg.svdvals(w)
        tail = s[r.rank:].square().sum().sqrt()
        layer = model.get_submodule(r.name)
        err = torch.linalg.matrix_norm(w - layer.weight_product.double())
        assert err.item() == pytest.approx(tail.item(), rel=1e-4)
        assert r.rel_error == pytest.approx((tail / torch.linalg.matrix_norm(w)).item(), rel=1e-4)
        assert r.kept_energy == pytest.approx((s[: r.rank].square().sum() / s.square().sum()).item(), rel=1e-5)


def test_factors_are_balanced_and_bias_moves_to_second():
    w = torch.randn(48, 32)
    f = truncated_svd(w, 8)
    assert f.first.shape == (8, 32) and f.second.shape == (48, 8)
    # sqrt(S) on both sides: the factors have equal column / row norms
    torch.testing.assert_close(f.first.norm(dim=1), f.second.norm(dim=0), rtol=1e-4, atol=1e-5)
    model = nn.Sequential(nn.Sequential(nn.Linear(32, 48)), nn.Sequential(nn.Linear(32, 48)))
    bias = model[0][0].bias.detach().clone()
    lowrank_cli.factorize(model, include=[r"0\.0"], rank_multiple=1, kappa=2, check_calls=False)
    layer = model[0][0]
    assert layer.first.bias is None and torch.equal(layer.second.bias, bias)
    assert layer.rank == 9  # floor(32*48 / (2*80)) = floor(9.6)
    assert isinstance(model[1][0], nn.Linear)  # not included


@pytest.mark.slow
def test_deit_base_parameter_count_at_kappa_2():
    model = timm.create_model("deit_base_patch16_224", pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == 86_567_656
    # Parameter counts depend on ranks only: the randomized SVD keeps this test fast.
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1, svd="randomized", check_calls=False)
    assert result.params_before == 86_567_656
    assert result.params_after == 44_081_896
    assert sum(p.numel() for p in model.parameters()) == 44_081_896
    assert {r.name.rsplit(".", 1)[1]: r.rank for r in result.layers} == {"qkv": 288, "proj": 192, "fc1": 307, "fc2": 307}


def test_randomized_svd_extra_error_is_small():
    torch.manual_seed(0)
    # A trained-like spectrum (decaying), where randomized SVD is meant to be used
    u, _ = torch.linalg.qr(torch.randn(384, 384))
    v, _ = torch.linalg.qr(torch.randn(192, 192))
    s = torch.logspace(0, -2, 192)
    w = u[:, :192] @ torch.diag(s) @ v.T
    exact = truncated_svd(w, 48)
    rand = truncated_svd(w, 48, method="randomized")
    assert rand.rel_error >= exact.rel_error - 1e-6
    assert rand.rel_error <= exact.rel_error * 1.01
    assert rand.method == "randomized"
    # seeded: the same call gives the same factors
    torch.testing.assert_close(truncated_svd(w, 48, method="randomized").first, rand.first)


class ReusesWeight(nn.Module):
    """Like timm's beit/eva attention: calls F.linear on a child's weight instead of calling the child."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(48, 16)

    def forward(self, x):
        return self.out(F.linear(x, self.qkv.weight, self.qkv.bias))


class Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(ReusesWeight(), ReusesWeight())
        self.pretrained_cfg = {"input_size": (4, 16)}

    def forward(self, x):
        return self.blocks(x)


def test_linears_used_through_f_linear_stay_dense_with_a_warning():
    model = Tower().eval()
    x = torch.randn(3, 4, 16)
    messages = []
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1, warn=messages.append, input_size=(4, 16))
    assert [r.name for r in result.layers] == ["blocks.0.out", "blocks.1.out"]
    assert isinstance(model.blocks[0].qkv, nn.Linear)
    assert set(result.dense) == {"blocks.0.qkv", "blocks.1.qkv"}
    assert "F.linear" in result.dense["blocks.0.qkv"]
    assert len(messages) == 1 and "not called as modules" in messages[0] and "blocks.0.qkv" in messages[0]
    assert model(x).shape == (3, 4, 16)


def test_real_timm_model_with_f_linear_is_detected():
    # timm's BEiT computes qkv with F.linear(x, self.qkv.weight, ...)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                              embed_dim=64, num_heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    warnings = []
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1, warn=warnings.append)
    assert {n for n in result.dense if "not called" in result.dense[n]} == {"blocks.0.attn.qkv", "blocks.1.attn.qkv"}
    assert warnings
    assert model(x).shape == (2, 10)


def test_dtype_option_and_bad_options():
    model = make_tiny_vit()
    lowrank_cli.factorize(model, kappa=2, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(UsageError, match="dtype 'int8'"):
        lowrank_cli.factorize(make_tiny_vit(), dtype="int8")
    with pytest.raises(UsageError, match="^svd 'qr'"):
        lowrank_cli.factorize(make_tiny_vit(), svd="qr")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(EnvironmentProblem, match="no CUDA device"):
        lowrank_cli.factorize(make_tiny_vit(), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_svd_on_cuda_matches_cpu():
    w = torch.randn(256, 128)
    cpu, gpu = truncated_svd(w, 32), truncated_svd(w, 32, device="cuda")
    torch.testing.assert_close((gpu.second @ gpu.first).cpu(), cpu.second @ cpu.first, rtol=1e-3, atol=1e-4)


def test_options_that_contradict_each_other_are_refused_not_dropped():
    from helpers import make_tiny_vit

    for kwargs, message in [(dict(kappa=3, budget=0.5), "budget allocates the ranks per layer, kappa"),
                            (dict(budget=0.5, target_macs=10**6), "budget and target_macs both set the size"),
                            (dict(budget=0.5, rank_pattern=[".*=8"]), "rank_pattern fixes some"),
                            (dict(svd="randomized", calib="x"), "drop svd"),
                            (dict(plan_kind="speed", plan_batch_size=0), "plan_batch_size must be at least 1")]:
        with pytest.raises(UsageError, match=message):
            lowrank_cli.factorize(make_tiny_vit(), **kwargs)
    with pytest.raises(UsageError, match="device 'tpu0' is not a device torch knows"):
        lowrank_cli.factorize(make_tiny_vit(), device="tpu0")
