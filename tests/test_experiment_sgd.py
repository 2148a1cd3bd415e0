"""Experiment 6 (SGD at η*(b)), quick configuration: its checks, its step sizes, rates and
saturation batch size against plstar.theory, and its figure."""

from __future__ import annotations

import pytest
from conftest import quick_result

from plstar import theory
from plstar.experiments import sgd as experiment
from plstar.experiments.base import ExperimentResult

TINY = {"batch_size": 2, "seed": 4, "n": 4, "d": 16, "width": 4, "epochs": 2, "streams": 2,
        "target": 0.5}  # fmt: skip


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_step_sizes_and_rates_are_the_theorys(result: ExperimentResult) -> None:
    """η*(b), 1 − μη*(b) and b* recomputed by plstar.theory from the measured constants."""
    for run in result.runs:
        data, b = run.data, run.config["batch_size"]
        constants = {"per_sample_smoothness": data["per_sample_smoothness"],
                     "loss_smoothness": data["beta"], "pl_constant": data["mu"],
                     "n_samples": data["n"], "batch_size": b}  # fmt: skip
        assert data["step_size"] == pytest.approx(theory.sgd_step_size(**constants), rel=1e-12)
        assert data["rate"] == pytest.approx(theory.sgd_rate(**constants), rel=1e-12)
        assert data["saturation_batch_size"] == pytest.approx(
            theory.sgd_saturation_batch_size(per_sample_smoothness=data["per_sample_smoothness"],
                                             pl_constant=data["mu"], n_samples=data["n"]),
            rel=1e-12,
        )  # fmt: skip
        assert data["predicted_steps"] == theory.steps_to_loss(
            data["loss0"], run.config["target"] * data["loss0"], data["rate"]
        )


def test_batch_sizes_run_from_one_to_n_with_full_epochs(result: ExperimentResult) -> None:
    rows = result.data["rows"]
    n = experiment.QUICK["n"]
    assert [row["batch_size"] for row in rows] == [2**i for i in range(n.bit_length())]
    for row in rows:
        assert row["streams"] == experiment.QUICK["streams"]
        assert len(row["mean_curve"]) == experiment.QUICK["epochs"] + 1
        assert row["mean_curve"][0] == 1.0
        assert all(low <= mean <= high for low, mean, high in
                   zip(row["low_curve"], row["mean_curve"], row["high_curve"], strict=True))  # fmt: skip


def test_same_seed_gives_same_numbers() -> None:
    assert experiment.run_configuration(TINY, None) == experiment.run_configuration(TINY, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"sgd"}
