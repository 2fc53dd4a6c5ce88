"""Parameter and MAC counting: the published DeiT-B figures, fused vs unfused attention, low-rank layers."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.evaluation.counting import count_macs, count_params, format_size, linear_macs_removed, parse_size
from lowrank_cli.layers.lowrank_linear import LowRankLinear


def _linear_params(d_in: int, d_out: int) -> int:
    return d_in * d_out + d_out


def _set_fused_attn(model: nn.Module, fused: bool) -> int:
    """Flip timm's per-module switch (the global `set_fused_attn` only affects models built afterwards)."""
    flipped = 0
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused
            flipped += 1
    return flipped


def _replace(model: nn.Module, name: str, rank: int) -> nn.Linear:
    """Swap the nn.Linear at `name` for a LowRankLinear of the same shape; return the old layer."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, LowRankLinear(old.in_features, old.out_features, rank))
    return old


@pytest.fixture(scope="module")
def deit_base() -> nn.Module:
    return timm.create_model("deit_base_patch16_224", pretrained=False)


# ------------------------------------------------------------------------------------------ DeiT-B figures


@pytest.mark.slow
def test_deit_base_params_exact(deit_base: nn.Module) -> None:
    counts = count_params(deit_base)
    d, hidden, blocks, classes = 768, 3072, 12, 1000
    qkv, proj = _linear_params(d, 3 * d), _linear_params(d, d)
    per_block = qkv + proj + _linear_params(d, hidden) + _linear_params(hidden, d)
    assert counts.total == 86_567_656
    assert counts.lowrank == 0
    assert counts.dense_linear == blocks * per_block + _linear_params(d, classes)
    assert counts.other == counts.total - counts.dense_linear


@pytest.mark.slow
def test_deit_base_macs(deit_base: nn.Module) -> None:
    macs = count_macs(deit_base, (3, 224, 224))
    assert macs.total == pytest.approx(17.58e9, rel=0.005)
    assert macs.flops == 2 * macs.total
    assert macs.by_module[""] == macs.total
    assert sum(macs.by_operator.values()) == macs.total
    # The attention matmuls fvcore alone misses: 12 blocks x 12 heads x (QK^T + AV) over 197 tokens, dim 64.
    assert macs.by_operator["scaled_dot_product_attention"] == 12 * 12 * (197 * 197 * 64 * 2)
    assert macs.uncounted == {}
    assert macs.input_shape == (1, 3, 224, 224)


# ------------------------------------------------------------------------------------------ attention


def test_fused_and_unfused_attention_count_the_same() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    assert _set_fused_attn(model, True) == 12
    fused = count_macs(model, (3, 64, 64))
    _set_fused_attn(model, False)
    unfused = count_macs(model, (3, 64, 64))
    assert "scaled_dot_product_attention" in fused.by_operator and "matmul" not in fused.by_operator
    assert unfused.by_operator["matmul"] == fused.by_operator["scaled_dot_product_attention"]
    assert fused.total == unfused.total
    assert fused.by_module == unfused.by_module
    assert fused.uncounted == unfused.uncounted == {}


class _Sdpa(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_sdpa_handle_formula() -> None:
    batch, heads, lq, lk, e, ev = 2, 3, 5, 7, 8, 4
    q = torch.randn(batch, heads, lq, e)
    k, v = torch.randn(batch, heads, lk, e), torch.randn(batch, heads, lk, ev)
    macs = count_macs(_Sdpa(), (q, k, v))
    assert macs.total == batch * heads * (lq * lk * e + lq * lk * ev) == 2520
    assert macs.input_shape == (batch, heads, lq, e)


class _RmsMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).mean(dim=1)


def test_rms_norm_and_mean_follow_fvcore_norm_and_pooling_conventions() -> None:
    macs = count_macs(_RmsMean(), (4, 8))
    assert macs.by_operator == {"rms_norm": 4 * 8 * 5, "mean": 4 * 8}  # as layer_norm, adaptive_avg_pool2d
    assert macs.uncounted == {}


# ------------------------------------------------------------------------------------------ low-rank layers


def test_lowrank_params_and_macs() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    dense_params = count_params(model)
    dense_macs = count_macs(model, (3, 224, 224))
    assert dense_params.total == 5_717_416

    tokens = (224 // 16) ** 2 + 1  # patches plus the class token
    # name -> (rank, tokens the layer sees); the head sees only the pooled class token.
    plan = {
        "blocks.0.attn.qkv": (16, tokens),
        "blocks.1.mlp.fc1": (32, tokens),
        "blocks.11.mlp.fc2": (48, tokens),
        "head": (8, 1),
    }
    removed_macs = lowrank_params = replaced_dense_params = 0
    for name, (rank, seen) in plan.items():
        old = _replace(model, name, rank)
        d_in, d_out = old.in_features, old.out_features
        removed_macs += seen * (d_in * d_out - rank * (d_in + d_out))
        lowrank_params += rank * (d_in + d_out) + d_out
        replaced_dense_params += _linear_params(d_in, d_out)

    params = count_params(model)
    assert params.lowrank == lowrank_params
    assert params.dense_linear == dense_params.dense_linear - replaced_dense_params
    assert params.other == dense_params.other
    assert params.total == params.lowrank + params.dense_linear + params.other
    assert params.total == sum(p.numel() for p in model.parameters())

    macs = count_macs(model, (3, 224, 224))
    assert dense_macs.total - macs.total == removed_macs
    # Each pair is counted as two ordinary linears, attributed to the low-rank module.
    rank, _ = plan["blocks.1.mlp.fc1"]
    assert macs.by_module["blocks.1.mlp.fc1.first"] == tokens * 192 * rank
    assert macs.by_module["blocks.1.mlp.fc1.second"] == tokens * rank * 768
    assert macs.by_module["blocks.1.mlp.fc1"] == tokens * rank * (192 + 768)
    assert macs.uncounted == {}


def test_linear_macs_removed() -> None:
    assert linear_macs_removed(768, 3072, 304, 197) == 197 * (768 * 3072 - 304 * (768 + 3072))
    assert linear_macs_removed(4, 4, 4, 10) == -160  # a rank too large costs MACs


def test_tied_parameters_counted_once() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.out = nn.Linear(4, 10, bias=False)
            self.out.weight = self.embed.weight

    counts = count_params(Tied())
    assert counts.total == 40 == sum(p.numel() for p in Tied().parameters())
    assert counts.other == 40 and counts.dense_linear == 0  # the embedding is met first


# ------------------------------------------------------------------------------------------ inputs, state


def test_count_macs_inputs_and_state() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 2))
    model.train()
    model[3].eval()

    from_size = count_macs(model, (8,))
    assert from_size.total == 8 * 16 + 16 * 2
    assert from_size.input_shape == (1, 8)
    assert count_macs(model, torch.randn(3, 8)).total == 3 * from_size.total
    assert count_macs(model, [torch.randn(5, 8)]).input_shape == (5, 8)

    # Each module's training flag comes back, and the input size path leaves the global RNG alone.
    assert [m.training for m in model] == [True, True, True, False]
    rng_state = torch.get_rng_state()
    count_macs(model, (8,))
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_count_macs_half_precision_model_gets_matching_input() -> None:
    model = nn.Linear(8, 4).to(torch.bfloat16)
    assert count_macs(model, (2, 8)).total == 2 * 8 * 4


@pytest.mark.parametrize("bad", [(), "3,224,224", (3, 0, 224), (3.0, 224, 224), (True, 2)])
def test_count_macs_bad_inputs(bad: object) -> None:
    with pytest.raises(UsageError, match="input size"):
        count_macs(nn.Linear(2, 2), bad)  # type: ignore[arg-type]


def test_count_macs_wrong_image_size_is_input_error() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    with pytest.raises(InputError, match=r"\(1, 3, 32, 32\)"):
        count_macs(model, (3, 32, 32))


class _Fft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.fft.fft(self.proj(x)).real  # fvcore has no handle for the FFT
        y = y + torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # nor for norms
        return F.gelu(y * 2)  # zero-MAC by convention: not reported


def test_uncounted_ops_are_reported() -> None:
    macs = count_macs(_Fft(), (4, 8))
    assert macs.total == 4 * 8 * 8
    assert macs.uncounted.get("aten::fft_fft") == 1
    assert macs.uncounted.get("aten::linalg_vector_norm") == 1
    for zero_mac in ("aten::add", "aten::mul", "aten::gelu"):
        assert zero_mac not in macs.uncounted


# ------------------------------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("50M", 50_000_000),
        ("50m", 50_000_000),
        ("9G", 9_000_000_000),
        ("1.5k", 1500),
        ("1.5K", 1500),
        ("12345", 12345),
        ("2.5e9", 2_500_000_000),
        ("1.1T", 1_100_000_000_000),
        (" 17.58g ", 17_580_000_000),
        ("0", 0),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "50X", "-5M", "1.2.3", "5 MB", "1e-3", "0.0015k", "nan", "inf"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(text)
    message = str(info.value)
    assert repr(text) in message and "50M" in message


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (86_567_656, "86.57M"),
        (17_580_000_000, "17.58G"),
        (17_582_740_224, "17.58G"),
        (999, "999"),
        (1500, "1.50k"),
        (999_999, "1.00M"),
        (2_500_000_000_000, "2.50T"),
        (-1500, "-1.50k"),
    ],
)
def test_format_size(n: int, expected: str) -> None:
    assert format_size(n) == expected


def test_format_then_parse_round_trips_within_rounding() -> None:
    assert parse_size(format_size(86_567_656)) == 86_570_000
