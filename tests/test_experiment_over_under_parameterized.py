"""Experiment 4 (over- vs under-parameterized), quick configuration: its checks, its numbers against
a dense-Jacobian kernel oracle and the rank bound, and its figure."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_kernel, quick_result

from plstar.experiments import over_under_parameterized as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import gaussian_problem, tanh_net

TINY = {"sweep": "width", "n": 4, "width": 1, "d": 12, "k": 4, "steps": 5, "seed": 3}
"""m = 16 = n·k: the threshold itself, in a fraction of a second."""


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_both_sweeps_cover_a_quarter_to_eight_with_exact_sizes(result: ExperimentResult) -> None:
    size = experiment.QUICK
    for sweep in ("width", "samples"):
        points = [p for p in result.data["points"] if p["sweep"] == sweep]
        assert sorted(p["ratio"] for p in points) == list(experiment.RATIOS)
        for p in points:
            assert p["m"] == (size["d"] + size["k"]) * p["width"]
            assert p["nk"] == p["n"] * size["k"]


def test_rank_never_exceeds_parameters_or_outputs(result: ExperimentResult) -> None:
    """rank K ≤ min(m, n·k) is a theorem; below the threshold K must be reported singular."""
    for p in result.data["points"]:
        assert p["rank"] <= min(p["m"], p["nk"])
        assert p["overparameterized"] == (p["m"] >= p["nk"])
        if p["m"] < p["nk"]:
            assert p["zero_within_precision"] and p["steps_to_target"] is None


def test_kernel_spectrum_matches_dense_jacobian_oracle() -> None:
    data = experiment.run_configuration(TINY, None)
    x, _, model_seed = gaussian_problem(4, 12, 4, TINY["seed"])
    model = tanh_net(12, 1, 4, model_seed)
    eigenvalues = torch.linalg.eigvalsh(dense_kernel(model, x))
    assert data["m"] == data["nk"] == 16
    assert data["lambda_min"] == pytest.approx(float(eigenvalues[0]), abs=data["precision_floor"])
    assert data["lambda_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-12)
    assert data["rank"] == int((eigenvalues > data["precision_floor"]).sum())


def test_same_seed_gives_same_numbers() -> None:
    assert experiment.run_configuration(TINY, None) == experiment.run_configuration(TINY, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"over_under_parameterized"}
