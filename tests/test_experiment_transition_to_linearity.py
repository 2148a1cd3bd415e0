"""Experiment 1 (transition to linearity), quick configuration: its checks, its ‖H_F‖ against exact
dense Hessians, its summary against an independent least-squares fit, and its figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import as_function_of_flat, flat_params, quick_result

from plstar.experiments import transition_to_linearity as experiment
from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import VARIANTS, digits_problem, network


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(experiment.NUMBER)


def test_summary_refits_the_stored_values(result: ExperimentResult) -> None:
    """Every family at every quick width; each slope is numpy's least squares on log-log points."""
    variants = result.data["variants"]
    assert set(variants) == set(VARIANTS)
    for entry in variants.values():
        assert entry["widths"] == experiment.QUICK_WIDTHS
        x = np.log([w for w, vs in zip(entry["widths"], entry["values"], strict=True) for _ in vs])
        y = np.log([v for vs in entry["values"] for v in vs])
        design = np.stack([x, np.ones_like(x)], axis=1)
        assert entry["slope"] == pytest.approx(np.linalg.lstsq(design, y)[0][0], rel=1e-9)
    for run in result.runs:
        assert len(run.data["draws"]) == experiment.DRAWS[run.config["variant"]]


@pytest.mark.parametrize("variant", VARIANTS)
def test_hessian_norm_is_the_largest_exact_output_hessian_norm(variant: str) -> None:
    """At width 8 (m ≈ 550), ‖H_F‖ = max_i ‖∇²F_i(w₀)‖₂ from dense float64 Hessians."""
    config = {"variant": variant, "width": 8, "depth": 2, "n": 8, "activation": "tanh",
              "draws": 1, "seed": 3}  # fmt: skip
    found = experiment.run_configuration(config, None)
    data = digits_problem(8, 3)
    model = network(variant, 64, 8, 2, 1, 3)
    forward, w0 = as_function_of_flat(model, data.x), flat_params(model)
    norms = [
        torch.linalg.eigvalsh(torch.func.hessian(lambda w, i=i: forward(w)[i, 0])(w0)).abs().max()
        for i in range(8)
    ]
    assert found["hessian_norm"] == pytest.approx(float(max(norms)), rel=1e-6)
    assert found["outputs_examined"] == found["outputs_total"] == 8


def test_same_seed_gives_same_numbers() -> None:
    config = experiment.configurations(True, 1)[0]
    assert experiment.run_configuration(config, None) == experiment.run_configuration(config, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = experiment.figures(result)
    assert set(figures) == {"hessian_norm_vs_width"}
