"""Experiment 5 (essential non-convexity), quick configuration: its checks, the linear model's
Hessian against its closed form I_k ⊗ XᵀX/d, the exact Hessian against the core's HVPs, and its
figure."""

from __future__ import annotations

import pytest
import torch
from conftest import quick_result

from plstar import theory
from plstar.curvature import loss_hvp
from plstar.experiments import non_convexity as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import gaussian_problem, tanh_net


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def closed_form(seed: int) -> tuple[torch.Tensor, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(I_k ⊗ XᵀX/d, linear model, x, y) for the quick problem of ``seed``: F = Wx/√d with W
    (k, d) flattened row by row, so H_L = DFᵀDF = I_k ⊗ XᵀX/d whatever W is."""
    size = experiment.QUICK
    x, y, model_seed = gaussian_problem(size["n"], size["d"], size["k"], seed)
    model = tanh_net(size["d"], size["width"], size["k"], model_seed, depth=1)
    oracle = torch.kron(torch.eye(size["k"], dtype=torch.float64), x.T @ x / size["d"])
    return oracle, model, x, y


def test_linear_hessian_is_the_closed_form_everywhere() -> None:
    oracle, model, x, y = closed_form(0)
    assert torch.allclose(experiment.loss_hessian(model, x, y), oracle, rtol=0, atol=1e-13)
    moved = torch.randn(oracle.shape[0], generator=torch.Generator().manual_seed(1)).double()
    assert torch.allclose(experiment.loss_hessian(model, x, y, moved), oracle, rtol=0, atol=1e-13)


def test_reported_linear_spectrum_is_the_closed_forms(result: ExperimentResult) -> None:
    (row,) = [r for r in result.data["models"]["linear"] if r["seed"] == 0]
    oracle = torch.linalg.eigvalsh(closed_form(0)[0]).flip(0)
    eigenvalues = torch.tensor(row["eigenvalues"], dtype=torch.float64)
    assert torch.allclose(eigenvalues, oracle, rtol=0, atol=1e-12)
    assert min(row["eigenvalues"]) >= -row["precision_floor"]


def test_exact_hessian_agrees_with_the_cores_hessian_vector_products() -> None:
    size = experiment.QUICK
    x, y, model_seed = gaussian_problem(size["n"], size["d"], size["k"], 2)
    model = tanh_net(size["d"], size["width"], size["k"], model_seed)
    hessian = experiment.loss_hessian(model, x, y)
    m, hvp = loss_hvp(model, x, y)
    vectors = torch.randn(3, m, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(hvp(vectors), vectors @ hessian, rtol=1e-10, atol=1e-12)


def test_rank_and_nullity_match_the_solution_manifold(result: ExperimentResult) -> None:
    for rows in result.data["models"].values():
        for row in rows:
            assert row["rank"] <= row["nk"]
            assert row["m"] - row["rank"] == theory.solution_manifold_dimension(row["m"], row["nk"])
            assert len(row["points"]) == experiment.QUICK["radii"] * experiment.QUICK["directions"]


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"non_convexity"}
