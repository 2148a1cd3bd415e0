"""β and ‖H_F‖ against exact Hessians of tiny models; Hessian products against finite differences."""

from __future__ import annotations

import pytest
import torch
from conftest import ZOO, as_function_of_flat, dense_kernel, flat_params
from torch import nn
from torch.func import hessian

import plstar
from plstar.curvature import loss_hvp

DEFAULT_DTYPE = torch.float64


def tiny(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = ZOO[name](torch.Generator().manual_seed(2))
    return model.double().eval(), x


TINY = ["mlp-tanh-k1", "mlp-gelu-k3", "cnn-k3", "shared-weights-k2", "embedding-k2"]


@pytest.mark.parametrize("name", TINY)
def test_sharpness_is_top_eigenvalue_of_exact_loss_hessian(name: str) -> None:
    model, x = tiny(name)
    F = as_function_of_flat(model, x)
    y = torch.randn_like(F(flat_params(model)))
    exact = hessian(lambda w: 0.5 * ((F(w) - y) ** 2).sum())(flat_params(model))
    top = float(torch.linalg.eigvalsh(exact)[-1])
    beta = plstar.loss_sharpness(model, x, y, tol=1e-10, max_iter=200)
    assert beta.value == pytest.approx(top, rel=1e-8)
    assert beta.value <= top * (1 + 1e-12)
    assert abs(beta.value - top) <= beta.error_bound + 1e-12 * top


@pytest.mark.parametrize("name", TINY)
def test_model_hessian_norm_is_largest_spectral_norm_over_outputs(name: str) -> None:
    model, x = tiny(name)
    F = as_function_of_flat(model, x)
    per_output = hessian(lambda w: F(w).reshape(-1))(flat_params(model))
    norms = torch.linalg.matrix_norm(per_output, ord=2)
    result = plstar.model_hessian_norm(model, x, tol=1e-10, max_iter=200)
    assert result.value == pytest.approx(float(norms.max()), rel=1e-8)
    assert float(norms[result.argmax_output]) == pytest.approx(float(norms.max()), rel=1e-8)
    assert result.outputs_examined == result.outputs_total == norms.numel()
    subset = plstar.model_hessian_norm(model, x, outputs=[0, 2], tol=1e-10, max_iter=200)
    assert subset.value == pytest.approx(float(norms[[0, 2]].max()), rel=1e-8)
    assert subset.outputs_examined == 2


def test_linear_model_has_zero_model_hessian_and_sharpness_equal_to_kernel_top() -> None:
    model = nn.Linear(5, 2).double()
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    assert plstar.model_hessian_norm(model, x).value == 0.0
    top = float(torch.linalg.eigvalsh(dense_kernel(model, x))[-1])
    assert plstar.loss_sharpness(model, x, y, tol=1e-12).value == pytest.approx(top, rel=1e-10)


def test_hessian_vector_product_matches_finite_difference_of_gradients() -> None:
    model, x = tiny("mlp-tanh-k1")
    y = torch.randn(x.shape[0], 1)
    m, hvp = loss_hvp(model, x, y)
    F = as_function_of_flat(model, x)
    w = flat_params(model)
    v = torch.randn(m, generator=torch.Generator().manual_seed(5))
    gradient = torch.func.grad(lambda u: 0.5 * ((F(u) - y) ** 2).sum())
    h = 1e-5
    fd = (gradient(w + h * v) - gradient(w - h * v)) / (2 * h)
    assert torch.allclose(hvp(v[None])[0], fd, rtol=1e-7, atol=1e-8)


def test_loss_gradient_matches_autograd_and_uses_summed_loss() -> None:
    model, x = tiny("mlp-relu-k3")
    y = torch.randn(x.shape[0], 3)
    F = as_function_of_flat(model, x)
    w = flat_params(model).requires_grad_(True)
    loss = 0.5 * ((F(w) - y) ** 2).sum()
    (expected,) = torch.autograd.grad(loss, w)
    value, gradient = plstar.loss_gradient(model, x, y, memory_budget=1)  # one sample per block
    assert value == pytest.approx(float(loss.detach()), rel=1e-14)
    assert torch.allclose(gradient, expected, rtol=1e-12, atol=1e-14)


def test_a_time_budget_stops_model_hessian_norm_early_with_an_honest_bound() -> None:
    model, x = tiny("mlp-gelu-k3")
    F = as_function_of_flat(model, x)
    norms = torch.linalg.matrix_norm(hessian(lambda w: F(w).reshape(-1))(flat_params(model)), ord=2)
    full = plstar.model_hessian_norm(model, x, tol=1e-10, max_iter=200)
    assert full.converged and full.value == pytest.approx(float(norms.max()), rel=1e-8)
    # Batches of one output: the first gets one product (Lanczos takes at least one) before the
    # budget is spent, and no later batch starts.
    cut = plstar.model_hessian_norm(model, x, tol=1e-10, time_budget=1e-9, memory_budget=2**16)
    assert cut.products == 1 and cut.outputs_examined == 1 and not cut.converged
    assert cut.value <= float(norms[cut.argmax_output]) * (1 + 1e-12)
