"""Numerical confirmation of plstar.theory against independent float64 numpy oracles.

Each test is named after the claim it checks; THEORY.md item numbers are in the docstrings.
Derivations of every constant are in docs/theory.md.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from plstar import theory
from plstar.errors import PlstarInputError

TANH2_MAX = 4.0 / (3.0 * math.sqrt(3.0))  # max |tanh''|


# ----------------------------------------------------------------------------- oracles
class TanhSystem:
    """F(w) = A tanh(w): F: R^m -> R^{nk}, with analytic Jacobian and Hessians.

    DF = A diag(sech²w); H_{F_j} = diag(A_j ∘ tanh''(w)), so ‖H_{F_j}‖₂ <= max|A_jl|·TANH2_MAX,
    ‖DF‖₂ <= ‖A‖₂ and ‖D²F[u, v]‖ <= ‖A‖₂·TANH2_MAX·‖u‖‖v‖ everywhere.
    """

    def __init__(self, A: np.ndarray, y: np.ndarray) -> None:
        self.A, self.y = A, y

    def residual(self, w: np.ndarray) -> np.ndarray:
        return self.A @ np.tanh(w) - self.y

    def loss(self, w: np.ndarray) -> float:
        return 0.5 * float(self.residual(w) @ self.residual(w))

    def jacobian(self, w: np.ndarray) -> np.ndarray:
        return self.A * (1.0 - np.tanh(w) ** 2)

    def kernel(self, w: np.ndarray) -> np.ndarray:
        J = self.jacobian(w)
        return J @ J.T

    def grad(self, w: np.ndarray) -> np.ndarray:
        return self.jacobian(w).T @ self.residual(w)

    def loss_hessian(self, w: np.ndarray) -> np.ndarray:
        J, t = self.jacobian(w), np.tanh(w)
        d2 = -2.0 * t * (1.0 - t**2)  # tanh''
        return J.T @ J + np.diag((self.A.T @ self.residual(w)) * d2)

    @property
    def hessian_norm(self) -> float:
        return float(np.abs(self.A).max()) * TANH2_MAX


def _lam_min(K: np.ndarray) -> float:
    return float(np.linalg.eigvalsh(K)[0])


def _reduced_rows(A: np.ndarray) -> np.ndarray:
    """Rows of A in an orthonormal basis of its row space (n × n): SGD on F(w) = Aw moves only
    inside the row space, and losses, per-sample gradients and step lengths are all preserved."""
    _, _, Vt = np.linalg.svd(A, full_matrices=False)
    return A @ Vt.T


def _sgd_exact_expected_losses(
    A: np.ndarray, z0: np.ndarray, eta: float, b: int, steps: int, replace: bool
) -> np.ndarray:
    """Exact E L_t, t = 0..steps, of mini-batch SGD on L(z) = ½‖Az‖² (interpolation at 0).

    Update z ← (I − ηM)z, M = (n/b) Σ_{i∈batch} a_i a_iᵀ, so P = E[zzᵀ] obeys
    P ← P − η(HP + PH) + η² E[MPM] with H = AᵀA and, writing S = Σ_i (a_iᵀPa_i) a_i a_iᵀ,
    E[MPM] = (n/b) S + ((b−1)/b) HPH (with replacement) or
    (n/b)(1 − (b−1)/(n−1)) S + n(b−1)/(b(n−1)) HPH (without). E L = ½ tr(HP).
    """
    n = A.shape[0]
    H = A.T @ A
    P = np.outer(z0, z0)
    out = [0.5 * np.trace(H @ P)]
    if replace:
        c_s, c_h = n / b, (b - 1) / b
    else:
        c_s = (n / b) * (1.0 - (b - 1) / (n - 1)) if n > 1 else 0.0
        c_h = n * (b - 1) / (b * (n - 1)) if n > 1 else 1.0
    for _ in range(steps):
        S = A.T @ (np.einsum("ij,jk,ik->i", A, P, A)[:, None] * A)
        HPH = H @ P @ H
        P = P - eta * (H @ P + P @ H) + eta**2 * (c_s * S + c_h * HPH)
        P = 0.5 * (P + P.T)
        out.append(0.5 * np.trace(H @ P))
    return np.array(out)


def _sgd_monte_carlo(
    A: np.ndarray,
    z0: np.ndarray,
    eta: float,
    b: int,
    steps: int,
    replace: bool,
    runs: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated losses (runs × steps+1) and path lengths (runs,) of the same SGD."""
    n = A.shape[0]
    Z = np.tile(z0, (runs, 1))
    losses = [0.5 * np.sum((Z @ A.T) ** 2, axis=1)]
    path = np.zeros(runs)
    rows = np.arange(runs)[:, None]
    for _ in range(steps):
        if replace:
            idx = rng.integers(0, n, size=(runs, b))
        else:
            idx = np.argsort(rng.random((runs, n)), axis=1)[:, :b]
        res = (Z @ A.T)[rows, idx]  # (runs, b)
        g = (n / b) * np.einsum("rb,rbm->rm", res, A[idx])
        Z = Z - eta * g
        path += eta * np.linalg.norm(g, axis=1)
        losses.append(0.5 * np.sum((Z @ A.T) ** 2, axis=1))
    return np.array(losses).T, path


def _sgd_constants(A: np.ndarray) -> tuple[float, float, float]:
    """(β per sample, λ of the summed loss, μ) for F(w) = Aw: ‖a_i‖², λ_max(AᵀA), λ_min(AAᵀ)."""
    beta = float(np.max(np.sum(A**2, axis=1)))
    ev = np.linalg.eigvalsh(A @ A.T)
    return beta, float(ev[-1]), float(ev[0])


# ----------------------------------------------------------------------------- item 1
def test_pl_ratio_lies_between_kernel_extreme_eigenvalues() -> None:
    rng = np.random.default_rng(0)
    nk, m = 10, 40
    sys_ = TanhSystem(rng.normal(size=(nk, m)) / math.sqrt(m), rng.normal(size=nk))
    for _ in range(20):
        w = rng.normal(size=m)
        ev = np.linalg.eigvalsh(sys_.kernel(w))
        g, loss = sys_.grad(w), sys_.loss(w)
        rho = float(g @ g) / (2.0 * loss)
        assert theory.pl_constant(ev[0]) <= rho * (1 + 1e-12)
        assert rho <= ev[-1] * (1 + 1e-12)
        # ½‖∇L‖² = ½ rᵀKr exactly
        r = sys_.residual(w)
        assert 0.5 * g @ g == pytest.approx(0.5 * r @ sys_.kernel(w) @ r, rel=1e-12)
    assert theory.pl_constant(-1e-9) == 0.0
    assert theory.pl_constant(0.0) == 0.0
    assert theory.pl_constant(2.5) == 2.5


# ----------------------------------------------------------------------------- item 2
def test_gd_on_linear_least_squares_follows_rate_and_stays_in_radius() -> None:
    rng = np.random.default_rng(1)
    n, m = 8, 20
    A = rng.normal(size=(n, m))
    w0, y = rng.normal(size=m), rng.normal(size=n)
    beta = float(np.linalg.eigvalsh(A.T @ A)[-1])
    ev, U = np.linalg.eigh(A @ A.T)
    mu = float(ev[0])

    def loss(w: np.ndarray) -> float:
        return 0.5 * float(np.sum((A @ w - y) ** 2))

    eta, rate = theory.gd_step_size(beta), theory.gd_rate(beta, mu)
    radius = theory.gd_radius(beta, mu, loss(w0))
    assert eta == pytest.approx(1 / beta) and rate == pytest.approx(1 - mu / beta)
    w, path = w0.copy(), 0.0
    for t in range(1, 301):
        step = eta * A.T @ (A @ w - y)
        w, path = w - step, path + float(np.linalg.norm(step))
        assert loss(w) <= rate**t * loss(w0) * (1 + 1e-10) + 1e-300
        assert np.linalg.norm(w - w0) <= path * (1 + 1e-12) and path <= radius
    assert loss(w) < 1e-6 * loss(w0)  # the bound is not vacuous over 300 steps

    # residual along the slowest eigenvector of K: loss ratio is exactly (1 − μ/β)²
    y_slow = A @ w0 - 3.0 * U[:, 0]
    w = w0.copy()
    for _ in range(5):
        prev = 0.5 * float(np.sum((A @ w - y_slow) ** 2))
        w = w - eta * A.T @ (A @ w - y_slow)
        ratio = 0.5 * float(np.sum((A @ w - y_slow) ** 2)) / prev
        assert ratio == pytest.approx((1 - mu / beta) ** 2, rel=1e-12)


def test_steps_to_loss_is_smallest_integer() -> None:
    assert theory.steps_to_loss(1.0, 1.0, 0.5) == 0.0
    assert theory.steps_to_loss(0.5, 1.0, 1.0) == 0.0
    assert theory.steps_to_loss(2.0, 1.0, 1.0) == math.inf
    assert theory.steps_to_loss(2.0, 0.0, 0.5) == math.inf
    assert theory.steps_to_loss(2.0, 0.0, 0.0) == 1.0
    assert theory.steps_to_loss(2.0, 1.0, 0.0) == 1.0
    assert theory.steps_to_loss(1.0, 0.25, 0.5) == 2.0  # exact power: boundary included
    assert theory.steps_to_loss(1.0, 0.2499999, 0.5) == 3.0
    assert theory.steps_to_loss(1e300, 1e-300, 0.5) == float(math.ceil(600 * math.log2(10)))
    assert theory.pl_eps_steps_bound(1e10, 1e-300, 1e300, 1e-300) == math.inf  # overflow
    rate = 1 - 1e-9  # ~2.8e10 steps: found without iterating, and still minimal
    t = int(theory.steps_to_loss(1.0, 1e-12, rate))
    assert abs(t - math.log(1e-12) / math.log1p(rate - 1.0)) <= 1.0
    assert rate**t <= 1e-12 < rate ** (t - 1)


@settings(max_examples=300, deadline=None)
@given(
    loss0=st.floats(1e-200, 1e200),
    log_ratio=st.floats(-300.0, 0.0),
    rate=st.floats(1e-12, 1 - 1e-12),
)
def test_steps_to_loss_is_smallest_integer_property(
    loss0: float, log_ratio: float, rate: float
) -> None:
    target = loss0 * math.exp(log_ratio)
    assume(target > 0.0)
    t = theory.steps_to_loss(loss0, target, rate)
    assert t == int(t) and t >= 0
    t = int(t)
    assert rate**t * loss0 <= target
    assert t == 0 or rate ** (t - 1) * loss0 > target


# ----------------------------------------------------------------------------- item 3
def test_gd_model_form_rate_and_radius_hold_with_pl_constant_along_path() -> None:
    rng = np.random.default_rng(2)
    nk, m = 8, 60
    A = rng.normal(size=(nk, m)) / math.sqrt(m)
    sys_ = TanhSystem(A, rng.normal(size=nk))
    w0 = 0.3 * rng.normal(size=m)
    lip = float(np.linalg.norm(A, 2))  # ‖DF‖₂ <= ‖A‖₂ since sech² <= 1
    smooth = lip * TANH2_MAX  # ‖Σ r_j H_Fj‖ = max_l |(Aᵀr)_l tanh''| <= ‖A‖₂‖r‖ max|tanh''|
    r0 = float(np.linalg.norm(sys_.residual(w0)))
    eta = theory.model_form_step_size(lip, smooth, r0)
    assert eta == pytest.approx(1 / (lip**2 + smooth * r0))
    ws, w = [w0], w0.copy()
    for _ in range(400):
        w = w - eta * sys_.grad(w)
        ws.append(w)
    # PL* is used only at the iterates: the theorem's conclusions hold with μ = min there
    mu = min(_lam_min(sys_.kernel(v)) for v in ws)
    assert mu > 0
    rate, radius = theory.model_form_rate(eta, mu), theory.model_form_radius(lip, r0, mu)
    losses = [sys_.loss(v) for v in ws]
    for t, (v, loss) in enumerate(zip(ws, losses, strict=True)):
        assert loss <= rate**t * losses[0] * (1 + 1e-10) + 1e-300
        assert np.linalg.norm(v - w0) <= radius
    # monotone decrease (above the float64 round-off floor of the loss)
    assert all(b <= a for a, b in itertools.pairwise(losses) if a > 1e-20 * losses[0])
    assert rate**400 < 1e-3  # non-vacuous


# ----------------------------------------------------------------------------- item 4
def _ball_points(rng: np.random.Generator, w0: np.ndarray, radius: float, k: int) -> list:
    pts = []
    for i in range(k):
        d = rng.normal(size=w0.size)
        d /= np.linalg.norm(d)
        s = radius if i % 2 else radius * rng.random() ** (1 / w0.size)
        pts.append(w0 + s * d)
    # adversarial-ish: push every coordinate outward (sech² shrinks), and along ±sign(w0)
    for d in (np.sign(w0), -np.sign(w0), np.ones_like(w0)):
        pts.append(w0 + radius * d / np.linalg.norm(d))
    return pts


def test_kernel_bound_sharp_holds_and_is_tighter_than_paper() -> None:
    rng = np.random.default_rng(3)
    nk, m = 6, 50
    A = rng.normal(size=(nk, m)) / math.sqrt(m)
    sys_ = TanhSystem(A, np.zeros(nk))
    w0 = 0.5 * rng.normal(size=m)
    lam0, eps = _lam_min(sys_.kernel(w0)), sys_.hessian_norm
    lip = float(np.linalg.norm(A, 2))
    for radius in (
        theory.uniform_conditioning_radius(lam0, lam0 / 4, eps, nk),
        theory.uniform_conditioning_radius(lam0, 0.0, eps, nk),
        0.1,
    ):
        sharp = theory.kernel_lower_bound_on_ball(lam0, eps, radius, nk)
        paper, weyl = (
            theory.kernel_lower_bound_on_ball(lam0, eps, radius, nk, lipschitz=lip, form=form)
            for form in ("paper", "weyl")
        )
        assert sharp >= paper >= weyl
        delta = math.sqrt(nk) * eps * radius  # the closed forms, clipped at 0
        assert paper == pytest.approx(max(0.0, lam0 - 2 * lip * delta), rel=1e-12, abs=1e-15)
        assert weyl == pytest.approx(max(0.0, lam0 - 2 * lip * delta - delta**2), rel=1e-12,
                                     abs=1e-15)  # fmt: skip
        for w in _ball_points(rng, w0, radius, 60):
            dist = float(np.linalg.norm(w - w0))
            dJ = np.linalg.norm(sys_.jacobian(w) - sys_.jacobian(w0))
            assert dJ <= math.sqrt(nk) * eps * dist * (1 + 1e-12)
            exact = _lam_min(sys_.kernel(w))
            assert exact >= sharp * (1 - 1e-10) - 1e-14
    r1 = theory.uniform_conditioning_radius(lam0, lam0 / 4, eps, nk)
    assert theory.kernel_lower_bound_on_ball(lam0, eps, r1, nk) == pytest.approx(lam0 / 4)
    # sharp >= paper >= weyl on a whole grid of radii, including where sharp has hit 0
    for radius in np.linspace(0, 3 * r1, 31):
        sharp = theory.kernel_lower_bound_on_ball(lam0, eps, float(radius), nk)
        paper, weyl = (
            theory.kernel_lower_bound_on_ball(
                lam0, eps, float(radius), nk, lipschitz=lip, form=form
            )
            for form in ("paper", "weyl")
        )
        assert sharp >= paper >= weyl


def test_kernel_bound_sharp_is_attained_by_quadratic_model() -> None:
    """F(w) = aᵀw + ε‖w‖²/2 (nk = 1, H_F = εI): at w = −R a/‖a‖, K = (‖a‖ − εR)² exactly."""
    rng = np.random.default_rng(4)
    a, eps = rng.normal(size=7), 0.3
    lam0 = float(a @ a)
    for radius in (0.0, 0.5, 2.0, 0.99 * math.sqrt(lam0) / eps):
        w = -radius * a / np.linalg.norm(a)
        grad = a + eps * w
        exact = float(grad @ grad)
        sharp = theory.kernel_lower_bound_on_ball(lam0, eps, radius, 1)
        assert exact == pytest.approx(sharp, rel=1e-12, abs=1e-14)
        for form in ("paper", "weyl"):
            bound = theory.kernel_lower_bound_on_ball(
                lam0, eps, radius, 1, lipschitz=math.sqrt(lam0), form=form
            )
            assert bound <= sharp and (radius == 0 or bound < sharp)
    # the uniform-conditioning radius cannot be enlarged for this model
    mu = lam0 / 9
    r = theory.uniform_conditioning_radius(lam0, mu, eps, 1)
    grad = a * (1 - eps * r / math.sqrt(lam0))
    assert float(grad @ grad) == pytest.approx(mu, rel=1e-12)


def test_uniform_conditioning_radius_edge_cases() -> None:
    assert theory.uniform_conditioning_radius(4.0, 1.0, 0.0, 3) == math.inf
    assert theory.uniform_conditioning_radius(4.0, 4.0, 0.0, 3) == math.inf
    assert theory.uniform_conditioning_radius(4.0, 4.0, 0.1, 3) == 0.0
    assert theory.uniform_conditioning_radius(4.0, 5.0, 0.0, 3) == 0.0
    assert theory.uniform_conditioning_radius(4.0, 1.0, 0.5, 4) == pytest.approx(1.0)
    assert theory.kernel_lower_bound_on_ball(4.0, 1.0, 10.0, 4) == 0.0


# ----------------------------------------------------------------------------- item 5
def test_output_layer_kernel_bound() -> None:
    rng = np.random.default_rng(5)
    nk, m, rho = 6, 20, 0.3
    J = rng.normal(size=(nk, m))
    K_inner = J @ J.T
    lam_inner = _lam_min(K_inner)
    bound = theory.output_layer_kernel_bound(rho, lam_inner)
    assert bound == pytest.approx(rho**2 * lam_inner)
    for _ in range(50):
        d = rho + rng.exponential(size=nk)  # |φ'| >= ρ, either sign
        Lam = np.diag(d * rng.choice([-1.0, 1.0], size=nk))
        assert _lam_min(Lam @ K_inner @ Lam) >= bound * (1 - 1e-12)
    assert _lam_min(rho * K_inner * rho) == pytest.approx(bound, rel=1e-10)  # equality at Λ = ρI
    assert theory.output_layer_kernel_bound(rho, -1e-12) == 0.0

    # K_f = Λ K_f̃ Λ for f = φ(f̃), φ = softplus (φ' = sigmoid), checked by finite differences
    sys_ = TanhSystem(rng.normal(size=(nk, m)) / math.sqrt(m), np.zeros(nk))
    w = rng.normal(size=m)
    f_inner = sys_.residual(w)
    Lam = np.diag(1 / (1 + np.exp(-f_inner)))

    def f_outer(v: np.ndarray) -> np.ndarray:
        return np.logaddexp(0.0, sys_.residual(v))

    h = 1e-6
    J_fd = np.stack(
        [(f_outer(w + h * e) - f_outer(w - h * e)) / (2 * h) for e in np.eye(m)], axis=1
    )
    np.testing.assert_allclose(J_fd @ J_fd.T, Lam @ sys_.kernel(w) @ Lam, rtol=1e-7, atol=1e-9)


# ----------------------------------------------------------------------------- item 6
def _random_sgd_problem(seed: int, n: int = 10, m: int = 200) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    A = _reduced_rows(rng.normal(size=(n, m)) * rng.uniform(0.5, 1.5, size=(n, 1)))
    return A, rng.normal(size=n)


@pytest.mark.parametrize("replace", [True, False])
def test_sgd_rate_confirmed_empirically(replace: bool) -> None:
    """Exact E L_t (second-moment recursion) and a Monte Carlo mean both stay below
    (1 − μη*(b))^t L₀, the rate derived for the summed loss; the Monte Carlo run also confirms
    the recursion."""
    A, z0 = _random_sgd_problem(6)
    n = A.shape[0]
    beta, lam, mu = _sgd_constants(A)
    rng = np.random.default_rng(7)
    for b in (1, 3, n):
        kw = dict(per_sample_smoothness=beta, loss_smoothness=lam, pl_constant=mu, n_samples=n)
        eta = theory.sgd_step_size(batch_size=b, **kw)
        rate = theory.sgd_rate(batch_size=b, **kw)
        assert rate == pytest.approx(1 - mu * eta)
        steps = math.ceil(math.log(1e-2) / math.log(rate))  # predicted decay: 100×
        exact = _sgd_exact_expected_losses(A, z0, eta, b, steps, replace)
        bound = rate ** np.arange(steps + 1) * exact[0]
        assert np.all(exact <= bound * (1 + 1e-10))
        losses, _ = _sgd_monte_carlo(A, z0, eta, b, steps, replace, 3000, rng)
        mean = losses.mean(axis=0)
        se = losses.std(axis=0, ddof=1) / math.sqrt(losses.shape[0])
        for t in (steps // 4, steps // 2, steps):
            assert abs(mean[t] - exact[t]) <= 5 * se[t] + 1e-12 * exact[0]
            # on a log scale: empirical decay per step at least the derived rate
            assert math.log((mean[t] + 5 * se[t]) / mean[0]) / t <= math.log(rate)


@pytest.mark.parametrize("b", [1, 2, 5, 16])
def test_sgd_rate_is_attained_on_orthogonal_equal_norm_rows(b: int) -> None:
    """A = √β·I (equal-norm orthogonal rows, μ = λ = β): with-replacement SGD at η*(b) has
    E L_t = (1 − μη*(b))^t L₀ exactly, and η*(b) minimizes the one-step expected loss. A
    conversion error between averaged and summed loss (a factor n in η or μ) breaks both."""
    n, beta = 16, 2.5
    A = math.sqrt(beta) * np.eye(n)
    z0 = np.random.default_rng(8).normal(size=n)
    kw = dict(per_sample_smoothness=beta, loss_smoothness=beta, pl_constant=beta, n_samples=n)
    eta = theory.sgd_step_size(batch_size=b, **kw)
    rate = theory.sgd_rate(batch_size=b, **kw)
    assert eta == pytest.approx(b / (beta * (n + b - 1)))
    exact = _sgd_exact_expected_losses(A, z0, eta, b, 40, replace=True)
    np.testing.assert_allclose(exact, rate ** np.arange(41) * exact[0], rtol=1e-11)
    one_step = _sgd_exact_expected_losses(A, z0, eta, b, 1, True)[1]
    for f in (0.9, 0.99, 1.01, 1.1):
        assert _sgd_exact_expected_losses(A, z0, f * eta, b, 1, True)[1] > one_step
    if b > 1:  # without replacement: smaller variance, bound still holds
        wor = _sgd_exact_expected_losses(A, z0, eta, b, 40, replace=False)
        assert np.all(wor <= exact * (1 + 1e-12))


def test_sgd_step_matches_averaged_loss_form_after_conversion() -> None:
    """BBM state η̄*(b) = bα/(λ̄(2β + α(b − 1))), rate 1 − αη̄/2 for L̄ = L/n, λ̄ = λ/n and
    α-PL in the form ‖∇L̄‖² >= αL̄ (α = 2μ/n); the summed-loss step is η = η̄/n."""
    beta, lam, mu, n = 3.0, 17.0, 0.7, 40
    for b in (1, 7, 40, 1000):
        alpha, lam_bar = 2 * mu / n, lam / n
        eta_bar = b * alpha / (lam_bar * (2 * beta + alpha * (b - 1)))
        kw = dict(
            per_sample_smoothness=beta,
            loss_smoothness=lam,
            pl_constant=mu,
            n_samples=n,
            batch_size=b,
        )
        assert theory.sgd_step_size(**kw) == pytest.approx(eta_bar / n, rel=1e-13)
        assert theory.sgd_rate(**kw) == pytest.approx(1 - alpha * eta_bar / 2, rel=1e-13)
        # the general-step rate is minimized at η*(b), where it equals 1 − μη*(b)
        eta = theory.sgd_step_size(**kw)
        grid = eta * np.linspace(0.5, 1.5, 101)
        rates = [theory.sgd_rate(**kw, step_size=float(e)) for e in grid]
        assert int(np.argmin(rates)) == 50
        assert theory.sgd_rate(**kw, step_size=eta) == pytest.approx(theory.sgd_rate(**kw))
        assert theory.sgd_rate(**kw, step_size=2.001 * eta) == 1.0  # beyond 2η*: no guarantee


def test_sgd_step_size_scales_linearly_then_saturates() -> None:
    beta, lam, mu, n = 4.0, 30.0, 0.5, 50
    kw = dict(per_sample_smoothness=beta, loss_smoothness=lam, pl_constant=mu, n_samples=n)
    b_star = theory.sgd_saturation_batch_size(
        per_sample_smoothness=beta, pl_constant=mu, n_samples=n
    )
    assert b_star == pytest.approx(1 + n * beta / mu) and b_star > n
    eta1 = theory.sgd_step_size(batch_size=1, **kw)
    assert theory.sgd_step_size(batch_size=4, **kw) == pytest.approx(4 * eta1, rel=0.01)
    assert theory.sgd_step_size(batch_size=int(b_star), **kw) == pytest.approx(b_star * eta1 / 2)
    assert theory.sgd_step_size(batch_size=10**9, **kw) == pytest.approx(1 / lam, rel=1e-6)
    # b -> infinity recovers the GD rate 1 − μ/λ
    assert theory.sgd_rate(batch_size=10**9, **kw) == pytest.approx(
        theory.gd_rate(lam, mu), rel=1e-6
    )


def test_sgd_radius_bounds_path_length() -> None:
    """Sharp radius 2√(2nβL₀)/(μδ): on A = √β·I with z₀ ∝ 1 and b = 1, each step zeroes one
    coordinate, so the path tends to ‖z₀‖₁ = half the expected-path bound 2√(2nβL₀)/μ; THEORY's
    2n√(2βL₀)/(μδ) is valid but √n larger."""
    n, beta = 25, 2.0
    A, z0 = math.sqrt(beta) * np.eye(n), np.ones(n)
    L0 = 0.5 * beta * n
    eta = theory.sgd_step_size(
        per_sample_smoothness=beta,
        loss_smoothness=beta,
        pl_constant=beta,
        n_samples=n,
        batch_size=1,
    )
    rng = np.random.default_rng(9)
    _, path = _sgd_monte_carlo(A, z0, eta, 1, 400, True, 200, rng)
    kw = dict(per_sample_smoothness=beta, pl_constant=beta, loss0=L0, n_samples=n)
    expected_bound = theory.sgd_radius(failure_probability=1.0, **kw)
    assert path.mean() <= expected_bound
    assert path.mean() >= 0.49 * expected_bound  # the sharp constant is within a factor 2
    paper = theory.sgd_radius(failure_probability=1.0, form="paper", **kw)
    assert paper == pytest.approx(math.sqrt(n) * expected_bound)

    # random problem: P(path > R(δ)) <= δ
    A, z0 = _random_sgd_problem(10)
    beta_i, lam, mu = _sgd_constants(A)
    n = A.shape[0]
    L0 = 0.5 * float(np.sum((A @ z0) ** 2))
    for b in (1, 4):
        eta = theory.sgd_step_size(
            per_sample_smoothness=beta_i,
            loss_smoothness=lam,
            pl_constant=mu,
            n_samples=n,
            batch_size=b,
        )
        _, path = _sgd_monte_carlo(A, z0, eta, b, 600, True, 500, rng)
        kw = dict(per_sample_smoothness=beta_i, pl_constant=mu, loss0=L0, n_samples=n)
        assert path.mean() <= theory.sgd_radius(failure_probability=1.0, **kw)
        for delta in (0.5, 0.1):
            radius = theory.sgd_radius(failure_probability=delta, **kw)
            assert np.mean(path > radius) <= delta


# ----------------------------------------------------------------------------- item 7
def test_pl_eps_first_passage_within_bound() -> None:
    """Under-parameterized least squares (m < n, y ∉ range A): L* > 0, so no PL*, but for
    ε > L* it is μ_ε-PL*_ε with μ_ε = σ_min(A)²(1 − L*/ε)."""
    rng = np.random.default_rng(11)
    n, m = 30, 10
    A = rng.normal(size=(n, m))
    y = A @ rng.normal(size=m) + 0.3 * rng.normal(size=n)
    w_star = np.linalg.lstsq(A, y, rcond=None)[0]
    L_star = 0.5 * float(np.sum((A @ w_star - y) ** 2))
    sv = np.linalg.svd(A, compute_uv=False)
    beta = float(sv[0] ** 2)
    w0 = np.zeros(m)
    L0 = 0.5 * float(y @ y)
    for eps in (1.5 * L_star, 10 * L_star):
        mu_eps = theory.pl_eps_constant(float(sv[-1] ** 2), L_star, eps)
        assert mu_eps == pytest.approx(float(sv[-1] ** 2) * (1 - L_star / eps), rel=1e-15)
        bound = theory.pl_eps_steps_bound(beta, mu_eps, L0, eps)
        tight = theory.steps_to_loss(L0, eps, theory.gd_rate(beta, mu_eps))
        radius = theory.gd_radius(beta, mu_eps, L0)
        assert tight <= bound
        w, t = w0.copy(), 0
        while True:
            g = A.T @ (A @ w - y)
            loss = 0.5 * float(np.sum((A @ w - y) ** 2))
            assert np.linalg.norm(w - w0) <= radius
            if loss <= eps:
                break
            assert 0.5 * g @ g >= mu_eps * loss * (1 - 1e-12)  # PL*_ε holds where L >= ε
            w, t = w - g / beta, t + 1
        assert t <= tight <= bound
    assert theory.pl_eps_steps_bound(1.0, 0.5, 1.0, 2.0) == 0.0
    assert theory.pl_eps_steps_bound(1.0, 0.0, 3.0, 2.0) == math.inf


def test_pl_eps_unrounded_bound_fails_but_ceiling_holds() -> None:
    """L(w) = βw²/2: μ = β, GD with η = 1/β solves in one step. With L₀ = 1.5ε the first
    passage is T = 1 > (β/μ) log(L₀/ε) = log 1.5: THEORY's real-valued bound needs a ceiling."""
    beta, eps = 2.0, 1.0
    w0 = math.sqrt(2 * 1.5 * eps / beta)
    L0 = 0.5 * beta * w0**2
    w1 = w0 - beta * w0 / beta
    assert 0.5 * beta * w1**2 <= eps < L0  # T = 1
    assert (beta / beta) * math.log(L0 / eps) < 1
    assert theory.pl_eps_steps_bound(beta, beta, L0, eps) == 1.0


# ----------------------------------------------------------------------------- item 8
def test_loss_hessian_is_indefinite_arbitrarily_close_to_minimizers() -> None:
    rng = np.random.default_rng(12)
    nk, m = 4, 10
    A = rng.normal(size=(nk, m))
    w_star = rng.normal(size=m)
    sys_ = TanhSystem(A, A @ np.tanh(w_star))
    # analytic H_L agrees with finite differences of the gradient
    w = w_star + 0.3 * rng.normal(size=m)
    h = 1e-6
    H_fd = np.stack([(sys_.grad(w + h * e) - sys_.grad(w - h * e)) / (2 * h) for e in np.eye(m)])
    np.testing.assert_allclose(H_fd, sys_.loss_hessian(w), rtol=1e-6, atol=1e-7)
    # at the minimizer: H_L = DFᵀDF, PSD of rank nk; tangent space has dimension m − nk
    H = sys_.loss_hessian(w_star)
    ev = np.linalg.eigvalsh(H)
    assert ev[0] >= -1e-12 * ev[-1]
    assert int(np.sum(ev > 1e-10 * ev[-1])) == nk
    _, _, Vt = np.linalg.svd(sys_.jacobian(w_star))
    null = Vt[nk:]
    assert null.shape[0] == theory.solution_manifold_dimension(m, nk) == m - nk
    r1 = np.linalg.norm(sys_.residual(w_star + 1e-3 * null[0]))
    r2 = np.linalg.norm(sys_.residual(w_star + 1e-4 * null[0]))
    assert r1 / r2 > 50  # residual is O(t²) along the tangent: a manifold of solutions
    # off the manifold, at distances -> 0, H_L has a negative eigenvalue
    v = Vt[0]
    for t in (1e-1, 1e-2, 1e-3, 1e-4):
        lo = min(np.linalg.eigvalsh(sys_.loss_hessian(w_star + s_ * t * v))[0] for s_ in (1, -1))
        assert lo < -1e-3 * t


def test_underparameterized_kernel_is_singular() -> None:
    rng = np.random.default_rng(13)
    for m, nk in ((5, 8), (8, 8), (20, 8)):
        J = rng.normal(size=(nk, m))
        ev = np.linalg.eigvalsh(J @ J.T)
        assert theory.is_overparameterized(m, nk) == (m >= nk)
        if m < nk:
            assert ev[0] <= 1e-12 * ev[-1]
            assert theory.solution_manifold_dimension(m, nk) == 0
        else:
            assert ev[0] > 1e-8 * ev[-1]


# ----------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("n, m", [(20, 20), (20, 30), (40, 80), (10, 200)])
def test_random_system_condition_bound_monte_carlo(n: int, m: int) -> None:
    rng = np.random.default_rng(14 + n + m)
    logs = []
    for _ in range(50):
        s = np.linalg.svd(rng.normal(size=(n, m)), compute_uv=False)
        logs.append(2.0 * math.log(s[0] / s[-1]))  # log κ(AAᵀ) = 2 log κ(A)
    mean, se = float(np.mean(logs)), float(np.std(logs, ddof=1)) / math.sqrt(50)
    bound = theory.random_system_log_condition_bound(n, m)
    assert bound == pytest.approx(2 * math.log(m / (m - n + 1)) + 5)
    assert mean + 3 * se < bound
    assert mean + 3 * se < bound - 5 + 2 * 2.258  # Chen–Dongarra's constant also holds
    assert theory.random_system_log_condition_bound(5, 4) == math.inf


# ----------------------------------------------------------------------------- edges
def test_gd_edge_cases() -> None:
    assert theory.gd_radius(1.0, 0.0, 1.0) == math.inf
    assert theory.gd_radius(1.0, -1.0, 1.0) == math.inf
    assert theory.gd_radius(2.0, 1.0, 1.0) == pytest.approx(4.0)
    assert theory.gd_step_size(0.0) == math.inf
    assert theory.gd_rate(1.0, 0.0) == 1.0
    assert theory.gd_rate(1.0, 2.0) == 0.0
    assert theory.model_form_rate(0.1, 0.0) == 1.0
    assert theory.model_form_rate(10.0, 1.0) == 0.0
    assert theory.model_form_step_size(0.0, 0.0, 1.0) == math.inf
    assert theory.model_form_radius(1.0, 1.0, 0.0) == math.inf
    assert theory.solution_manifold_dimension(3, 5) == 0
    assert theory.solution_manifold_dimension(5, 5) == 0
    kw = dict(per_sample_smoothness=1.0, loss_smoothness=1.0, pl_constant=0.0, n_samples=3)
    assert theory.sgd_step_size(batch_size=1, **kw) == 0.0
    assert theory.sgd_rate(batch_size=1, **kw) == 1.0


@pytest.mark.parametrize(
    "call",
    [
        lambda: theory.pl_constant(float("nan")),
        lambda: theory.gd_radius(-1.0, 1.0, 1.0),
        lambda: theory.gd_radius(1.0, 1.0, -1.0),
        lambda: theory.gd_radius(float("inf"), 1.0, 1.0),
        lambda: theory.gd_step_size(-1.0),
        lambda: theory.gd_rate("1", 1.0),
        lambda: theory.gd_rate(True, 1.0),
        lambda: theory.steps_to_loss(1.0, -1.0, 0.5),
        lambda: theory.steps_to_loss(1.0, 0.5, -0.1),
        lambda: theory.model_form_step_size(1.0, -1.0, 1.0),
        lambda: theory.model_form_radius(1.0, float("nan"), 1.0),
        lambda: theory.kernel_lower_bound_on_ball(1.0, 1.0, 1.0, 0),
        lambda: theory.kernel_lower_bound_on_ball(1.0, 1.0, 1.0, 2.5),
        lambda: theory.kernel_lower_bound_on_ball(1.0, -1.0, 1.0, 2),
        lambda: theory.kernel_lower_bound_on_ball(1.0, 1.0, 1.0, 2, form="paper"),
        lambda: theory.kernel_lower_bound_on_ball(1.0, 1.0, 1.0, 2, form="weyl"),
        lambda: theory.kernel_lower_bound_on_ball(4.0, 1.0, 1.0, 2, lipschitz=1.0, form="paper"),
        lambda: theory.kernel_lower_bound_on_ball(1.0, 1.0, 1.0, 2, form="loose"),
        lambda: theory.uniform_conditioning_radius(1.0, -0.5, 1.0, 2),
        lambda: theory.output_layer_kernel_bound(-0.1, 1.0),
        lambda: theory.sgd_step_size(
            per_sample_smoothness=0.0,
            loss_smoothness=1.0,
            pl_constant=1.0,
            n_samples=2,
            batch_size=1,
        ),
        lambda: theory.sgd_step_size(
            per_sample_smoothness=1.0,
            loss_smoothness=1.0,
            pl_constant=1.0,
            n_samples=2,
            batch_size=0,
        ),
        lambda: theory.sgd_rate(
            per_sample_smoothness=1.0,
            loss_smoothness=1.0,
            pl_constant=1.0,
            n_samples=0,
            batch_size=1,
        ),
        lambda: theory.sgd_radius(
            per_sample_smoothness=1.0,
            pl_constant=1.0,
            loss0=1.0,
            n_samples=2,
            failure_probability=0.0,
        ),
        lambda: theory.sgd_radius(
            per_sample_smoothness=1.0,
            pl_constant=1.0,
            loss0=1.0,
            n_samples=2,
            failure_probability=1.5,
        ),
        lambda: theory.sgd_saturation_batch_size(
            per_sample_smoothness=-1.0, pl_constant=1.0, n_samples=2
        ),
        lambda: theory.pl_eps_steps_bound(1.0, 1.0, 1.0, 0.0),
        lambda: theory.solution_manifold_dimension(-1, 2),
        lambda: theory.is_overparameterized(3, 0),
        lambda: theory.random_system_log_condition_bound(0, 3),
    ],
)
def test_invalid_input_is_refused_with_plstar_input_error(call) -> None:
    with pytest.raises(PlstarInputError):
        call()


def test_plstar_input_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="beta"):
        theory.gd_step_size(-2.0)


def test_pl_eps_constant_bounds_the_pl_ratio_of_a_linear_model_everywhere_above_eps() -> None:
    """ρ(w) = rᵀKr/‖r‖² ≥ λ⁺(1 − L*/L(w)) at random w of an under-parameterized linear model."""
    rng = np.random.default_rng(5)
    A, y = rng.normal(size=(20, 6)), rng.normal(size=20)
    w_star = np.linalg.lstsq(A, y, rcond=None)[0]
    L_star = 0.5 * float(np.sum((A @ w_star - y) ** 2))
    lam_plus = float(np.linalg.svd(A, compute_uv=False)[-1] ** 2)
    for _ in range(50):
        r = A @ (w_star + rng.normal(size=6) * rng.uniform(0.01, 3)) - y
        loss, rho = 0.5 * float(r @ r), float(r @ (A @ A.T) @ r) / float(r @ r)
        assert rho >= theory.pl_eps_constant(lam_plus, L_star, loss) * (1 - 1e-12)
    assert theory.pl_eps_constant(2.0, 1.0, 4.0) == 1.5
    assert theory.pl_eps_constant(2.0, 1.0, 0.5) == 0.0  # ε below the minimum: no constant
    with pytest.raises(PlstarInputError):
        theory.pl_eps_constant(2.0, 1.0, 0.0)
