"""Experiment 9 (random systems), quick configuration: its checks, its numbers against independent
oracles (SVD in numpy; Edelman's square-matrix constant; Marchenko–Pastur), and its figures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import quick_result

from plstar.experiments import random_systems
from plstar.experiments.base import ExperimentResult
from plstar.theory import random_system_log_condition_bound


@pytest.fixture(scope="module")
def result() -> ExperimentResult:
    return quick_result(random_systems.NUMBER)


def test_log_condition_numbers_agree_with_numpy_singular_values() -> None:
    """κ(AAᵀ) from plstar.spectrum of AAᵀ equals (σ_max/σ_min)² of A from numpy's SVD."""
    config = {"n": 6, "m": 9, "draws": 4, "seed": 3}
    found = random_systems.run_configuration(config, None)["log_condition"]
    # the same matrices, drawn as the module documents: one generator seeded from (seed, n, m)
    key = np.random.SeedSequence([3, 6, 9]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(key))
    for value in found:
        sigma = np.linalg.svd(torch.randn(6, 9, generator=generator, dtype=torch.float64).numpy(),
                              compute_uv=False)  # fmt: skip
        assert value == pytest.approx(2 * math.log(sigma[0] / sigma[-1]), rel=1e-12)


def test_summary_matches_references(result: ExperimentResult) -> None:
    """Bounds are plstar.theory's; the square case matches Edelman's 2(log n + 1.537) within four
    standard errors; for m ≥ 2n the mean lies within 10 % of the Marchenko–Pastur limit (n = 40)."""
    n, rows = result.data["n"], result.data["rows"]
    assert [row["draws"] for row in rows] == [random_systems.QUICK["draws"]] * len(rows)
    for row in rows:
        assert row["bound"] == random_system_log_condition_bound(n, row["m"])
        if row["ratio"] >= 2:
            assert abs(row["mean"] / row["marchenko_pastur"] - 1) < 0.1
    square = rows[0]
    assert square["m"] == n
    assert abs(square["mean"] - 2 * (math.log(n) + 1.537)) < 4 * square["standard_error"]


def test_same_seed_gives_same_numbers() -> None:
    config = random_systems.configurations(True, 1)[1] | {"draws": 5}
    first = random_systems.run_configuration(config, None)
    assert first == random_systems.run_configuration(config, None)


def test_figures_have_their_names(result: ExperimentResult) -> None:
    figures = random_systems.figures(result)
    assert set(figures) == {"condition", "distribution"}
