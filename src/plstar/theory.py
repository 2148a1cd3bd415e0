"""The paper's formulas, one function per result: pure functions of floats, no torch.

Source: C. Liu, L. Zhu, M. Belkin, *Loss landscapes and optimization in over-parameterized
non-linear systems and neural networks*, arXiv 2003.00307 (ACHA 59, 2022), "LZB" below; SGD from
R. Bassily, M. Belkin, S. Ma, arXiv 1811.02564, "BBM". Item numbers refer to THEORY.md and are
the authoritative reference; theorem/section numbers of the papers are our best identification
(arXiv v2) and were not checked line by line. Derivations, and where a constant differs from
THEORY.md, are in docs/theory.md.

Conventions (THEORY.md): summed loss L(w) = ½‖F(w) − y‖² (no 1/n); F: ℝ^m → ℝ^{nk}, sample-major;
K = DF DFᵀ (nk × nk); μ-PL*: ½‖∇L‖² ≥ μ L; β bounds λ_max(H_L). "n_outputs" is always n·k.
Every function refuses NaN, ±inf, negative sizes and the like with ``PlstarInputError``.
Item 6 (SGD) lives in :mod:`plstar.theory_sgd` and is re-exported here.
"""

from __future__ import annotations

import math
from typing import Literal

from plstar.errors import PlstarInputError
from plstar.theory_sgd import (
    sgd_radius,
    sgd_rate,
    sgd_saturation_batch_size,
    sgd_step_size,
)
from plstar.validation import choice as _choice
from plstar.validation import clip01 as _clip01
from plstar.validation import real_number as _real
from plstar.validation import whole_number as _int

__all__ = [
    "gd_radius",
    "gd_rate",
    "gd_step_size",
    "is_overparameterized",
    "kernel_lower_bound_on_ball",
    "model_form_radius",
    "model_form_rate",
    "model_form_step_size",
    "output_layer_kernel_bound",
    "pl_constant",
    "pl_eps_constant",
    "pl_eps_steps_bound",
    "random_system_log_condition_bound",
    "sgd_radius",
    "sgd_rate",
    "sgd_saturation_batch_size",
    "sgd_step_size",
    "solution_manifold_dimension",
    "steps_to_loss",
    "uniform_conditioning_radius",
]


# ----------------------------------------------------------------------------- item 1
def pl_constant(lambda_min_kernel: float) -> float:
    """PL* constant certified by uniform conditioning (THEORY item 1; LZB §4, Def. 3 / Thm. 2).

    ½‖∇L‖² = ½ rᵀK r ≥ λ_min(K)·½‖r‖² = λ_min(K)·L, so μ = λ_min(K(w)) on a set S gives μ-PL* on S.
    K is PSD, so a negative (round-off) or zero value returns 0.0: no PL* certified.
    """
    return max(0.0, _real("lambda_min_kernel", lambda_min_kernel))


# ----------------------------------------------------------------------------- item 2
def gd_radius(beta: float, mu: float, loss0: float) -> float:
    """Radius R = 2√(2βL₀)/μ of the ball on which PL* is needed (THEORY item 2; LZB Thm. 6).

    If L is β-smooth and μ-PL* on B(w₀, R), GD with η = 1/β stays in B and converges to a global
    minimizer in B. β: bound on λ_max(H_L) on the ball; L₀ = L(w₀) (summed loss). Returns
    ``math.inf`` when μ <= 0 (no certificate); 0.0 when L₀ = 0 or β = 0.
    """
    beta = _real("beta", beta, minimum=0.0)
    mu = _real("mu", mu)
    loss0 = _real("loss0", loss0, minimum=0.0)
    if mu <= 0.0:
        return math.inf
    return 2.0 * math.sqrt(2.0 * beta * loss0) / mu


def gd_step_size(beta: float) -> float:
    """GD step η = 1/β (THEORY item 2; LZB Thm. 6). β = 0 returns ``math.inf``."""
    beta = _real("beta", beta, minimum=0.0)
    return math.inf if beta == 0.0 else 1.0 / beta


def gd_rate(beta: float, mu: float) -> float:
    """Per-step loss contraction 1 − μ/β of GD with η = 1/β (THEORY item 2; LZB Thm. 6).

    L(w_t) <= (1 − μ/β)^t L(w₀). Clipped to [0, 1]: μ <= 0 gives 1 (no guarantee); μ > β (not
    possible for one global β, but possible for β measured at a point) gives 0.
    """
    beta = _real("beta", beta, minimum=0.0)
    mu = _real("mu", mu)
    if mu <= 0.0:
        return 1.0
    if beta == 0.0:
        return 0.0
    return _clip01(1.0 - mu / beta)


def steps_to_loss(loss0: float, target_loss: float, rate: float) -> float:
    """Smallest integer t >= 0 with rate**t · L₀ <= target (items 2, 3, 6, 7), as a float.

    0 if L₀ <= target; ``math.inf`` if rate >= 1 or target = 0 < L₀ with rate > 0; 1 if rate = 0
    and L₀ > target. The predicate is evaluated in floating point as written, or in logs where
    rate**t underflows (so 1e300 -> 1e-300 at rate 0.5 gives 1994, not 1075).
    """
    loss0 = _real("loss0", loss0, minimum=0.0)
    target = _real("target_loss", target_loss, minimum=0.0)
    rate = _real("rate", rate, minimum=0.0)
    if loss0 <= target:
        return 0.0
    if rate >= 1.0 or (target == 0.0 and rate > 0.0):
        return math.inf
    if rate == 0.0:
        return 1.0
    log_rate, log_gap = math.log1p(rate - 1.0), math.log(target) - math.log(loss0)

    def reached(k: int) -> bool:  # rate**k * L₀ <= target, in logs only if rate**k underflows
        power = rate**k
        if power >= 2.2250738585072014e-308:
            return power * loss0 <= target
        return k * log_rate <= log_gap

    t = max(1, math.ceil(log_gap / log_rate))
    while t > 1 and reached(t - 1):
        t -= 1
    while not reached(t):
        t += 1
    return float(t)


# ----------------------------------------------------------------------------- item 3
def model_form_radius(lipschitz: float, residual_norm: float, mu: float) -> float:
    """Radius R = 2 L_F ‖F(w₀) − y‖ / μ (THEORY item 3; LZB Thm. 6, model form).

    L_F: bound on ‖DF(w)‖₂ on the ball; residual_norm = ‖F(w₀) − y‖ (not the loss). ``math.inf``
    when μ <= 0.
    """
    lipschitz = _real("lipschitz", lipschitz, minimum=0.0)
    residual_norm = _real("residual_norm", residual_norm, minimum=0.0)
    mu = _real("mu", mu)
    if mu <= 0.0:
        return math.inf
    return 2.0 * lipschitz * residual_norm / mu


def model_form_step_size(lipschitz: float, model_smoothness: float, residual_norm: float) -> float:
    """Step η = 1/(L_F² + β_F ‖F(w₀) − y‖) (THEORY item 3; LZB Thm. 6, model form).

    β_F: Lipschitz constant of DF on the ball (operator norm of D²F); L_F² + β_F‖r‖ bounds
    λ_max(H_L) on the sublevel set {‖r‖ <= ‖r₀‖}. Denominator 0 (constant F) returns ``math.inf``.
    """
    lipschitz = _real("lipschitz", lipschitz, minimum=0.0)
    smooth = _real("model_smoothness", model_smoothness, minimum=0.0)
    residual_norm = _real("residual_norm", residual_norm, minimum=0.0)
    denominator = lipschitz**2 + smooth * residual_norm
    return math.inf if denominator == 0.0 else 1.0 / denominator


def model_form_rate(step_size: float, mu: float) -> float:
    """Per-step loss contraction 1 − ημ (THEORY item 3; LZB Thm. 6), clipped to [0, 1]."""
    step_size = _real("step_size", step_size, minimum=0.0)
    mu = _real("mu", mu)
    return 1.0 if mu <= 0.0 else _clip01(1.0 - step_size * mu)


# ----------------------------------------------------------------------------- item 4
def kernel_lower_bound_on_ball(
    lambda0: float,
    hessian_norm: float,
    radius: float,
    n_outputs: int,
    *,
    lipschitz: float | None = None,
    form: Literal["sharp", "paper", "weyl"] = "sharp",
) -> float:
    """Lower bound on λ_min(K(w)) over B(w₀, R) from Hessian control (THEORY item 4; LZB §4.1).

    With ε >= max_j ‖H_{F_j}‖₂ on the ball, ‖DF(w) − DF(w₀)‖₂ <= ‖·‖_F <= √(nk)·ε·R =: δ.
    ``"sharp"`` (Weyl for singular values): max(0, √λ₀ − δ)²; attained by F(w) = a·w + ε‖w‖²/2.
    ``"paper"`` (the paper's form, LZB §4.1): λ₀ − 2 L_F δ, with L_F >= ‖DF(w₀)‖₂ (needs
    ``lipschitz``). ``"weyl"`` (THEORY item 4 as written): λ₀ − 2 L_F δ − δ², the eigenvalue
    Weyl bound keeping the ΔΔᵀ term that is positive semi-definite and can be dropped. All are
    valid and sharp >= paper >= weyl (docs/theory.md); clipped at 0.
    """
    lambda0 = _real("lambda0", lambda0, minimum=0.0)
    eps = _real("hessian_norm", hessian_norm, minimum=0.0)
    radius = _real("radius", radius, minimum=0.0)
    nk = _int("n_outputs", n_outputs, minimum=1)
    form = _choice("form", form, ("sharp", "paper", "weyl"))  # type: ignore[assignment]
    if lipschitz is not None:
        lipschitz = _real("lipschitz", lipschitz, minimum=0.0)
    delta = math.sqrt(nk) * eps * radius
    if form == "sharp":  # (√λ₀ − δ)², expanded so that δ = 0 returns λ₀ exactly
        root = math.sqrt(lambda0)
        return 0.0 if delta >= root else max(0.0, lambda0 - delta * (2.0 * root - delta))
    if lipschitz is None:
        raise PlstarInputError(f"form={form!r} needs lipschitz (a bound on ‖DF(w₀)‖₂)")
    lip = _real("lipschitz", lipschitz, minimum=0.0)
    if lip < math.sqrt(lambda0) * (1.0 - 1e-9):
        raise PlstarInputError(
            f"lipschitz={lip} < √lambda0={math.sqrt(lambda0)}: a bound on ‖DF(w₀)‖₂ cannot be "
            "below its smallest singular value"
        )
    kept_square = delta**2 if form == "weyl" else 0.0
    return max(0.0, lambda0 - 2.0 * lip * delta - kept_square)


def uniform_conditioning_radius(
    lambda0: float, mu: float, hessian_norm: float, n_outputs: int
) -> float:
    """Largest R with the sharp item-4 bound still >= μ: (√λ₀ − √μ)/(√(nk)·ε) (THEORY item 4).

    ``math.inf`` if ε = 0 and μ <= λ₀ (K is constant); 0.0 if μ >= λ₀ (with ε > 0) or μ > λ₀.
    """
    lambda0 = _real("lambda0", lambda0, minimum=0.0)
    mu = _real("mu", mu, minimum=0.0)
    eps = _real("hessian_norm", hessian_norm, minimum=0.0)
    nk = _int("n_outputs", n_outputs, minimum=1)
    if mu > lambda0:
        return 0.0
    if eps == 0.0:
        return math.inf
    return max(0.0, (math.sqrt(lambda0) - math.sqrt(mu)) / (math.sqrt(nk) * eps))


# ----------------------------------------------------------------------------- item 5
def output_layer_kernel_bound(rho: float, lambda_min_inner: float) -> float:
    """λ_min(K_f) >= ρ²·λ_min(K_f̃) for f = φ(f̃) with |φ'| >= ρ (THEORY item 5; LZB §5.2).

    K_f = Λ K_f̃ Λ with Λ = diag(φ'(f̃)). A negative λ_min_inner (round-off) counts as 0.
    """
    rho = _real("rho", rho, minimum=0.0)
    return rho**2 * max(0.0, _real("lambda_min_inner", lambda_min_inner))


# ----------------------------------------------------------------------------- item 7
def pl_eps_steps_bound(beta: float, mu: float, loss0: float, eps: float) -> float:
    """Steps for GD (η = 1/β) to reach L <= ε under μ-PL*_ε: ⌈(β/μ) log(L₀/ε)⌉ (THEORY item 7).

    LZB §3 (PL*_ε) states T <= (β/μ) log(L₀/ε); as an integer first-passage time the correct
    bound is its ceiling (counterexample: L = βw²/2, L₀ = 1.5ε: T = 1 > log 1.5). The tighter
    ``steps_to_loss(L₀, ε, gd_rate(β, μ))`` never exceeds this. 0 if L₀ <= ε; inf if μ <= 0.
    """
    beta = _real("beta", beta, minimum=0.0, strict=True)
    mu = _real("mu", mu)
    loss0 = _real("loss0", loss0, minimum=0.0)
    eps = _real("eps", eps, minimum=0.0, strict=True)
    if loss0 <= eps:
        return 0.0
    if mu <= 0.0:
        return math.inf
    steps = beta / mu * (math.log(loss0) - math.log(eps))
    return float(math.ceil(steps)) if math.isfinite(steps) else math.inf


# ----------------------------------------------------------------------------- item 8
def solution_manifold_dimension(m: int, n_outputs: int) -> int:
    """Generic dimension m − nk of the solution set {w : F(w) = y} (THEORY item 8; LZB §2).

    Convention: 0 when m <= nk (for m < nk the solution set is generically empty; for m = nk it
    is generically a discrete set).
    """
    m = _int("m", m, minimum=0)
    nk = _int("n_outputs", n_outputs, minimum=1)
    return max(0, m - nk)


def is_overparameterized(m: int, n_outputs: int) -> bool:
    """m >= nk, necessary for PL* (THEORY item 8; LZB §2): rank K <= min(m, nk), so m < nk gives
    λ_min(K) ≡ 0. Not sufficient: K can still be singular."""
    m = _int("m", m, minimum=0)
    nk = _int("n_outputs", n_outputs, minimum=1)
    return m >= nk


# ----------------------------------------------------------------------------- item 9
def random_system_log_condition_bound(n: int, m: int) -> float:
    """Bound E log κ(AAᵀ) < 2 log(m/(m − n + 1)) + 5 for A ∈ ℝ^{n×m}, N(0,1) entries (item 9).

    LZB §4 via Chen & Dongarra (arXiv 0810.0800): E log κ₂(A) < log(m/(m − n + 1)) + 2.258, and
    κ(AAᵀ) = κ₂(A)², so the constant 2·2.258 = 4.516 < 5. Natural log. ``math.inf`` when m < n
    (AAᵀ is singular).
    """
    n = _int("n", n, minimum=1)
    m = _int("m", m, minimum=1)
    if m < n:
        return math.inf
    return 2.0 * math.log(m / (m - n + 1)) + 5.0


def gd_rate_for_step(step_size: float, beta: float, mu: float) -> float:
    """Per-step loss contraction of GD with any step η under β-smoothness and μ-PL* (item 2).

    Descent lemma: L_{t+1} ≤ L_t − η(1 − βη/2)‖∇L‖² ≤ (1 − 2μη + μβη²) L_t. Equals 1 − μ/β at
    η = 1/β (:func:`gd_rate`); 1 (no guarantee) for η ≥ 2/β or μ ≤ 0. Clipped to [0, 1].
    """
    if mu <= 0 or step_size * beta >= 2:
        return 1.0
    return min(1.0, max(0.0, 1.0 - 2 * mu * step_size + mu * beta * step_size**2))


def gd_radius_for_step(step_size: float, beta: float, mu: float, loss0: float) -> float:
    """Ball radius 2η√(2βL₀)/(1 − rate(η)) holding GD's path with step η ≤ 1/β (item 2).

    Steps are ‖η∇L_t‖ ≤ η√(2βL_t) and L_t ≤ rate^t L₀, so the path is ≤ η√(2βL₀)/(1 − √rate)
    ≤ 2η√(2βL₀)/(1 − rate). At η = 1/β it is the GD theorem's 2√(2βL₀)/μ. ∞ without a guarantee.
    """
    rate = gd_rate_for_step(step_size, beta, mu)
    if rate >= 1.0 or step_size * beta > 1.0 + 1e-12:
        return math.inf
    return 2 * step_size * math.sqrt(2 * beta * loss0) / (1.0 - rate)


def pl_eps_first_passage_bound(beta: float, mu: float, loss0: float, eps: float) -> float:
    """Bound on the first t with L_t < ε (strict) for GD at η = 1/β under μ-PL*_ε (THEORY item 7).

    docs/theory.md item 7: ⌈(β/μ) log(L₀/ε)⌉ (:func:`pl_eps_steps_bound`) bounds
    the first L_t ≤ ε; for "<" it is ⌊(β/μ) log(L₀/ε)⌋ + 1, one more only when the product is an
    integer. 0 if L₀ < ε; ∞ if μ ≤ 0 or β ≤ 0.
    """
    if loss0 < eps:
        return 0.0
    if mu <= 0 or beta <= 0:
        return math.inf
    ceiling = pl_eps_steps_bound(beta, mu, loss0, eps)
    exact = beta / mu * (math.log(loss0) - math.log(eps))
    return ceiling + 1.0 if ceiling == exact else ceiling


def pl_eps_constant(smallest_nonzero_eigenvalue: float, min_loss: float, eps: float) -> float:
    """μ_ε = λ⁺(1 − L*/ε): the PL*_ε constant of a model that cannot interpolate (THEORY item 7).

    For a linear model F(w) = Aw + b, split the residual r = r_∥ + r_⊥ along and across range(A):
    ‖r_⊥‖² = 2L* at every w, so ρ(w) = rᵀKr/‖r‖² ≥ λ⁺‖r_∥‖²/‖r‖² = λ⁺(1 − L*/L(w)), which is
    ≥ λ⁺(1 − L*/ε) wherever L ≥ ε; λ⁺ is the smallest non-zero eigenvalue of K = AAᵀ (that of
    AᵀA). For a non-linear model, with λ⁺ and L* measured, it is a prediction, not a theorem
    (docs/theory.md item 7). 0 when ε ≤ L*.
    """
    lam = _real("smallest_nonzero_eigenvalue", smallest_nonzero_eigenvalue, minimum=0.0)
    floor = _real("min_loss", min_loss, minimum=0.0)
    eps = _real("eps", eps, minimum=0.0, strict=True)
    return lam * max(0.0, 1.0 - floor / eps)
