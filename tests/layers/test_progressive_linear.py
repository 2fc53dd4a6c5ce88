"""The fading layer of progressive compression: dense at lambda 1 (SVD start), low-rank at lambda 0, and the
LowRankLinear it becomes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank_cli.compress.svd import truncated_svd
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.layers.progressive_linear import ProgressiveLinear


def _dense(seed: int = 0, d_in: int = 24, d_out: int = 16) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def _svd_layer(dense: nn.Linear, rank: int = 4) -> ProgressiveLinear:
    f = truncated_svd(dense.weight, rank)
    residual = dense.weight.detach() - f.second @ f.first
    return ProgressiveLinear.around(dense, f.first, f.second, residual=residual)


def test_svd_start_is_the_dense_layer_and_lambda_zero_the_lowrank_one() -> None:
    dense = _dense()
    layer = _svd_layer(dense)
    x = torch.randn(5, 3, 24)
    assert float(layer.lam) == 1.0 and layer.fading
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)  # t = 0: exactly the dense model
    layer.set_lambda(0.0)
    assert not layer.fading
    low = layer.to_lowrank()
    assert isinstance(low, LowRankLinear) and low.rank == 4
    assert torch.equal(layer(x), low(x))  # what was trained is what the checkpoint computes, bit for bit
    f = truncated_svd(dense.weight, 4)  # and that is the PELA factorization (what `lrc factorize` writes)
    torch.testing.assert_close(low.weight_product, f.second @ f.first)
    torch.testing.assert_close(low.second.bias, dense.bias)


def test_lambda_scales_only_the_residual_and_the_bias_never_fades() -> None:
    dense = _dense(1)
    layer = _svd_layer(dense)
    x = torch.randn(7, 24)
    for lam in (1.0, 0.6, 0.25):
        layer.set_lambda(lam)
        expected = lam * x @ layer.residual.T + x @ layer.first.weight.T @ layer.second.weight.T + dense.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    layer.set_lambda(0.0)
    zero = torch.zeros(1, 24)
    torch.testing.assert_close(layer(zero), dense.bias.detach().unsqueeze(0))  # b survives lambda = 0


def test_only_factors_and_bias_train_and_the_residual_is_a_saved_buffer() -> None:
    layer = _svd_layer(_dense())
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "first.weight", "second.weight"]
    assert sorted(layer.state_dict()) == ["bias", "first.weight", "residual", "second.weight"]  # lam: not saved
    layer(torch.randn(2, 24)).sum().backward()
    assert layer.first.weight.grad is not None and layer.bias.grad is not None
    layer.to(torch.float64)
    assert layer.residual.dtype == torch.float64  # the residual follows the training dtype


def test_lora_start_scale_is_folded_into_second() -> None:
    dense = _dense(2)
    torch.manual_seed(3)
    first, second = torch.randn(4, 24), torch.randn(16, 4)
    layer = ProgressiveLinear.around(dense, first, second, residual=dense.weight.detach(), scale=16 / 4)
    layer.set_lambda(0.0)
    x = torch.randn(6, 24)
    low = layer.to_lowrank()
    torch.testing.assert_close(low(x), layer(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.second.weight, 4 * second)
    torch.testing.assert_close(layer.weight_product, low.weight_product)
    assert "residual" not in low.state_dict() and not any("residual" in k for k in low.state_dict())


def test_rank_is_checked() -> None:
    with pytest.raises(ValueError, match="rank must be in"):
        ProgressiveLinear(8, 4, 5)


def test_compiled_layer_does_not_recompile_as_lambda_changes() -> None:
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    try:
        layer = _svd_layer(_dense())
        counter = CompileCounter()
        compiled = torch.compile(layer, backend=counter)
        x = torch.randn(3, 24)
        for lam in (1.0, 0.9, 0.5, 0.1):
            layer.set_lambda(lam)
            torch.testing.assert_close(compiled(x), layer(x))
        assert counter.frame_count == 1  # lam is a tensor the graph reads, not a constant baked into it
        layer.set_lambda(0.0)
        torch.testing.assert_close(compiled(x), layer(x))
        assert counter.frame_count == 2  # the residual's matmul drops out once: one recompile
    finally:
        torch._dynamo.reset()
