"""plstar.certify against closed forms (linear models) and dense float64 oracles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import dense_kernel, flat_params
from torch import Tensor, nn

from plstar.certify import certify, lambda_min_descent, per_sample_smoothness
from plstar.errors import PlstarInputError
from plstar.models import mlp

DEFAULT_DTYPE = torch.float64


def tanh_problem(n: int = 6, width: int = 16, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randn(n, 1, generator=g)
    return mlp(3, width, 2, 1, generator_seed=seed, dtype=torch.float64), x, y


def test_certificate_mu_equals_lambda_min_of_gram_for_linear_model() -> None:
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(20, 1, bias=False)
    x, y = torch.randn(6, 20, generator=g), torch.randn(6, 1, generator=g)
    gram = (x @ x.T).numpy()
    mu, beta = np.linalg.eigvalsh(gram)[[0, -1]]
    loss0 = 0.5 * float(((model(x) - y) ** 2).sum().detach())
    cert = certify(model, x, y, samples=2, shells=(0.5, 1.0), hessian_outputs=2)
    assert cert.mu == pytest.approx(mu, rel=1e-10) and cert.lambda0 == cert.mu
    assert cert.radius == pytest.approx(2 * math.sqrt(2 * beta * loss0) / mu, rel=1e-6)
    assert cert.sampled_points == 2 * (2 + 1)  # 2 random directions + the gradient one; 2 shells
    # K = XXᵀ everywhere: every point has the same λ_min, none violates, ‖H_F‖ = 0.
    for point in cert.points:
        assert point.lambda_min == pytest.approx(mu, rel=1e-9)
        assert not point.violates
    assert cert.violations == 0 and cert.hessian_norm < 1e-12
    assert cert.kernel_bound == pytest.approx(mu, rel=1e-12)
    assert cert.hessian_control_implies_conditioning
    assert any("Evidence, not proof" in line for line in cert.verdict)


def test_points_lie_on_their_shells_satisfy_the_ratio_identity_and_w0_is_restored() -> None:
    model, x, y = tanh_problem()
    w0 = flat_params(model)
    cert = certify(model, x, y, radius=0.7, samples=2, shells=(0.5, 1.0), hessian_outputs=1)
    assert torch.equal(flat_params(model), w0)
    assert cert.radius_source == "given" and cert.radius == 0.7
    directions = {p.direction for p in cert.points}
    assert {"w0", "gradient", "lambda_min descent", "random 1", "random 2"} == directions
    for point in cert.points:
        assert point.distance == pytest.approx(point.fraction * 0.7, rel=1e-15)
        # λ_min(K) ≤ ρ ≤ λ_max(K) at every point, the identity ½‖∇L‖² = ½ rᵀKr.
        assert point.lambda_min - point.lambda_min_error <= point.pl_ratio
        assert point.pl_ratio <= point.lambda_max * (1 + 1e-10)
    assert cert.worst.lambda_min == min(p.lambda_min for p in cert.points)
    assert cert.hessian_norm == max(p.hessian_norm for p in cert.points)


def test_violations_count_the_points_below_the_given_mu() -> None:
    model, x, y = tanh_problem(seed=1)
    lambda0 = float(torch.linalg.eigvalsh(dense_kernel(model, x))[0])
    strict = certify(model, x, y, radius=1e-6, mu=2 * lambda0, samples=1, hessian_outputs=1)
    assert strict.violations == len(strict.points)  # λ_min ≈ λ₀ < 2λ₀ everywhere near w₀
    assert any("fails on this ball" in line for line in strict.verdict)
    assert not strict.hessian_control_implies_conditioning
    loose = certify(model, x, y, radius=1e-6, mu=lambda0 / 2, samples=1, hessian_outputs=1)
    assert loose.violations == 0
    # ε·R is tiny, so item 4's bound is ≈ λ₀ ≥ μ: Hessian control alone implies it.
    assert loose.hessian_control_implies_conditioning
    assert loose.kernel_bound == pytest.approx(lambda0, rel=1e-3)


def test_lambda_min_descent_is_the_normalized_negative_gradient_of_lambda_min() -> None:
    model, x, _ = tanh_problem(n=3, width=4, seed=2)
    w0 = flat_params(model)

    def lambda_min_at(w: Tensor) -> float:
        torch.nn.utils.vector_to_parameters(w, model.parameters())
        return float(torch.linalg.eigvalsh(dense_kernel(model, x))[0])

    h = 1e-6
    fd = torch.stack([
        torch.tensor((lambda_min_at(w0 + h * e) - lambda_min_at(w0 - h * e)) / (2 * h))
        for e in torch.eye(len(w0))
    ])  # fmt: skip
    torch.nn.utils.vector_to_parameters(w0, model.parameters())
    direction = lambda_min_descent(model, x)
    assert direction is not None
    assert torch.allclose(direction, -fd / fd.norm(), atol=1e-6)


def test_per_sample_smoothness_bounds_each_sample_loss_hessian() -> None:
    model, x, y = tanh_problem(n=4, width=5, seed=3)
    from conftest import as_function_of_flat
    from torch.func import hessian

    forward = as_function_of_flat(model, x)
    w = flat_params(model)
    exact = max(
        float(
            torch.linalg.eigvalsh(
                hessian(lambda v, i=i: 0.5 * ((forward(v)[i] - y[i]) ** 2).sum())(w)
            )[-1]
        )
        for i in range(4)
    )
    # With ‖H_F‖ over all outputs the estimate is a bound at w₀: GN block + ‖r_i‖₁·‖H_F‖.
    estimate = per_sample_smoothness(model, x, y, hessian_outputs=None)
    assert exact <= estimate * (1 + 1e-9)
    jac = torch.func.jacrev(forward)(w).reshape(4, -1)
    hf = max(
        float(torch.linalg.matrix_norm(hessian(lambda v, i=i: forward(v)[i, 0])(w), ord=2))
        for i in range(4)
    )
    residual = (forward(w) - y).abs().reshape(-1)
    oracle = float(((jac**2).sum(dim=1) + residual * hf).max())
    assert estimate == pytest.approx(oracle, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [{"samples": -1}, {"shells": (0.0,)}, {"shells": (1.5,)}, {"radius": -1.0}, {"mu": 0.0}],
)
def test_certify_refuses_bad_arguments(kwargs: dict) -> None:
    model, x, y = tanh_problem(n=3, width=4)
    with pytest.raises(PlstarInputError):
        certify(model, x, y, **kwargs)
