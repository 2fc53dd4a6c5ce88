"""The fused low-rank linear as one Triton kernel: y = act(x @ W1^T @ W2^T + b), the rank-r intermediate on chip.

One program owns a tile of BLOCK_M tokens. It first computes h = x_tile @ W1^T ([BLOCK_M, r], fp32 accumulators in
registers, rounded to the input's dtype as the two-linear reference rounds it), then walks its share of the output
tiles: y_tile = h @ W2_tile^T + b (and GELU), stored once. The intermediate never goes to memory and there is one
launch where the two nn.Linear calls make two. When there are too few token tiles to fill the GPU (batch 1), the
output columns are split across more programs, each recomputing its tile's h (a small GEMM) to gain parallelism.

A rank r that is not a power of two is held as up to three power-of-two chunks (192 = 128 + 64, 448 = 256 + 128 +
64), since Triton's blocks are powers of two; above 64 the chunks are multiples of 64 (304 runs as 256 + 64, its
last 16 rows masked: narrower chunks next to a wide one made ptxas spill).

Horizontal fusion: GROUPS (up to 3) low-rank layers with the same shapes that read the same x (BERT's query, key,
value) run in the same launch, program axis 1 picking the layer; their outputs land side by side in one
[M, GROUPS * N] tensor.

This module imports triton: `lowrank_cli.layers.fused_lowrank` imports it only when Triton is installed. With
TRITON_INTERPRET=1 in the environment before triton is first imported, the same kernel runs on CPU tensors (the
correctness tests); the interpreter gets bf16 `tl.dot` wrong, so there the operands are widened to fp32 first
(DOT_DTYPE), which is what tensor cores compute anyway.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
MAX_GROUPS = 3
MAX_RANK = 512
RANK_STEP = 16


def _fused_lowrank_kernel(
    x_ptr, y_ptr,
    w1a_ptr, w1b_ptr, w1c_ptr, w2a_ptr, w2b_ptr, w2c_ptr, ba_ptr, bb_ptr, bc_ptr,
    M, K, N, M_BUCKET, MIN_PROGRAMS,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_w1r, stride_w1k, stride_w2n, stride_w2r,
    GROUPS: tl.constexpr, RANK: tl.constexpr, C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    CHUNKS: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    splits = tl.num_programs(1) // GROUPS
    g = tl.program_id(1) // splits
    s = tl.program_id(1) % splits
    w1_ptr, w2_ptr, b_ptr = w1a_ptr, w2a_ptr, ba_ptr
    if g == 1:
        w1_ptr, w2_ptr, b_ptr = w1b_ptr, w2b_ptr, bb_ptr
    if g == 2:
        w1_ptr, w2_ptr, b_ptr = w1c_ptr, w2c_ptr, bc_ptr

    # h = x_tile @ W1^T, one accumulator per rank chunk (unused chunks are 16 wide and never touched).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    r0 = tl.arange(0, C0)
    r1 = C0 + tl.arange(0, C1)
    r2 = C0 + C1 + tl.arange(0, C2)
    acc0 = tl.zeros([BLOCK_M, C0], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, C1], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, C2], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        w1_tile = w1_ptr + kk[None, :] * stride_w1k
        w = tl.load(w1_tile + r0[:, None] * stride_w1r, mask=(r0[:, None] < RANK) & mask_k[None, :], other=0.0)
        acc0 = tl.dot(xt, tl.trans(w.to(DOT_DTYPE)), acc0)
        if CHUNKS > 1:
            w = tl.load(w1_tile + r1[:, None] * stride_w1r, mask=(r1[:, None] < RANK) & mask_k[None, :], other=0.0)
            acc1 = tl.dot(xt, tl.trans(w.to(DOT_DTYPE)), acc1)
        if CHUNKS > 2:
            w = tl.load(w1_tile + r2[:, None] * stride_w1r, mask=(r2[:, None] < RANK) & mask_k[None, :], other=0.0)
            acc2 = tl.dot(xt, tl.trans(w.to(DOT_DTYPE)), acc2)
    # Rounded to the input dtype, as the first nn.Linear's output is.
    h0 = acc0.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
    h1 = acc1.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
    h2 = acc2.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)

    # This program's share of the output tiles of its layer: y = h @ W2^T + b.
    n_tiles = tl.cdiv(N, BLOCK_N)
    per_split = tl.cdiv(n_tiles, splits)
    for t in range(s * per_split, tl.minimum(s * per_split + per_split, n_tiles)):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w2_tile = w2_ptr + offs_n[:, None] * stride_w2n
        w = tl.load(w2_tile + r0[None, :] * stride_w2r, mask=mask_n[:, None] & (r0[None, :] < RANK), other=0.0)
        out = tl.dot(h0, tl.trans(w.to(DOT_DTYPE)))
        if CHUNKS > 1:
            w = tl.load(w2_tile + r1[None, :] * stride_w2r, mask=mask_n[:, None] & (r1[None, :] < RANK), other=0.0)
            out = tl.dot(h1, tl.trans(w.to(DOT_DTYPE)), out)
        if CHUNKS > 2:
            w = tl.load(w2_tile + r2[None, :] * stride_w2r, mask=mask_n[:, None] & (r2[None, :] < RANK), other=0.0)
            out = tl.dot(h2, tl.trans(w.to(DOT_DTYPE)), out)
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GELU:
            out = 0.5 * out * (1.0 + tl.math.erf(out * 0.7071067811865476))
        tl.store(y_ptr + offs_m[:, None] * stride_ym + (g * N + offs_n)[None, :] * stride_yn,
                 out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ------------------------------------------------------------------------------------------------ host side


@functools.cache
def rank_chunks(rank: int) -> tuple[int, int, int, int]:
    """(C0, C1, C2, chunks): up to three power-of-two chunks (largest first) covering `rank` with the least padding,
    then the fewest chunks; unused chunks are 16 (never computed). Above rank 64 every chunk is at least 64 wide:
    ptxas spilled kilobytes per thread for 288 = 256 + 32 and 304 = 256 + 32 + 16 (sm_80 and sm_90, compiled
    without a GPU), and nothing for 320 = 256 + 64, so 288 and 304 run as 320 with the last rows masked."""
    if rank % RANK_STEP or not 0 < rank <= MAX_RANK:
        raise ValueError(f"rank {rank} is not a multiple of {RANK_STEP} in [{RANK_STEP}, {MAX_RANK}]")
    step = RANK_STEP if rank <= 64 else 64
    sizes = [0] + [step << i for i in range((MAX_RANK // step).bit_length())]
    best = min((c for c in itertools.combinations_with_replacement(sizes, 3) if sum(c) >= rank),
               key=lambda c: (sum(c) - rank, sum(1 for v in c if v)))
    used = sorted((v for v in best if v), reverse=True)
    return (*used, *[RANK_STEP] * (3 - len(used)), len(used))


def interpreting() -> bool:
    """Triton runs kernels in its interpreter (TRITON_INTERPRET=1; `triton.knobs` from Triton 3.4 on)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


# The block sizes / warps that won `benchmarks/fused_kernel_sweep.py` on an H200 (bf16) for the DeiT-B and BERT-base
# shapes at kappa 2, at 128 to 50432 tokens; the earlier grid (BLOCK_M <= 64, 8 warps) ran 1.3-2x slower than these.
SWEPT_BEST = [(64, 64, 32, 4), (64, 64, 64, 4), (128, 64, 32, 4), (128, 64, 32, 8), (128, 128, 64, 8), (64, 128, 32, 4)]


def tuning_configs() -> list[triton.Config]:
    """What autotuning tries: the sweep's winners (BLOCK_M, BLOCK_N, BLOCK_K, warps), 3 pipeline stages. Few, since
    each is one more compilation per rank and dtype the first time a model runs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=3)
            for m, n, k, w in SWEPT_BEST]


def accumulators_per_thread(config, padded_rank: int) -> float:
    """fp32 registers per thread that the h accumulators take (BLOCK_M x padded rank over the warps' threads)."""
    return config.kwargs["BLOCK_M"] * padded_rank / (32 * config.num_warps)


MAX_ACCUMULATORS = 192  # per thread: the sweep's winners went up to 192 (128 x 192 on 4 warps) without spilling


def prune_configs(configs, named_args, **kwargs):
    """The configs worth timing for these arguments: the h accumulators within the registers, and 128-token tiles
    only where there are more tokens than one tile (below that they compute padding)."""
    args = {**named_args, **kwargs}
    padded = args["C0"] + (args["C1"] if args["CHUNKS"] > 1 else 0) + (args["C2"] if args["CHUNKS"] > 2 else 0)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(64, args["M_BUCKET"])
            and accumulators_per_thread(c, padded) <= MAX_ACCUMULATORS]
    return kept or [min(configs, key=lambda c: accumulators_per_thread(c, padded))]


@functools.cache
def kernel(interpret: bool, tuned: bool = True):
    """The kernel, jitted in the mode Triton is in now: autotuned over block sizes on a GPU (`tuned`), as is
    (block sizes given by the caller) under the interpreter or with `tuned=False`."""
    # M and what follows from it are not specialised on (M % 16 == 0 would compile every config twice).
    jitted = triton.jit(_fused_lowrank_kernel, do_not_specialize=["M", "M_BUCKET", "MIN_PROGRAMS"])
    if interpret or not tuned:
        return jitted
    return triton.autotune(configs=tuning_configs(), key=["M_BUCKET", "N", "K", "RANK", "GROUPS", "GELU"],
                           prune_configs_by={"early_config_prune": prune_configs})(jitted)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _grid(M: int, N: int, groups: int, min_programs: int):
    """(token tiles, layers x splits): the output columns are split only while the token tiles fill less than
    `min_programs` programs (the GPU's SMs) by whole multiples, since each split recomputes its tile's h."""
    def grid(meta):
        m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        splits = max(1, min(triton.cdiv(N, meta["BLOCK_N"]), min_programs // (m_tiles * groups)))
        return (m_tiles, groups * splits)

    return grid


INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}


def fused_lowrank(x: torch.Tensor, first: list[torch.Tensor], second: list[torch.Tensor],
                  bias: list[torch.Tensor | None], activation: str = "none", *,
                  min_programs: int | None = None, config: dict | None = None) -> torch.Tensor:
    """act(x @ first[g]^T @ second[g]^T + bias[g]) for each layer g, side by side: [..., len(first) * N].

    Every layer has the same shapes (first: [r, K], second: [N, r], bias: [N] or all None); x: [..., K]. The caller
    (`layers.fused_lowrank`) checks what the kernel supports. `min_programs`: split the output columns until there
    are about this many programs (default: the GPU's SMs; 4 under the interpreter); `config`: block sizes instead of
    the autotuned ones (under the interpreter: INTERPRETER_CONFIG).
    """
    groups = len(first)
    rank, k = first[0].shape
    n = second[0].shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty((m, groups * n), device=x.device, dtype=x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], groups * n)
    interpret = interpreting()
    c0, c1, c2, chunks = rank_chunks(rank)
    if min_programs is None:
        min_programs = 4 if interpret or x.device.type != "cuda" else _sm_count(x.device.index or 0)
    pad = (MAX_GROUPS - groups)
    w1 = [t.contiguous() for t in first] + [first[0]] * pad
    w2 = [t.contiguous() for t in second] + [second[0]] * pad
    has_bias = bias[0] is not None
    b = [t.contiguous() for t in bias] + [bias[0]] * pad if has_bias else [y] * MAX_GROUPS  # never read
    constants = (groups, rank, c0, c1, c2, chunks, has_bias, activation == "gelu",
                 tl.float32 if interpret else TL_DTYPES[x.dtype])  # GROUPS ... DOT_DTYPE, positional for the pruning
    args = (x2, y, *w1, *w2, *b, m, k, n, triton.next_power_of_2(max(m, 1)), min_programs,
            x2.stride(0), x2.stride(1), y.stride(0), y.stride(1), w1[0].stride(0), w1[0].stride(1),
            w2[0].stride(0), w2[0].stride(1), *constants)
    meta = dict(config or INTERPRETER_CONFIG) if interpret or config is not None else {}
    run = kernel(interpret, tuned=config is None)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        run[_grid(m, n, groups, min_programs)](*args, **meta)
    return y.reshape(*x.shape[:-1], groups * n)
