"""Experiment 11 (the PL* region against the GD ball): its searches against closed forms, and its
checks failing where the theory says they must (a bottlenecked network, whose ‖H_F‖ does not
fall with width)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from plstar.certify import flat_parameters
from plstar.experiments import pl_region
from plstar.experiments.base import Run


class Quadratic(nn.Module):
    """F(w) = a·w + ε‖w‖²/2 on one sample: K(w) = ‖a + εw‖², so along u = −a/‖a‖ from w = 0,
    λ_min(K(w₀ + r·u)) = (‖a‖ − εr)², which falls below μ = λ₀/2 at r = ‖a‖(1 − 1/√2)/ε."""

    def __init__(self, a: Tensor, eps: float) -> None:
        super().__init__()
        self.a, self.eps = a, eps
        self.w = nn.Parameter(torch.zeros_like(a))

    def forward(self, x: Tensor) -> Tensor:
        value = self.a @ self.w + 0.5 * self.eps * self.w @ self.w
        return value * torch.ones(x.shape[0], 1, dtype=x.dtype)


def quadratic() -> tuple[Quadratic, Tensor, float]:
    a = torch.tensor([3.0, -4.0, 0.0], dtype=torch.float64)
    model = Quadratic(a, eps=0.5)
    return model, torch.ones(1, 1, dtype=torch.float64), 5.0 * (1 - 2**-0.5) / 0.5


def test_scan_and_adversarial_path_find_the_closed_form_crossing() -> None:
    model, x, expected = quadratic()
    w0 = flat_parameters(model)
    mu = 25.0 / 2
    crossing, radii, values = pl_region.scan(model, x, w0, -model.a / 5.0, mu, 10.0)
    assert crossing == pytest.approx(expected, rel=1e-3)
    assert values[-1] < mu <= min(values[:-1]) and radii == sorted(radii) and radii[-1] >= crossing
    # λ_min falls fastest along −(a + εw): the path stays on the line through −a
    r, direction, distances, path = pl_region.adversarial(model, x, w0, mu)
    assert r == pytest.approx(expected, rel=1e-3)
    assert torch.allclose(direction, -model.a / 5.0, atol=1e-9)
    assert path[0] == pytest.approx(25.0) and path[-1] < mu and distances == sorted(distances)
    assert torch.equal(flat_parameters(model), w0)  # left where it started


def test_a_direction_that_never_crosses_reports_infinity() -> None:
    model, x, _ = quadratic()
    w0 = flat_parameters(model)
    away = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # K = 25 + ε²r² only grows
    crossing, _, values = pl_region.scan(model, x, w0, away, 12.5, 10.0)
    assert math.isinf(crossing) and min(values) >= 25.0


def test_crossover_is_the_first_width_from_which_r_mu_stays_above_r() -> None:
    widths = [16, 64, 256, 1024]
    assert pl_region.crossover(widths, [1, 5, 3, 9], [4, 4, 4, 4]) == 1024
    assert pl_region.crossover(widths, [1, 5, 6, 9], [4, 4, 4, 4]) == 64
    assert pl_region.crossover(widths, [1, 2, 3, 3], [4, 4, 4, 4]) is None


def test_bottlenecked_network_fails_the_width_checks() -> None:
    """Every path through one scalar unit: ‖H_F‖ does not fall with width, nor does r_μ grow,
    so the experiment's slope checks fail — they can fail."""
    runs = []
    for width in (16, 64, 256, 1024):
        config = {"family": "bottleneck", "width": width, "n": 4, "d": 64, "ball": 8.0,
                  "steps": 100, "seed": 0}  # fmt: skip
        runs.append(Run(config, pl_region.run_configuration(config, None), 0.0))
    _, checks = pl_region.summarize(runs)
    by_name = {c.name.split("] ")[1]: c for c in checks}
    hessian = by_name["log-log slope of sup ‖H_F‖ on B(w₀, r_ball) against width"]
    region = by_name["log-log slope of r_μ against width (PL* region ∝ √m)"]
    assert not hessian.passed and not region.passed, (hessian, region)
    assert len(checks) == 3  # no crossover checks for a family outside CROSSING
