"""THEORY item 6: mini-batch SGD under PL* for the summed loss (re-exported by plstar.theory).

Source: R. Bassily, M. Belkin, S. Ma, arXiv 1811.02564 ("BBM"); LZB Thm. 7. Derivation of η*(b) and
the rate for L = Σ ℓ_i in docs/theory.md.
"""

from __future__ import annotations

import math
from typing import Literal

from plstar.errors import PlstarInputError
from plstar.validation import choice as _choice
from plstar.validation import clip01 as _clip01
from plstar.validation import real_number as _real
from plstar.validation import whole_number as _int


def _checked(
    per_sample_smoothness: float, loss_smoothness: float, pl_constant: float, n_samples: int,
    batch_size: int,
) -> tuple[float, float, float, int, int]:  # fmt: skip
    """(β, λ, μ, n, b) validated: β, λ > 0 finite; μ finite; n, b ≥ 1 integers."""
    beta = _real("per_sample_smoothness", per_sample_smoothness, minimum=0.0, strict=True)
    lam = _real("loss_smoothness", loss_smoothness, minimum=0.0, strict=True)
    mu = _real("pl_constant", pl_constant)
    n = _int("n_samples", n_samples, minimum=1)
    b = _int("batch_size", batch_size, minimum=1)
    return beta, lam, mu, n, b


def sgd_step_size(
    *,
    per_sample_smoothness: float,
    loss_smoothness: float,
    pl_constant: float,
    n_samples: int,
    batch_size: int,
) -> float:
    """Mini-batch SGD step η*(b) = b μ / (λ (nβ + μ(b − 1))) (THEORY item 6; BBM Thm. 1; LZB Thm. 7).

    Summed convention: update w ← w − η g with g = (n/b) Σ_{i∈batch} ∇ℓ_i, an unbiased estimate
    of ∇L; batch drawn uniformly with or without replacement (without only lowers the variance).
    β = per_sample_smoothness (each ℓ_i = ½‖f(w;x_i) − y_i‖² is β-smooth), λ = loss_smoothness
    (of L = Σℓ_i; λ <= nβ may be used when unknown), μ = pl_constant of L. b → ∞ gives 1/λ.
    μ <= 0 returns 0.0 (no step is certified).
    """
    beta, lam, mu, n, b = _checked(
        per_sample_smoothness, loss_smoothness, pl_constant, n_samples, batch_size
    )
    if mu <= 0.0:
        return 0.0
    return b * mu / (lam * (n * beta + mu * (b - 1)))


def sgd_rate(
    *,
    per_sample_smoothness: float,
    loss_smoothness: float,
    pl_constant: float,
    n_samples: int,
    batch_size: int,
    step_size: float | None = None,
) -> float:
    """Bound ρ on E[L(w_{t+1})] <= ρ·L(w_t) for mini-batch SGD (THEORY item 6; BBM Thm. 1).

    For step η (default η*(b), arguments as in :func:`sgd_step_size`):
    ρ(η) = 1 − 2μη + λη²(nβ + μ(b − 1))/b, valid when λη(b − 1) <= 2b; at η*(b) it equals
    1 − μη*(b) = 1 − bμ²/(λ(nβ + μ(b − 1))). Clipped to [0, 1]; 1 means no guarantee.
    """
    beta, lam, mu, n, b = _checked(
        per_sample_smoothness, loss_smoothness, pl_constant, n_samples, batch_size
    )
    if mu <= 0.0:
        return 1.0
    if step_size is None:  # at η*(b) the bound simplifies to 1 − μη*(b)
        eta = sgd_step_size(
            per_sample_smoothness=beta, loss_smoothness=lam, pl_constant=mu, n_samples=n,
            batch_size=b,
        )  # fmt: skip
        return _clip01(1.0 - mu * eta)
    eta = _real("step_size", step_size, minimum=0.0)
    if lam * eta * (b - 1) > 2 * b:
        return 1.0
    return _clip01(1.0 - 2.0 * mu * eta + lam * eta**2 * (n * beta + mu * (b - 1)) / b)


def sgd_radius(
    *,
    per_sample_smoothness: float,
    pl_constant: float,
    loss0: float,
    n_samples: int,
    failure_probability: float,
    form: Literal["sharp", "paper"] = "sharp",
) -> float:
    """Ball radius for SGD at η*(b), holding with probability 1 − δ (THEORY item 6; LZB Thm. 7).

    ``"sharp"``: R = 2√(2nβL₀)/(μδ), from E‖g‖ <= Σ_i‖∇ℓ_i‖ <= √(2nβL) (Cauchy–Schwarz);
    ``"paper"``: R = 2n√(2βL₀)/(μδ), valid but √n larger. Independent of b. δ = failure
    probability in (0, 1]; ``math.inf`` when μ <= 0.
    """
    beta = _real("per_sample_smoothness", per_sample_smoothness, minimum=0.0)
    mu = _real("pl_constant", pl_constant)
    loss0 = _real("loss0", loss0, minimum=0.0)
    n = _int("n_samples", n_samples, minimum=1)
    delta = _real("failure_probability", failure_probability, minimum=0.0, strict=True)
    if delta > 1.0:
        raise PlstarInputError(f"failure_probability must be in (0, 1], got {delta}")
    form = _choice("form", form, ("sharp", "paper"))  # type: ignore[assignment]
    if mu <= 0.0:
        return math.inf
    scale = math.sqrt(n) if form == "sharp" else float(n)
    return 2.0 * scale * math.sqrt(2.0 * beta * loss0) / (mu * delta)


def sgd_saturation_batch_size(
    *, per_sample_smoothness: float, pl_constant: float, n_samples: int
) -> float:
    """Batch size b* = 1 + nβ/μ where η*(b) stops scaling linearly (THEORY item 6; BBM §3).

    η*(b) = bμ/(λ(nβ + μ(b − 1))) is ≈ b·η*(1) for b ≪ b* and ≈ 1/λ for b ≫ b*; at b* it is half
    the linear extrapolation. Always μ <= nβ (so b* >= 2); typically μ <= β (always for linear
    least squares), so b* > n: this PL* bound predicts linear scaling for every b <= n.
    docs/theory.md compares Ma–Bassily–Belkin's 1 + nβ/λ for quadratics. inf when μ <= 0.
    """
    beta = _real("per_sample_smoothness", per_sample_smoothness, minimum=0.0)
    mu = _real("pl_constant", pl_constant)
    n = _int("n_samples", n_samples, minimum=1)
    return math.inf if mu <= 0.0 else 1.0 + n * beta / mu
