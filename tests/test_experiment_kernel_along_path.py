"""Experiment 2 (kernel along the GD path), quick configuration: its checks, its kernel at w₀ against
a dense Jacobian oracle, its summary against an independent fit, and its figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dense_kernel, quick_result

from plstar.experiments import kernel_along_path as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import digits_problem, network


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_paths_are_monitored_from_w0_to_the_last_step(result: ExperimentResult) -> None:
    for run in result.runs:
        data, every, steps = run.data, run.config["every"], run.config["steps"]
        assert data["steps"] == list(range(0, steps + 1, every))
        assert data["lambda_ratio"][0] == 1.0 and data["drift"][0] == 0.0
        assert data["final_drift"] == data["drift"][-1]
        assert data["mu"] == pytest.approx(data["lambda0"], rel=1e-12)  # all n samples monitored
        assert data["final_loss"] < data["loss0"]


def test_drift_slope_is_the_least_squares_fit_of_the_final_drifts(result: ExperimentResult) -> None:
    widths = result.data["widths"]
    assert widths == experiment.QUICK["widths"]
    x = [w for w, vs in zip(widths, result.data["final_drift"], strict=True) for _ in vs]
    y = [v for vs in result.data["final_drift"] for v in vs]
    assert result.data["drift_slope"] == pytest.approx(np.polyfit(np.log(x), np.log(y), 1)[0])


def test_kernel_at_w0_matches_a_dense_jacobian_oracle() -> None:
    """λ_min(K(w₀)) as recorded equals the smallest eigenvalue of DF DFᵀ from one dense jacrev."""
    config = {"width": 32, "depth": 2, "n": 8, "steps": 4, "every": 2, "seed": 1}
    found = experiment.run_configuration(config, None)
    data = digits_problem(8, 1)
    oracle = torch.linalg.eigvalsh(dense_kernel(network("linear", 64, 32, 2, 1, 1), data.x))
    assert found["lambda0"] == pytest.approx(float(oracle[0]), rel=1e-8)
    assert found["steps"] == [0, 2, 4]


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"kernel_along_path", "drift_vs_width"}
