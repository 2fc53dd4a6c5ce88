"""Where threads start to pay for a CPU SVD: one thread vs torch.get_num_threads(), per matrix size.

    OMP_NUM_THREADS=2 python benchmarks/svd_threads.py          # run it alone: a busy second core distorts it

Prints, for square and PELA-shaped (d x 4d) float32 matrices, the median time of torch.linalg.svd (and of the
eigendecomposition the whitened SVD uses) on 1 thread and on all threads, and their ratio. The smallest size at
which all threads win is the crossover `compress.svd.ONE_THREAD_BELOW` should sit at.
"""

from __future__ import annotations

import statistics
import time

import torch

SIZES = [(96, 96), (192, 192), (192, 768), (384, 384), (384, 1536), (768, 768), (768, 2304), (768, 3072),
         (1024, 1024), (1024, 4096)]


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (LAPACK workspace, thread pool)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; median of the repeats, seconds")
    print(f"{'shape':>12} {'elements':>10} {'svd 1 thr':>10} {f'svd {threads} thr':>10} {'ratio':>6} "
          f"{'eigh 1 thr':>11} {f'eigh {threads} thr':>11} {'ratio':>6}")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in SIZES:
        w = torch.randn(rows, cols, generator=gen)
        c = w.mT @ w + torch.eye(cols)
        repeats = 7 if rows * cols < 500_000 else 3
        row = []
        for fn in (lambda: torch.linalg.svd(w, full_matrices=False), lambda: torch.linalg.eigh(c)):
            torch.set_num_threads(1)
            one = timed(fn, repeats)
            torch.set_num_threads(threads)
            many = timed(fn, repeats)
            row += [one, many, one / many]
        print(f"{f'{rows}x{cols}':>12} {rows * cols:>10,} {row[0]:>10.4f} {row[1]:>10.4f} {row[2]:>6.2f} "
              f"{row[3]:>11.4f} {row[4]:>11.4f} {row[5]:>6.2f}")
    print("ratio > 1: all threads are faster; < 1: one thread is faster")


if __name__ == "__main__":
    main()
