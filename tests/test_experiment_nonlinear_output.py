"""Experiment 8 (non-linear output layer), quick configuration: its checks, its path numbers against
plstar.theory and an independent Jacobian oracle, and its figures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import dense_kernel, quick_result

from plstar import theory
from plstar.experiments import nonlinear_output
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import digits_problem
from plstar.models import mlp


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(nonlinear_output.NUMBER)


def test_path_numbers_are_consistent_with_theory(result: ExperimentResult) -> None:
    """Each recorded bound is plstar.theory's ρ²λ_min(K_f̃); ρ ≤ max φ' = 1 (softplus);
    λ_min ≤ λ_max; the loss falls over every run; the first point is w₀ (zero drift)."""
    for run in result.runs:
        path, losses = run.data["path"], run.data["losses"]
        every, steps = run.config["every"], run.config["steps"]
        assert [p["step"] for p in path] == list(range(0, steps + 1, every))
        assert path[0]["drift_outer"] == 0.0 and path[0]["drift_inner"] == 0.0
        assert losses[-1] < losses[0]
        for p in path:
            assert p["bound"] == theory.output_layer_kernel_bound(p["rho"], p["lambda_min_inner"])
            assert 0 < p["rho"] <= 1
            for name in ("inner", "outer"):
                assert 0 < p[f"lambda_min_{name}"] <= p[f"lambda_max_{name}"]


def test_kernels_at_initialisation_match_a_dense_jacobian_oracle() -> None:
    """At w₀ of the quick configuration's first width, λ_min of K_f and K_f̃ as recorded equal those
    of DF DFᵀ from one dense jacrev (tests/conftest.py), so the experiment measures the kernels it
    names."""
    config = nonlinear_output.configurations(True, 1)[0] | {"steps": 1, "every": 1}
    first = nonlinear_output.run_configuration(config, None)["path"][0]
    x = digits_problem(config["n"], seed=0).x
    # the network the module documents: mlp seeded from (seed, width)
    net_seed = int(np.random.SeedSequence([config["seed"], config["width"]]).generate_state(1)[0])
    model = mlp(x.shape[1], config["width"], config["depth"], 1, activation=config["activation"],
                output_activation=config["output_activation"], generator_seed=net_seed,
                dtype=torch.float64)  # fmt: skip
    for name, net in (("outer", model), ("inner", model[:-1])):
        values = torch.linalg.eigvalsh(dense_kernel(net, x))
        assert first[f"lambda_min_{name}"] == pytest.approx(float(values[0]), rel=1e-8)
        assert first[f"lambda_max_{name}"] == pytest.approx(float(values[-1]), rel=1e-10)


def test_same_seed_gives_same_numbers() -> None:
    config = nonlinear_output.configurations(True, 1)[0] | {"steps": 2, "every": 1}
    first = nonlinear_output.run_configuration(config, None)
    assert first == nonlinear_output.run_configuration(config, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = nonlinear_output.figures(result)
    assert set(figures) == {"path", "width"}
