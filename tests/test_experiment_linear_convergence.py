"""Experiment 3 (linear convergence under PL*), quick configuration: its checks, its μ and β
against dense oracles, its constants against plstar.theory, its curve helpers, and its figure."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import as_function_of_flat, dense_kernel, flat_params, quick_result

from plstar import theory
from plstar.experiments import linear_convergence as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import digits_problem, late_rate, network


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_rate_and_radius_are_the_theorems(result: ExperimentResult) -> None:
    assert result.data["widths"] == experiment.QUICK["widths"]
    for run in result.runs:
        d = run.data
        assert d["rate"] == pytest.approx(theory.gd_rate(d["beta"], d["mu"]), rel=1e-12)
        assert d["radius"] == pytest.approx(theory.gd_radius(d["beta"], d["mu"], d["loss0"]))
        curve = d["curve"]
        assert curve["step"][0] == 0 and curve["step"][-1] == run.config["steps"]
        assert curve["loss"][0] == curve["envelope"][0] == d["loss0"]
        assert curve["distance"][0] == 0.0


def test_late_rate_on_known_curves() -> None:
    assert late_rate([5.0 * 0.9**t for t in range(21)]) == pytest.approx(0.9)
    assert late_rate([5.0 * 0.5**t for t in range(21)]) == pytest.approx(0.5)
    assert math.isnan(late_rate([1.0, 0.0, 0.0]))


def test_mu_and_beta_match_dense_oracles() -> None:
    """μ = λ_min(DF DFᵀ) and β = λ_max(∇²L) at w₀ from a dense Jacobian and an exact Hessian."""
    config = {"width": 16, "depth": 2, "n": 8, "steps": 4, "every": 2, "seed": 2}
    found = experiment.run_configuration(config, None)
    data = digits_problem(8, 2)
    model = network("linear", 64, 16, 2, 1, 2)
    mu = float(torch.linalg.eigvalsh(dense_kernel(model, data.x))[0])
    forward, w0 = as_function_of_flat(model, data.x), flat_params(model)
    hessian = torch.func.hessian(lambda w: 0.5 * ((forward(w) - data.y) ** 2).sum())(w0)
    assert found["mu"] == pytest.approx(mu, rel=1e-8)
    assert found["beta"] == pytest.approx(float(torch.linalg.eigvalsh(hessian)[-1]), rel=1e-6)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"convergence"}
