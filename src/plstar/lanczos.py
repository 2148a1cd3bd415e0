"""Lanczos with full reorthogonalisation, batched over independent symmetric operators.

The one Krylov solver of plstar: it serves the kernel spectrum (:mod:`plstar.spectrum`), the loss
sharpness β and the model-Hessian norm ‖H_F‖ (:mod:`plstar.curvature`, batched over outputs).
Residual bounds are explicit, ‖A y − θ y‖ from stored products, never the recurrence's estimate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from plstar.devices import HOST, host_normal
from plstar.errors import PlstarInputError
from plstar.validation import choice, positive_tolerance, real_number, whole_number
from plstar.validation import seed as check_seed


@dataclass(frozen=True)
class LanczosResult:
    """Extreme Ritz values of B independent operators; residuals are explicit ‖A y − θ y‖."""

    theta_min: Tensor  # (B,)
    theta_max: Tensor  # (B,)
    residual_min: Tensor  # (B,)
    residual_max: Tensor  # (B,)
    vector_max: Tensor  # (B, N) unit Ritz vectors of theta_max
    iterations: int


def _extreme_ritz(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    theta, s = eigh_tridiagonal(np.asarray(alphas), np.asarray(betas[: len(alphas) - 1]))
    return theta, s


def _start_vectors(
    v0: Tensor | None, batch: int, dim: int, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, list[bool]]:
    """Unit start vectors (B, N) on ``device`` and which came from ``v0``: ``v0`` where given,
    non-zero and finite, random elsewhere (a zero start, e.g. a vanishing warm start DFᵀu, spans
    nothing)."""
    q = host_normal((batch, dim), generator, device)
    usable = torch.zeros(batch, dtype=torch.bool, device=device)
    if v0 is not None:
        if not isinstance(v0, Tensor) or v0.numel() != batch * dim:
            raise PlstarInputError(
                f"v0 must be a tensor with {batch * dim} entries (batch × dim), got "
                f"{getattr(v0, 'shape', type(v0).__name__)}"
            )
        given = v0.detach().to(device, torch.float64).reshape(batch, dim)
        usable = torch.isfinite(given).all(dim=1) & (given.norm(dim=1) > 0)
        q = torch.where(usable[:, None], given, q)
    return q / q.norm(dim=1, keepdim=True), usable.tolist()


def _fresh_direction(basis: Tensor, generator: torch.Generator) -> Tensor | None:
    """A random unit vector orthogonal to the rows of ``basis`` (j, N), or None when they span."""
    if basis.shape[0] >= basis.shape[1]:
        return None
    v = host_normal((basis.shape[1],), generator, basis.device)
    for _ in range(2):
        v -= basis.T @ (basis @ v)
    norm = float(v.norm())
    return v / norm if norm > 1e-8 else None


def _estimate(alphas: list[float], betas: list[float], converge: str) -> tuple[float, float]:
    """(residual estimate of the wanted extreme Ritz values, their magnitude) of a tridiagonal."""
    theta, s = _extreme_ritz(alphas, betas)
    top = max(abs(theta[0]), abs(theta[-1]), 1e-300)
    last_row = abs(s[-1, -1]) if converge == "max" else max(abs(s[-1, 0]), abs(s[-1, -1]))
    return abs(betas[-1]) * last_row, top


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    batch: int = 1,
    *,
    v0: Tensor | None = None,
    max_iter: int = 100,
    tol: float = 1e-8,
    seed: int = 0,
    converge: Literal["both", "max"] = "both",
    deadline: float | None = None,
    device: torch.device | str | None = None,
) -> LanczosResult:
    """Lanczos with full reorthogonalisation on ``batch`` independent symmetric operators at once.

    ``matvec`` maps V (B, N) to (A_b v_b)_b, also (B, N); everything here is float64. Stops when both
    extreme Ritz values (only the largest with ``converge="max"``) of every operator have relative
    residual ≤ ``tol`` (estimated by the recurrence), when the Krylov spaces fill ℝ^N, or after
    ``max_iter`` products. A breakdown (the space found is invariant under A, e.g. a start vector
    with A v0 = 0) of a space started from ``v0`` restarts once from a random vector orthogonal
    to it, and convergence is then also required of the Ritz values of the new part, so an
    eigenvalue outside that space is not missed (a random start touches every eigenspace, so its
    breakdown means the extremes were found). ``v0`` (B·N entries) warm-starts; a zero or
    non-finite row is replaced by a random vector. ``deadline`` (a ``time.perf_counter()``
    value) also stops it, after at least one product, before a step as long as the last would
    end past it; the residuals say how far from converged it stopped. The residuals ‖A y − θ y‖ are formed from the stored products A q_j, so
    they cost no product. Memory: 2 · max_iter · B · N float64 (the basis and its images), on
    ``device`` (default: v0's, else the host), where ``matvec`` receives its vectors and every
    result lies; the start vectors are drawn on the host from ``seed`` (the same on every device)
    and the tridiagonal problems solved there.
    """
    dim = whole_number("dim", dim, minimum=1)
    batch = whole_number("batch", batch, minimum=1)
    max_iter = max(1, min(whole_number("max_iter", max_iter, minimum=1), dim))
    tol = positive_tolerance("tol", tol)
    converge = choice("converge", converge, ("both", "max"))  # type: ignore[assignment]
    deadline = None if deadline is None else real_number("deadline", deadline)
    if device is None:
        device = v0.device if isinstance(v0, Tensor) else HOST
    device = torch.device(device)
    generator = torch.Generator(device=HOST).manual_seed(check_seed(seed))
    q, restartable = _start_vectors(v0, batch, dim, generator, device)
    # filled in place, never copied
    basis = torch.empty(max_iter, batch, dim, dtype=torch.float64, device=device)
    # The products A q_j are kept too: a Ritz vector's image is then a combination of them, and
    # its residual is exact without spending another product.
    images = torch.empty(max_iter, batch, dim, dtype=torch.float64, device=device)
    alphas: list[list[float]] = [[] for _ in range(batch)]
    betas: list[list[float]] = [[] for _ in range(batch)]
    part_start = [0] * batch  # where the Krylov space of the latest (re)start begins
    active = torch.ones(batch, dtype=torch.bool, device=device)
    scale = torch.zeros(batch, dtype=torch.float64, device=device)
    used = 0
    for j in range(max_iter):
        step_started = time.perf_counter()
        basis[j] = q
        used = j + 1
        w = matvec(q).to(device, torch.float64).reshape(batch, dim)
        images[j] = w
        alpha = (q * w).sum(dim=1)
        previous = basis[:used]
        norm_before = w.norm(dim=1)
        # Full reorthogonalisation, repeated only when cancellation was severe (the DGKS test):
        # each pass reads the whole basis, which dominates the cost for large operators.
        for _ in range(2):
            w -= torch.einsum("jb,jbn->bn", torch.einsum("jbn,bn->jb", previous, w), previous)
            beta = w.norm(dim=1)
            if bool((beta >= 0.7 * norm_before).all()):
                break
            norm_before = beta
        scale = torch.maximum(scale, alpha.abs() + beta)
        following = w / beta.clamp_min(1e-300)[:, None]
        for b in range(batch):
            if not active[b]:
                continue
            alphas[b].append(float(alpha[b]))
            betas[b].append(float(beta[b]))
            if used == dim:
                active[b] = False
                continue
            if float(beta[b]) <= 1e-13 * float(scale[b]) or float(beta[b]) == 0.0:
                fresh = _fresh_direction(basis[:used, b, :], generator) if restartable[b] else None
                restartable[b] = False
                if fresh is None:
                    active[b] = False
                    continue
                betas[b][-1] = 0.0  # A maps the space found into itself: no coupling
                following[b] = fresh
                part_start[b] = used
                continue
            whole, top = _estimate(alphas[b], betas[b], converge)
            part, _ = _estimate(alphas[b][part_start[b] :], betas[b][part_start[b] :], converge)
            if max(whole, part) <= tol * top:
                active[b] = False
        now = time.perf_counter()  # stop before a step that, as long as this one, would end late
        if not bool(active.any()) or (deadline is not None and 2 * now - step_started >= deadline):
            break
        q = torch.where(active[:, None], following, torch.zeros_like(w))
    vec_max = torch.zeros(batch, dim, dtype=torch.float64, device=device)
    theta_min, theta_max, residual_min, residual_max = torch.zeros(
        4, batch, dtype=torch.float64, device=device
    )
    for b in range(batch):
        theta, s = _extreme_ritz(alphas[b], betas[b])
        length = len(alphas[b])
        coeff = torch.from_numpy(np.ascontiguousarray(s[:, [0, -1]])).to(device)
        ritz = basis[:length, b, :].T @ coeff  # (N, 2) unit Ritz vectors
        image = images[:length, b, :].T @ coeff  # their images A y
        theta_min[b], theta_max[b] = float(theta[0]), float(theta[-1])
        residual_min[b] = (image[:, 0] - theta_min[b] * ritz[:, 0]).norm()
        residual_max[b] = (image[:, 1] - theta_max[b] * ritz[:, 1]).norm()
        vec_max[b] = ritz[:, 1]
    return LanczosResult(theta_min, theta_max, residual_min, residual_max, vec_max, iterations=used)
