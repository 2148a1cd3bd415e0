"""Experiment 7 (PL*_ε), quick configuration: its checks, λ⁺ against the dense kernel oracle,
ρ(w₀) against plstar.pl_ratio, the bounds against plstar.theory, and its figure."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_kernel, quick_result

from plstar import pl_ratio, theory
from plstar.experiments import pl_eps as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import gaussian_problem, tanh_net


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_start_of_the_path_matches_oracles(result: ExperimentResult) -> None:
    """λ⁺(w₀) is the (n·k − m + 1)-th smallest eigenvalue of the dense kernel, the first n·k − m
    are zero within precision, and ρ(w₀) is plstar.pl_ratio's."""
    size = experiment.QUICK
    for case in result.data["cases"]:
        x, y, model_seed = gaussian_problem(size["n"], size["d"], size["k"], case["seed"])
        model = tanh_net(size["d"], case["width"], size["k"], model_seed)
        eigenvalues = torch.linalg.eigvalsh(dense_kernel(model, x))
        nullity = case["nk"] - case["m"]
        assert nullity > 0
        assert float(eigenvalues[:nullity].abs().max()) <= case["kernel_floor"]
        floor = case["lambda_plus_floor"] + case["kernel_floor"]
        assert case["lambda_plus_start"] == pytest.approx(float(eigenvalues[nullity]), abs=floor)
        assert case["pl_ratios"][0] == pytest.approx(pl_ratio(model, x, y), rel=1e-10)
        with torch.no_grad():
            loss0 = 0.5 * float(((model(x) - y) ** 2).sum())
        assert case["losses"][0] == pytest.approx(loss0)


def test_level_bounds_are_the_theorys(result: ExperimentResult) -> None:
    for case in result.data["cases"]:
        losses, beta = case["losses"], 1.0 / case["final_step_size"]
        lambda_plus = min(case["lambda_plus_start"], case["lambda_plus_end"])
        assert case["levels"], "no level ε below L₀"
        predicted = case["loss_star_linear"]  # fixed before the run, from w₀ alone
        for row in case["levels"]:
            assert row["eps"] == row["c"] * predicted < losses[0]
            assert row["mu_eps"] == pytest.approx(lambda_plus * (1 - predicted / row["eps"]))
            assert row["tightness"] == pytest.approx(row["path_mu"] / row["mu_eps"])
            assert row["bound"] == theory.pl_eps_first_passage_bound(
                beta, row["mu_eps"], losses[0], row["eps"]
            )
            assert losses[row["first_passage"]] < row["eps"] <= losses[row["first_passage"] - 1]


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"pl_eps"}


def test_the_linearized_minimum_is_the_least_squares_residual_outside_the_range_of_df() -> None:
    """A linear model F(w) = Xw is its own linearization: L*_lin is the least-squares minimum."""
    import torch
    from torch import nn

    from plstar.experiments.pl_eps import linearized_minimum

    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randn(9, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 1, bias=False).double()
    design = x
    solution = torch.linalg.lstsq(design, y).solution
    expected = 0.5 * float(((design @ solution - y) ** 2).sum())
    assert linearized_minimum(model, x, y) == pytest.approx(expected, rel=1e-10)
