"""Experiment 3 (linear convergence under PL*), quick configuration: its checks, its μ and β
against dense oracles, its constants against plstar.theory, its curve helpers, and its figure."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import as_function_of_flat, dense_kernel, flat_params, quick_result

from plstar import theory
from plstar.experiments import linear_convergence as experiment
from plstar.experiments.base import ExperimentResult, Run
from plstar.experiments.common import digits_problem, late_rate, network
from plstar.experiments.pl_region import build, sphere_problem


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_rate_and_radius_are_the_theorems(result: ExperimentResult) -> None:
    assert result.data["widths"] == experiment.QUICK["widths"]
    assert result.data[experiment.HOLDS]["widths"] == [experiment.HOLDS_QUICK["width"]]
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
    assert set(figures) == {"convergence", "hypothesis-holds"}


def test_hypothesis_regime_against_dense_oracles() -> None:
    """μ = λ₀/2 from a dense kernel; β at least the exact λ_max(∇²L(w₀)) (the largest sampled on
    the ball); R the theorem's radius with them."""
    config = {"regime": experiment.HOLDS, "width": 32, "depth": 2, "n": 3, "d": 16, "steps": 5,
              "every": 5, "seed": 1}  # fmt: skip
    found = experiment.run_configuration(config, None)
    x, y, model_seed = sphere_problem(3, 16, 1)
    model, _ = build("mlp2", 16, 32, model_seed)
    forward, w0 = as_function_of_flat(model, x), flat_params(model)
    assert found["mu"] == pytest.approx(
        float(torch.linalg.eigvalsh(dense_kernel(model, x))[0]) / 2, rel=1e-8
    )
    hessian = torch.func.hessian(lambda w: 0.5 * ((forward(w) - y) ** 2).sum())(w0)
    assert found["beta"] >= float(torch.linalg.eigvalsh(hessian)[-1]) * (1 - 1e-3)
    assert found["radius"] == pytest.approx(
        theory.gd_radius(found["beta"], found["mu"], found["loss0"]), rel=1e-12
    )


def test_hypothesis_check_fails_on_a_narrow_network() -> None:
    """At width 16 the PL* region is far inside R (experiment 11: r_μ ≈ 1 against R ≈ 40): the
    check of the hypothesis must fail there."""
    config = {"regime": experiment.HOLDS, "width": 16, "depth": 2, "n": 4, "d": 64,
              "steps": 20, "every": 10, "seed": 0}  # fmt: skip
    runs = [Run(config, experiment.run_configuration(config, None), 0.0)]
    _, checks = experiment.summarize(runs)
    hypothesis = [c for c in checks if c.name.startswith(f"[{experiment.HOLDS}] μ = λ₀/2")]
    assert len(hypothesis) == 1 and not hypothesis[0].passed, hypothesis
