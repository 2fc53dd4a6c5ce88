"""Truncated SVD of one weight matrix, split into the two factors of a LowRankLinear (PELA Eq. 3)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

SVD_METHODS = ("exact", "randomized")


@dataclass
class Factors:
    first: torch.Tensor  # rank x d_in:  sqrt(S_r) V_r^T
    second: torch.Tensor  # d_out x rank: U_r sqrt(S_r)
    singular_values: torch.Tensor  # every singular value computed (descending), float32 on the CPU
    kept_energy: float  # sum of the kept sigma^2 over ||W||_F^2
    rel_error: float  # ||W - second @ first||_F / ||W||_F, measured, not inferred from the spectrum
    method: str


# Below this many matrix elements a CPU SVD (or eigendecomposition) runs on one thread. benchmarks/svd_threads.py,
# 2 cores: on a quiet machine 2 threads pay from ~150k elements (1.3x) to 1.6x at 1M+; with the second core busy,
# 2 threads lose at every size (0.02-0.6x: OpenMP barriers wait for the busy core). Below 1M elements the loss on
# a quiet machine is at most 1.5x and the gain on a busy one up to 50x; above, the quiet machine's 1.6x wins.
ONE_THREAD_BELOW = 1_000_000


@contextlib.contextmanager
def linalg_threads(shape: Sequence[int], device: torch.device | str | None = None) -> Iterator[int]:
    """Run the linear algebra of a `shape` matrix on the CPU thread count that pays: one thread for matrices
    below ONE_THREAD_BELOW elements, torch.get_num_threads() otherwise. Yields the count used."""
    threads = torch.get_num_threads()
    small = math.prod(shape) < ONE_THREAD_BELOW and torch.device(device or "cpu").type == "cpu"
    if not small or threads == 1:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 is enough for the SVD of a trained weight; float64 sources stay float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_balanced(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Give each factor sqrt(S): both then have the same scale, which keeps low-precision storage and
    recovery training well conditioned."""
    root = s[:rank].sqrt()
    first = root[:, None] * vh[:rank]
    second = u[:, :rank] * root[None, :]
    return first.contiguous(), second.contiguous()


def truncated_svd(
    weight: torch.Tensor,
    rank: int,
    *,
    method: str = "exact",
    device: torch.device | str | None = None,
    oversample: int | None = None,
    power_iterations: int = 4,
    seed: int = 0,
) -> Factors:
    """Top-`rank` factors of `weight` (d_out x d_in), computed in float32 or better on `device`.

    `exact` uses torch.linalg.svd; `randomized` uses torch.svd_lowrank with oversampling and power iterations,
    which is faster for small ranks of large matrices at the price of a small extra error (reported in
    rel_error, next to the kept energy the exact method would give).
    """
    if method not in SVD_METHODS:
        raise ValueError(f"unknown SVD method {method!r}; choose one of {SVD_METHODS}")
    w = weight.detach().to(device=device or weight.device, dtype=compute_dtype(weight.dtype))
    if method == "exact":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    else:
        q = min(rank + (oversample if oversample is not None else max(10, rank // 4)), *w.shape)
        # svd_lowrank draws a random test matrix: seed it so that the same command gives the same file.
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(w, q=q, niter=power_iterations)
        vh = v.mT
    first, second = split_balanced(u, s, vh, rank)
    total = w.square().sum()
    kept = s[:rank].square().sum() / total if total > 0 else torch.tensor(1.0)
    if total <= 0:
        err = torch.tensor(0.0)
    elif method == "exact":
        # Eckart-Young: the error of the exact truncation is the tail of the spectrum; no GEMM needed.
        err = (s[rank:].square().sum() / s.square().sum()).sqrt()
    else:  # randomized: the factors are approximate, so measure what they really lose
        err = torch.linalg.matrix_norm(w - second @ first) / total.sqrt()
    return Factors(first, second, s.float().cpu(), float(kept), float(err), method)
