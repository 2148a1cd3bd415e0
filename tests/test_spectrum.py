"""Eigenvalue solvers against numpy's dense float64 eigvalsh, with their error bounds checked."""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import aslinearoperator
from torch import nn

import plstar
from plstar.lanczos import lanczos

SPECTRUM_MODULE = importlib.import_module("plstar.spectrum")  # plstar.spectrum is the function

DEFAULT_DTYPE = torch.float64


def random_psd(size: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(size, rank, generator=g)
    return a @ a.T


def test_dense_spectrum_matches_numpy_within_its_bound() -> None:
    K = random_psd(40, 60, 0)
    s = plstar.spectrum(K)
    truth = np.linalg.eigvalsh(K.numpy())
    assert abs(s.lambda_min - truth[0]) <= s.lambda_min_error
    assert abs(s.lambda_max - truth[-1]) <= s.lambda_max_error
    assert not s.is_singular
    assert s.condition_number == pytest.approx(truth[-1] / truth[0], rel=1e-9)


@pytest.mark.parametrize("which", ["min", "max"])
def test_one_sided_spectrum_reports_only_that_side(which: str) -> None:
    s = plstar.spectrum(random_psd(10, 20, 1), which=which)
    assert (s.lambda_min is None) == (which == "max")
    assert (s.lambda_max is None) == (which == "min")


def test_lanczos_on_operator_matches_dense_within_residual_bound() -> None:
    K = random_psd(120, 150, 2)
    truth = np.linalg.eigvalsh(K.numpy())
    s = plstar.spectrum(aslinearoperator(K.numpy()), tol=1e-12)
    assert s.method.startswith("lanczos")
    assert abs(s.lambda_max - truth[-1]) <= s.lambda_max_error
    assert abs(s.lambda_min - truth[0]) <= s.lambda_min_error
    assert s.lambda_min_error < 1e-6 * truth[-1]


def test_rank_deficient_kernel_is_zero_within_precision() -> None:
    s = plstar.spectrum(random_psd(30, 10, 3))
    assert s.is_singular
    assert math.isinf(s.condition_number)


def test_underparameterized_model_kernel_is_singular() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()  # m = 13
    x = torch.randn(20, 2)  # n·k = 20 > m
    s = plstar.spectrum(plstar.tangent_kernel(model, x))
    assert s.is_singular
    assert math.isinf(s.condition_number)


def test_float32_input_raises_the_precision_floor_to_eps32_times_lambda_max() -> None:
    K = random_psd(20, 40, 4)
    s64 = plstar.spectrum(K)
    s32 = plstar.spectrum(K.float())
    eps32 = float(torch.finfo(torch.float32).eps)
    assert s32.precision_floor >= eps32 * s32.lambda_max
    assert s64.precision_floor < 1e-12 * s64.lambda_max


def test_batched_lanczos_finds_extremes_of_independent_diagonal_operators() -> None:
    diagonals = torch.stack([torch.linspace(-3.0, 5.0, 50), torch.linspace(0.5, 2.0, 50) ** 3])
    result = lanczos(lambda v: diagonals * v, 50, 2, max_iter=50, tol=1e-12)
    assert torch.allclose(result.theta_max, diagonals.max(dim=1).values, atol=1e-10)
    assert torch.allclose(result.theta_min, diagonals.min(dim=1).values, atol=1e-10)
    assert float(result.residual_max.max()) < 1e-8


def test_lanczos_stops_on_exact_invariant_subspace() -> None:
    zero = lanczos(lambda v: 0.0 * v, 30, 1, max_iter=30)
    assert zero.iterations == 1
    assert float(zero.theta_max[0]) == 0.0
    low_rank = torch.zeros(30)
    low_rank[:2] = torch.tensor([4.0, -1.0])
    result = lanczos(lambda v: low_rank * v, 30, 1, max_iter=30)
    assert result.iterations <= 3
    assert float(result.theta_max[0]) == pytest.approx(4.0, abs=1e-12)
    assert float(result.theta_min[0]) == pytest.approx(-1.0, abs=1e-12)


def test_spectrum_refuses_non_square_and_non_finite_input() -> None:
    with pytest.raises(plstar.PlstarInputError):
        plstar.spectrum(torch.zeros(3, 4))
    bad = torch.eye(3)
    bad[0, 0] = math.nan
    with pytest.raises(plstar.PlstarInputError):
        plstar.spectrum(bad)
    with pytest.raises(plstar.PlstarInputError):
        plstar.spectrum(torch.eye(3), which="middle")


def test_cholesky_lanczos_path_matches_eigvalsh_within_its_bounds(monkeypatch) -> None:
    K = random_psd(150, 170, 7)
    truth = np.linalg.eigvalsh(K.numpy())
    monkeypatch.setattr(SPECTRUM_MODULE, "DENSE_EIGVALSH_LIMIT", 50)
    s = plstar.spectrum(K)
    assert s.method == "dense-cholesky-lanczos-float64"
    assert abs(s.lambda_min - truth[0]) <= s.lambda_min_error
    assert abs(s.lambda_max - truth[-1]) <= s.lambda_max_error
    assert s.lambda_min_error < 1e-8 * truth[-1]


def test_cholesky_path_falls_back_to_eigvalsh_for_a_singular_kernel(monkeypatch) -> None:
    monkeypatch.setattr(SPECTRUM_MODULE, "DENSE_EIGVALSH_LIMIT", 50)
    s = plstar.spectrum(random_psd(120, 30, 8))
    assert s.method == "dense-eigvalsh-float64"
    assert s.is_singular


def test_lanczos_residuals_equal_explicitly_recomputed_ones() -> None:
    K = random_psd(60, 80, 9)
    result = lanczos(lambda v: (K @ v.T).T, 60, 1, max_iter=12, tol=1e-14)
    y, theta = result.vector_max[0], float(result.theta_max[0])
    explicit = float((K @ y - theta * y).norm())
    assert float(result.residual_max[0]) == pytest.approx(explicit, rel=1e-6, abs=1e-12)
    assert explicit > 0  # 12 steps on a 60-dimensional operator: not yet exact
