"""The PL* region around w₀ (plstar.region): the searches against a model whose crossing is known
in closed form, and the bracket lower ≤ upper on a network."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import flat_parameters
from plstar.kernel import tangent_kernel
from plstar.models import mlp
from plstar.region import RegionSearch, fit_crossover, pl_region


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
    search = RegionSearch(model, x, mu)
    found = search.along("toward −a", -model.a / 5.0, 10.0)
    assert found.distance == pytest.approx(expected, rel=1e-3)
    values, radii = found.values, found.radii
    assert values[-1] < mu <= min(values[:-1]) and radii == sorted(radii)
    assert radii[-1] >= found.distance
    # λ_min falls fastest along −(a + εw): the path stays on the line through −a
    path = search.descent_path()
    assert path.distance == pytest.approx(expected, rel=1e-3)
    assert path.direction is not None
    assert torch.allclose(path.direction, -model.a / 5.0, atol=1e-9)
    assert path.values[0] == pytest.approx(25.0) and path.values[-1] < mu
    assert path.radii == sorted(path.radii)
    assert torch.equal(flat_parameters(model), w0)  # left where it started


def test_a_direction_that_never_crosses_reports_infinity() -> None:
    model, x, _ = quadratic()
    w0 = flat_parameters(model)
    away = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)  # K = 25 + ε²r² only grows
    found = RegionSearch(model, x, 12.5).along("away", away, 10.0)
    assert math.isinf(found.distance) and min(found.values) >= 25.0
    assert torch.equal(flat_parameters(model), w0)


def test_region_brackets_the_first_crossing_and_leaves_the_model_at_w0() -> None:
    torch.manual_seed(0)
    model = mlp(3, 64, 2, 1, generator_seed=0, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    w0 = flat_parameters(model)
    region = pl_region(model, x, hessian_norm=0.5, random_directions=1)
    assert torch.equal(flat_parameters(model), w0)
    lambda0 = float(torch.linalg.eigvalsh(tangent_kernel(model, x))[0])
    assert region.lambda0 == pytest.approx(lambda0, rel=1e-12) and region.mu == region.lambda0 / 2
    assert region.lower == theory.uniform_conditioning_radius(lambda0, lambda0 / 2, 0.5, 5)
    assert region.upper == min(c.distance for c in region.crossings)
    names = [c.name for c in region.crossings]
    assert names == ["adversarial", "toward zero", "random 1"]
    assert math.isfinite(region.upper)
    # the crossing found is a point where PL* with μ fails
    best = min(region.crossings, key=lambda c: c.distance)
    assert best.direction is not None
    search = RegionSearch(model, x, region.mu)
    assert search.lambda_min(w0 + best.distance * best.direction.to(w0.dtype)) < region.mu
    assert region.to_dict()["upper"] == region.upper


def test_fit_crossover_recovers_a_power_law_and_its_crossing_width() -> None:
    widths = [16.0, 64.0, 256.0, 1024.0]
    exact = fit_crossover(widths, [2 * w**0.5 for w in widths], radius=100.0)
    assert exact is not None
    assert exact.slope == pytest.approx(0.5, rel=1e-12)
    assert exact.width == pytest.approx(2500.0, rel=1e-10)  # 2·√w = 100
    assert exact.width_range is not None
    assert exact.width_range[0] == pytest.approx(2500.0, rel=1e-6)  # no scatter: no spread
    scatter = (1.1, 0.9, 1.1, 0.9)
    values = [2 * w**0.5 * f for w, f in zip(widths, scatter, strict=True)]
    noisy = fit_crossover(widths, values, radius=100.0)
    assert noisy is not None and noisy.width_range is not None
    assert noisy.width_range[0] < noisy.width < noisy.width_range[1]
    two = fit_crossover(widths[:2], [1.0, math.inf], radius=10.0)
    assert two is None  # one finite value: no fit
    pair = fit_crossover(widths[:2], [1.0, 2.0], radius=8.0)
    assert pair is not None and pair.slope_error is None and pair.width_range is None
    assert pair.width == pytest.approx(16 * 4**3, rel=1e-10)
    flat = fit_crossover(widths, [3.0, 3.0, 3.0, 3.0], radius=10.0)
    assert flat is not None and math.isinf(flat.width)
