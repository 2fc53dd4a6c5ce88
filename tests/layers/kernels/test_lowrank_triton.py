"""The fused low-rank Triton kernel against the two-linear reference, on the CPU through Triton's interpreter
(TRITON_INTERPRET=1, which conftest.py sets on machines without CUDA before triton is imported): ranks of one,
two and three power-of-two chunks, fp32 / fp16 / bf16, token counts and widths with ragged tails, groups of layers,
bias or none, the GELU epilogue, split output columns. Small shapes: the interpreter runs every program in Python. The same grid on a GPU is in
tests/layers/test_fused_lowrank.py (`gpu` marker)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowrank_cli.layers.fused_lowrank import reference  # noqa: E402
from lowrank_cli.layers.kernels import lowrank_triton  # noqa: E402

TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # of the output's largest value


@pytest.fixture
def interpreter():
    if not lowrank_triton.interpreting():
        pytest.skip("Triton is not in its interpreter (on a GPU: tests/layers/test_fused_lowrank.py runs the GPU grid)")


def layers(groups: int, k: int, n: int, rank: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    first = [(torch.randn(rank, k, generator=gen) / k**0.5).to(dtype) for _ in range(groups)]
    second = [(torch.randn(n, rank, generator=gen) / rank**0.5).to(dtype) for _ in range(groups)]
    biases = [torch.randn(n, generator=gen).to(dtype) if bias else None for _ in range(groups)]
    return first, second, biases


def check(y: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.shape == expected.shape and y.dtype == expected.dtype
    scale = expected.float().abs().max().item() or 1.0
    assert (y.float() - expected.float()).abs().max().item() <= TOLERANCE[dtype] * scale


# (tokens, d_in, d_out, rank, groups, dtype, bias, activation, min_programs). With the interpreter's blocks
# (16 tokens, 32 columns, 32 of d_in) every token count, d_in and d_out below but 32 leaves a ragged tail.
GRID = [
    (1, 32, 32, 16, 1, torch.float32, True, "none", 4),  # one token; one chunk
    (17, 40, 50, 48, 1, torch.float32, True, "gelu", 1),  # 48 = 32 + 16; no split
    (45, 72, 96, 448, 1, torch.float32, False, "none", 64),  # 448 = 256 + 128 + 64; split to the last column tile
    (33, 64, 40, 304, 1, torch.float32, True, "none", 4),  # 304: 256 + 64, the last 16 rows masked
    (20, 48, 33, 32, 3, torch.float32, True, "none", 4),  # query / key / value as one group
    (9, 32, 64, 16, 2, torch.float32, False, "gelu", 8),  # two layers, no bias, GELU
    (19, 48, 40, 48, 3, torch.float16, True, "gelu", 4),
    (30, 40, 72, 32, 1, torch.bfloat16, True, "none", 4),
    (5, 64, 96, 64, 3, torch.bfloat16, False, "none", 4),
]


@pytest.mark.parametrize("tokens,d_in,d_out,rank,groups,dtype,bias,activation,min_programs", GRID)
def test_kernel_matches_the_two_linears(interpreter, tokens, d_in, d_out, rank, groups, dtype, bias, activation,
                                        min_programs):
    first, second, biases = layers(groups, d_in, d_out, rank, dtype, bias)
    x = torch.randn(tokens, d_in, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = lowrank_triton.fused_lowrank(x, first, second, biases, activation, min_programs=min_programs)
    check(y, reference(x, first, second, biases, activation), dtype)


def test_leading_dimensions_strided_inputs_and_no_tokens(interpreter):
    first, second, biases = layers(1, 32, 48, 32, torch.float32, True)
    x = torch.randn(2, 7, 64)[..., ::2]  # [2, 7, 32], not contiguous
    y = lowrank_triton.fused_lowrank(x, first, second, biases)
    assert y.shape == (2, 7, 48)
    check(y, reference(x, first, second, biases), torch.float32)
    empty = lowrank_triton.fused_lowrank(torch.randn(0, 5, 32), first, second, biases)
    assert empty.shape == (0, 5, 48)


def test_given_block_sizes_change_nothing(interpreter):
    first, second, biases = layers(2, 40, 70, 48, torch.float32, True)
    x = torch.randn(37, 40)
    expected = reference(x, first, second, biases)
    for config, programs in (({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 16}, 1),
                             ({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64}, 16)):
        check(lowrank_triton.fused_lowrank(x, first, second, biases, config=config, min_programs=programs),
              expected, torch.float32)


@pytest.mark.parametrize("rank,chunks", [
    (16, (16, 16, 16, 1)), (48, (32, 16, 16, 2)), (112, (128, 16, 16, 1)), (192, (128, 64, 16, 2)),
    (256, (256, 16, 16, 1)), (288, (256, 64, 16, 2)), (304, (256, 64, 16, 2)), (448, (256, 128, 64, 3)),
    (512, (512, 16, 16, 1)),
])
def test_ranks_split_into_power_of_two_chunks(rank, chunks):
    assert lowrank_triton.rank_chunks(rank) == chunks


@pytest.mark.parametrize("rank", [0, 8, 24, 528])
def test_ranks_the_kernel_does_not_take(rank):
    with pytest.raises(ValueError, match="multiple of 16"):
        lowrank_triton.rank_chunks(rank)


def test_autotuning_configs_fit_the_rank():
    """The pruned configs keep the accumulators and tiles within a GPU's registers and shared memory."""
    configs = lowrank_triton.tuning_configs()
    for rank, tokens in ((192, 128), (256, 50432), (512, 197), (64, 40)):
        c0, c1, c2, chunks = lowrank_triton.rank_chunks(rank)
        kept = lowrank_triton.prune_configs(configs, {"C0": c0, "C1": c1, "C2": c2, "CHUNKS": chunks,
                                                      "M_BUCKET": 1 << (tokens - 1).bit_length()})
        padded = c0 + c1 * (chunks > 1) + c2 * (chunks > 2)
        assert kept
        if rank == 512:  # the largest accumulators: only the config that spreads them thinnest
            assert len(kept) == 1
        assert all(lowrank_triton.accumulators_per_thread(c, padded) <= lowrank_triton.MAX_ACCUMULATORS
                   for c in kept) or len(kept) == 1
        if tokens <= 64:
            assert all(c.kwargs["BLOCK_M"] <= 64 for c in kept)
        if rank == 256:  # the sweep's winner for DeiT-B's qkv and fc2 at 50432 tokens stays in
            assert any((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (128, 128, 8) for c in kept)
