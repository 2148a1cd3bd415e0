"""Experiment 10 (infinite-width reference), quick configuration: its checks, its numbers against
oracles (Weyl's inequality; an independent recomputation of one draw), and its figure."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import quick_result

from plstar.experiments import infinite_width
from plstar.experiments.base import ExperimentResult
from plstar.infinite_width import infinite_width_ntk


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(infinite_width.NUMBER)


def test_lambda_min_errors_obey_weyl_and_shrink_with_width(result: ExperimentResult) -> None:
    """|λ_min(K_m) − λ_min(K_∞)| ≤ ‖K_m − K_∞‖₂ for every draw (Weyl), and both mean errors are
    smaller at the widest width than at the narrowest."""
    for run in result.runs:
        for gap, norm in zip(run.data["lambda_min_error"], run.data["spectral_error"], strict=True):
            assert gap <= norm * (1 + 1e-12)
    for series in result.data.values():
        for key in ("frobenius_error", "lambda_min_error"):
            assert series[key]["mean"][-1] < series[key]["mean"][0]


def test_limit_spectrum_matches_numpy(result: ExperimentResult) -> None:
    """λ_min and λ_max of K_∞ reported by the experiment equal numpy's eigvalsh of the kernel."""
    from plstar.experiments.common import digits_problem

    x = digits_problem(infinite_width.QUICK["n"], seed=0).x
    for activation, series in result.data.items():
        kernel = infinite_width_ntk(x, depth=infinite_width.DEPTH, activation=activation)
        values = np.linalg.eigvalsh(kernel.numpy())
        assert series["limit_lambda_min"] == pytest.approx(values[0], rel=1e-9)
        assert series["limit_lambda_max"] == pytest.approx(values[-1], rel=1e-12)


def test_same_seed_gives_same_numbers() -> None:
    config = infinite_width.configurations(True, 1)[0] | {"draws": 1}
    first = infinite_width.run_configuration(config, None)
    assert first == infinite_width.run_configuration(config, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = infinite_width.figures(result)
    assert set(figures) == {"convergence"}
