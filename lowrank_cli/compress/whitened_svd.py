"""Data-aware truncation: the rank-r weight that best preserves a layer's outputs on calibration inputs.

Plain SVD minimises ||W - W'||_F, which treats every input direction alike. Real activations are far from
isotropic, so what matters is the output error ||(W - W') X||_F over the inputs X (d_in x tokens). With
C = X X^T = S S^T (S any square root of C), ||(W - W') X||_F^2 = tr(E C E^T) = ||(W - W') S||_F^2, so the best
W' is the truncated SVD of W S mapped back by S^{-1} (Eckart-Young in the whitened space; SVD-LLM, Wang et
al. 2024). The bias is unchanged, which is why C is the second moment, not the covariance.

Numerics (C may be singular: few tokens, dead features; or slightly indefinite from rounding):
  1. Work with C / mean(diag C): the solution does not depend on the scale of C.
  2. Cholesky of C. It is accepted only if it succeeds and every pivot L_ii^2 is at least jitter/2 (relative
     to the mean diagonal); a smaller pivot means C is numerically singular there, and L^{-1} would blow up
     rounding noise into huge weights along directions the data never excites.
  3. Otherwise Cholesky of C + lambda*I with lambda = jitter * (1, 1e2, 1e4) (method "cholesky+jitter=...").
     Adding lambda*I minimises tr(E C E^T) + lambda*||E||_F^2: a ridge term, which still keeps the output error
     at or below plain SVD's (plain SVD minimises ||E||_F), and prefers small weights in unseen directions.
  4. Otherwise an eigendecomposition of C with eigenvalues clamped at 0 and those below jitter dropped:
     symmetric square root, and its pseudo-inverse for the map back (method "eigh").
  5. Every result is checked to be finite; if none is, InputError. Nothing is silently wrong.

Factors: W' = U' Sigma' V'^T (its own SVD, obtained cheaply from the whitened one) is split like the plain
method, first = sqrt(Sigma') V'^T, second = U' sqrt(Sigma'), so the factors have equal scale whatever the
scale of the activations (the whitened sqrt(S) split would put the activation scale into `first`).
Everything is computed in float64 on the device of `second_moment`; the caller casts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from lowrank_cli.compress.svd import split_balanced
from lowrank_cli.errors import InputError, UsageError

JITTER = 1e-6  # relative to the mean diagonal of C; also the accepted smallest Cholesky pivot
JITTER_STEPS = (1.0, 1e2, 1e4)  # multiples of `jitter` tried after plain Cholesky fails

Factors = tuple[torch.Tensor, torch.Tensor, dict]


def output_rel_error(weight: torch.Tensor, approx: torch.Tensor, second_moment: torch.Tensor) -> float:
    """sqrt(tr(E C E^T) / tr(W C W^T)) with E = W - approx: relative output error over the inputs behind C."""
    c = second_moment.to(torch.float64)
    w = weight.to(device=c.device, dtype=torch.float64)
    e = w - approx.to(device=c.device, dtype=torch.float64)
    num = float(((e @ c) * e).sum().clamp_min(0))
    den = float(((w @ c) * w).sum())
    if den <= 0:
        return 0.0 if num == 0 else float("inf")
    return (num / den) ** 0.5


def _check_rank(weight: torch.Tensor, rank: int) -> None:
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if not 1 <= rank <= min(weight.shape):
        raise UsageError(f"rank {rank} is out of range for a {tuple(weight.shape)} weight: use 1..{min(weight.shape)}")


def _info(method: str, s: torch.Tensor, rank: int, err: float) -> dict:
    energy = s.square()
    total = float(energy.sum())
    return {
        "method": method,
        "singular_values": s.float().cpu(),
        "kept_energy": float(energy[:rank].sum()) / total if total > 0 else 1.0,
        "output_rel_error": err,
    }


def plain_factors(weight: torch.Tensor, rank: int, *, second_moment: torch.Tensor | None = None) -> Factors:
    """Plain truncated SVD (PELA), float64. output_rel_error is measured on `second_moment` when given,
    else it is the relative Frobenius error (C = I)."""
    _check_rank(weight, rank)
    device = second_moment.device if second_moment is not None else weight.device
    w = weight.detach().to(device=device, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first, second = split_balanced(u, s, vh, rank)
    c = second_moment if second_moment is not None else torch.eye(w.shape[1], dtype=torch.float64, device=device)
    return first, second, _info("svd", s, rank, output_rel_error(w, second @ first, c))


def _whitenings(c: torch.Tensor, jitter: float) -> Iterator[tuple[str, torch.Tensor, Callable]]:
    """Candidate (method, S, right-multiply-by-S^{-1}) with S S^T ~ C (C normalised to mean diagonal 1),
    most exact first."""
    d = c.shape[0]
    # Pivots at rounding level are no information: never accept them, even with jitter=0.
    floor = max(0.5 * jitter, 16 * d * torch.finfo(torch.float64).eps)
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    for step in (0.0, *(jitter * k for k in JITTER_STEPS if jitter > 0)):
        chol, info = torch.linalg.cholesky_ex(c + step * eye if step else c)
        if int(info) == 0 and bool(torch.isfinite(chol).all()) and float(chol.diagonal().square().min()) >= floor:
            method = "cholesky" if step == 0 else f"cholesky+jitter={step:.0e}"
            yield method, chol, lambda b, chol=chol: torch.linalg.solve_triangular(chol, b, upper=False, left=False)
    evals, q = torch.linalg.eigh((c + c.T) / 2)
    keep = evals > max(jitter, floor)
    root_vals = torch.where(keep, evals.clamp_min(0).sqrt(), torch.zeros_like(evals))
    inv_vals = torch.where(keep, 1 / root_vals, torch.zeros_like(evals))
    root = (q * root_vals) @ q.T
    pinv = (q * inv_vals) @ q.T
    yield "eigh", root, lambda b: b @ pinv


def whitened_spectrum(weight: torch.Tensor, second_moment: torch.Tensor, *, jitter: float = JITTER) -> torch.Tensor:
    """The singular values of W S (descending, float32 CPU): what a rank budget allocates on. Without the
    singular vectors it costs half a full SVD; the chosen ranks are then factorized by data_aware_factors."""
    w, c = _normalised(weight, second_moment, jitter)
    for _, root, _ in _whitenings(c, jitter):
        try:
            return torch.linalg.svdvals(w @ root).float().cpu()
        except torch.linalg.LinAlgError:
            continue
    raise InputError(
        "data-aware SVD failed: no whitening of the calibration second moment has a converging SVD; use more "
        "(or different) calibration images, or the plain SVD"
    )


def data_aware_factors(
    weight: torch.Tensor, second_moment: torch.Tensor, rank: int, *, jitter: float = JITTER
) -> Factors:
    """Rank-`rank` factors (first: r x d_in, second: d_out x r, float64) minimising ||(W - second@first) X||_F
    for C = X X^T = `second_moment`.

    info: method ("cholesky", "cholesky+jitter=<lambda>", "eigh"), singular_values (all whitened ones,
    descending, float32 CPU), kept_energy (kept share of the whitened sigma^2), output_rel_error (measured).
    """
    _check_rank(weight, rank)
    w, c = _normalised(weight, second_moment, jitter)
    for method, root, back in _whitenings(c, jitter):
        try:
            u, s, vh = torch.linalg.svd(w @ root, full_matrices=False)
        except torch.linalg.LinAlgError:
            continue
        # W' = U_r diag(s_r) B with B = V_r^T S^{-1}. Re-factor as its own SVD for a balanced split:
        # B^T = Q R, then W' = U_r (diag(s_r) R^T) Q^T and the r x r middle has an SVD P Sigma Z^T.
        b = back(vh[:rank])
        q, r = torch.linalg.qr(b.T)
        p, sigma, zh = torch.linalg.svd(s[:rank, None] * r.T)
        first, second = split_balanced(u[:, :rank] @ p, sigma, zh @ q.T, rank)
        if not (bool(torch.isfinite(first).all()) and bool(torch.isfinite(second).all())):
            continue
        return first, second, _info(method, s, rank, output_rel_error(w, second @ first, c))
    raise InputError(
        "data-aware SVD failed: no whitening of the calibration second moment gave finite factors; "
        "use more (or different) calibration images, or the plain SVD"
    )


def _normalised(weight: torch.Tensor, second_moment: torch.Tensor, jitter: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W and C in float64 on C's device, C scaled to mean diagonal 1; checked."""
    d_out, d_in = weight.shape
    if second_moment.shape != (d_in, d_in):
        raise ValueError(f"second moment is {tuple(second_moment.shape)}, expected ({d_in}, {d_in})")
    if jitter < 0:
        raise UsageError(f"jitter must be >= 0, got {jitter}")
    c = second_moment.detach().to(torch.float64)
    w = weight.detach().to(device=c.device, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise InputError("the weight has NaN or Inf entries: the model is broken; check the checkpoint")
    scale = float(c.diagonal().mean())
    if not bool(torch.isfinite(c).all()) or not scale > 0:
        raise InputError(
            "the calibration second moment is zero or not finite (the layer saw only zeros, or NaN/Inf "
            "activations): check the calibration images and their preprocessing"
        )
    return w, c / scale
