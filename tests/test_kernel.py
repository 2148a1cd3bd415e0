"""The tangent kernel against dense torch.func Jacobians, closed forms and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ZOO, dense_jacobian, dense_kernel
from torch import nn

import plstar
from plstar.functional import make_functional

DEFAULT_DTYPE = torch.float64

IMPLEMENTATIONS = ["structured", "jacobian", "ntvp"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_kernel_of_linear_model_is_gram_of_inputs_kron_identity() -> None:
    x = torch.randn(6, 4)
    model = nn.Linear(4, 3).double()
    expected = torch.kron(x @ x.T + torch.ones(6, 6), torch.eye(3))
    for implementation in IMPLEMENTATIONS:
        K = plstar.tangent_kernel(model, x, implementation=implementation)
        assert relative_error(K, expected) < 1e-13


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernel_equals_dense_jacobian_product(zoo_case, implementation: str) -> None:
    _, model, x = zoo_case
    K = plstar.tangent_kernel(model, x, implementation=implementation)
    assert K.dtype == torch.float64
    assert relative_error(K, dense_kernel(model, x)) < 1e-12


def test_implementations_agree_to_1e_10(zoo_case) -> None:
    _, model, x = zoo_case
    kernels = [plstar.tangent_kernel(model, x, implementation=i) for i in IMPLEMENTATIONS]
    assert relative_error(kernels[0], kernels[1]) < 1e-10


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cross_kernel_matches_oracle_and_swapping_transposes(zoo_case, implementation) -> None:
    _, model, x = zoo_case
    x1, x2 = x[:3], x[3:]
    K12 = plstar.tangent_kernel(model, x1, x2, implementation=implementation)
    K21 = plstar.tangent_kernel(model, x2, x1, implementation=implementation)
    assert relative_error(K12, dense_kernel(model, x1, x2)) < 1e-12
    assert torch.allclose(K12, K21.T, rtol=0, atol=1e-13 * float(K12.abs().max()))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_kernel_independent_of_block_size(zoo_case, implementation: str) -> None:
    _, model, x = zoo_case
    whole = plstar.tangent_kernel(model, x, implementation=implementation)
    fmodel = make_functional(model, x)
    tiny_budget = 2 * fmodel.k * fmodel.m * 16  # forces blocks of a sample or two
    plan = plstar.plan_kernel(
        fmodel, x, x.shape[0], implementation=implementation, dtype=torch.float64,
        memory_budget=tiny_budget,
    )  # fmt: skip
    assert plan.row_block < x.shape[0] or plan.col_block < x.shape[0]
    blocked = plstar.tangent_kernel(
        model, x, implementation=implementation, memory_budget=tiny_budget
    )
    assert relative_error(blocked, whole) < 1e-13


@pytest.mark.parametrize("implementation", ["auto", *IMPLEMENTATIONS])
@pytest.mark.parametrize("blocked", [False, True], ids=["whole", "blocked"])
def test_kernel_is_exactly_symmetric_for_every_implementation(
    zoo_case, implementation: str, blocked: bool
) -> None:
    """Users may rely on torch.equal(K, K.T): the upper triangle is mirrored, never recomputed,
    so the result does not depend on whether this CPU's GEMM gives A·Aᵀ bitwise symmetric."""
    _, model, x = zoo_case
    fmodel = make_functional(model, x)
    budget = 2 * fmodel.k * fmodel.m * 16 if blocked else None
    K = plstar.tangent_kernel(model, x, implementation=implementation, memory_budget=budget)  # type: ignore[arg-type]
    assert torch.equal(K, K.T)
    assert relative_error(K, dense_kernel(model, x)) < 1e-12


def test_mirroring_copies_the_upper_triangle_across_strips() -> None:
    from plstar.kernel import mirror_upper_triangle_

    a = torch.randn(11, 11, generator=torch.Generator().manual_seed(0))
    expected = a.triu() + a.triu(1).T
    assert torch.equal(mirror_upper_triangle_(a.clone(), strip=3), expected)
    assert torch.equal(mirror_upper_triangle_(a.clone()), expected)


def test_kernel_is_permutation_equivariant(zoo_case) -> None:
    _, model, x = zoo_case
    k = make_functional(model, x).k
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(3))
    rows = (perm[:, None] * k + torch.arange(k)).reshape(-1)
    K = plstar.tangent_kernel(model, x)
    assert relative_error(plstar.tangent_kernel(model, x[perm]), K[rows][:, rows]) < 1e-13


def test_jacobian_rows_match_central_finite_differences() -> None:
    torch.manual_seed(0)
    model = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(1))[0].double()
    x = torch.randn(3, 4)
    fmodel = make_functional(model, x)
    J = fmodel.flatten(plstar.jacobian_rows(fmodel, x, torch.float64), batch=3)
    w = fmodel.flatten(fmodel.params)
    h = 1e-6
    columns = []
    for j in range(w.numel()):
        step = torch.zeros_like(w)
        step[j] = h
        plus = fmodel(fmodel.unflatten(w + step), x).reshape(-1)
        minus = fmodel(fmodel.unflatten(w - step), x).reshape(-1)
        columns.append((plus - minus) / (2 * h))
    assert relative_error(J, torch.stack(columns, dim=1)) < 1e-8


@pytest.mark.parametrize("implementation", ["auto", "ntvp"])
def test_operator_products_match_dense_kernel(zoo_case, implementation: str) -> None:
    _, model, x = zoo_case
    K = dense_kernel(model, x)
    op = plstar.kernel_operator(model, x, implementation=implementation)  # type: ignore[arg-type]
    assert op.implementation == ("ntvp" if implementation == "ntvp" else "structured")
    assert op.shape == tuple(K.shape)
    v = torch.randn(K.shape[0], 3, generator=torch.Generator().manual_seed(0))
    assert relative_error(op @ v, K @ v) < 1e-12
    assert relative_error(op @ v[:, 0], K @ v[:, 0]) < 1e-12
    scipy_op = op.to_scipy()
    assert np.allclose(scipy_op.matvec(v[:, 0].numpy()), (K @ v[:, 0]).numpy(), rtol=1e-12)


def test_float32_model_accumulates_in_float64() -> None:
    torch.manual_seed(0)
    model64 = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(1))[0].double()
    x = torch.randn(20, 4)
    model32 = ZOO["mlp-tanh-k1"](torch.Generator().manual_seed(1))[0].float()
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    K32 = plstar.tangent_kernel(model32, x.float())
    assert K32.dtype == torch.float64
    assert relative_error(K32, dense_kernel(model64, x)) < 1e-5


def test_auto_plan_stays_within_budget_and_never_holds_whole_jacobian() -> None:
    model = nn.Sequential(nn.Linear(30, 200), nn.Tanh(), nn.Linear(200, 1)).double()
    x = torch.randn(64, 30)
    fmodel = make_functional(model, x)
    jacobian_bytes = x.shape[0] * fmodel.m * 8
    budget = jacobian_bytes // 8
    plan = plstar.plan_kernel(
        fmodel, x, 64, implementation="auto", dtype=torch.float64, memory_budget=budget
    )
    assert plan.planned_bytes <= budget
    assert plan.row_block * fmodel.m * 8 < jacobian_bytes
    K = plstar.tangent_kernel(model, x, memory_budget=budget)
    assert relative_error(K, dense_kernel(model, x)) < 1e-12


def test_dense_jacobian_oracle_is_sample_major() -> None:
    model = nn.Linear(2, 2, bias=False).double()
    x = torch.randn(3, 2)
    J = dense_jacobian(model, x)
    # row i*k + a is ∂f_a(x_i)/∂W, which is x_i in row a of W and zero elsewhere
    assert torch.allclose(J[1 * 2 + 1].reshape(2, 2)[1], x[1])
    assert float(J[1 * 2 + 1].reshape(2, 2)[0].abs().max()) == 0.0


def test_every_public_measurement_works_under_no_grad() -> None:
    torch.manual_seed(0)
    model = ZOO["mlp-gelu-k3"](torch.Generator().manual_seed(1))[0].double()
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    expected = dense_kernel(model, x)
    with torch.no_grad():
        for implementation in IMPLEMENTATIONS:
            K = plstar.tangent_kernel(model, x, implementation=implementation)
            assert relative_error(K, expected) < 1e-12
        assert plstar.analyze(model, x, y).kernel.lambda_max > 0


@pytest.mark.parametrize("k", [2, 3])
def test_prelu_block_of_k_samples_matches_oracle(k: int) -> None:
    """torch 2.13's vmap of PReLU's backward is silently wrong when the block has k samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.PReLU(), nn.Linear(16, k)).double()
    x = torch.randn(k, 4, dtype=torch.float64)
    expected = dense_kernel(model, x)
    for implementation in ("jacobian", "structured"):
        K = plstar.tangent_kernel(model, x, implementation=implementation)
        assert relative_error(K, expected) < 1e-12, implementation
