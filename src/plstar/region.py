"""The PL* region around w₀: how far from w₀ λ_min(K(w)) stays ≥ μ (THEORY items 1, 4).

PL* with constant μ holds wherever λ_min(K(w)) ≥ μ (item 1). Around w₀ the region where it does is
bracketed two ways:

* from below, by Hessian control (item 4): if ‖H_F‖ ≤ ε on B(w₀, r) then λ_min(K) ≥
  (√λ₀ − √(nk)·ε·r)², which stays ≥ μ up to r = (√λ₀ − √μ)/(√(nk)·ε) — a proof if ε bounds ‖H_F‖
  on that ball; here ε is the largest value sampled, so it is evidence;
* from above, by the nearest point found where λ_min(K) < μ: along an adversarial path (iterated
  steps in the direction in which λ_min falls fastest, growing ×1.4 from 10⁻⁴‖w₀‖, the crossing
  bisected), the segment toward w = 0, and given or random directions (scanned on a geometric grid
  and bisected). A point found is a proof that PL* with μ fails at that distance.

The model is moved to the points it measures and always put back at w₀.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import assign_parameters, flat_parameters, lambda_min_descent
from plstar.conditions import json_safe
from plstar.functional import OutputSelector, ProgressCallback
from plstar.kernel import tangent_kernel

__all__ = ["Crossing", "Region", "RegionSearch", "pl_region"]

GRID = 24
"""Points of a scan along a direction, geometric from 10⁻³ of its reach to the reach."""
BISECTIONS = 12


@dataclass
class Crossing:
    """Along one direction family: the distance from w₀ of the first point with λ_min(K) < μ (∞ if
    none within reach), the distances visited and λ_min there, and the unit direction w₀ → the
    crossing (the last point when none)."""

    name: str
    distance: float
    radii: list[float]
    values: list[float]
    direction: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return json_safe({"name": self.name, "distance": self.distance, "radii": self.radii,
                          "values": self.values})  # fmt: skip


class RegionSearch:
    """λ_min(K(w)) along directions from w₀ (the model's current parameters) against μ.

    Cost: a kernel K(w) and its dense float64 eigenvalues per point; the adversarial path adds a
    descent direction per step (a dense eigh and ≈ 4 passes over the data; n·k ≤ 20,000).
    """

    def __init__(
        self, model: nn.Module, x: Tensor, mu: float, *, memory_budget: int | None = None,
        output: OutputSelector | None = None,
    ) -> None:  # fmt: skip
        self.model, self.x, self.mu = model, x, mu
        self.common: dict[str, Any] = {"memory_budget": memory_budget, "output": output}
        self.w0 = flat_parameters(model)
        self.outputs = 0  # n·k, known after the first kernel

    def lambda_min(self, w: Tensor) -> float:
        """λ_min(K(w)); leaves the model at w (callers restore w₀)."""
        assign_parameters(self.model, w)
        kernel = tangent_kernel(self.model, self.x, **self.common)
        self.outputs = kernel.shape[0]
        return float(torch.linalg.eigvalsh(kernel)[0])

    def _bisect(self, w: Tensor, u: Tensor, low: float, high: float) -> float:
        """The crossing of λ_min(K(w + r·u)) = μ in [low, high] (above at low, below at high)."""
        for _ in range(BISECTIONS):
            middle = 0.5 * (low + high)
            below = self.lambda_min(w + middle * u) < self.mu
            low, high = (low, middle) if below else (middle, high)
        return high

    def along(self, name: str, u: Tensor, reach: float) -> Crossing:
        """The first r ≤ ``reach`` with λ_min(K(w₀ + r·u)) < μ (u a unit vector), bisected."""
        u = u.to(self.w0.dtype)
        radii = (reach * np.geomspace(1e-3, 1.0, GRID)).tolist()
        values: list[float] = []
        try:
            for i, r in enumerate(radii):
                values.append(self.lambda_min(self.w0 + r * u))
                if values[-1] < self.mu:
                    hit = self._bisect(self.w0, u, radii[i - 1] if i else 0.0, r)
                    return Crossing(name, hit, radii[: i + 1], values, u)
            return Crossing(name, math.inf, radii, values, u)
        finally:
            assign_parameters(self.model, self.w0)

    def descent_path(self, max_steps: int = 60) -> Crossing:
        """Iterated λ_min descent from w₀ until λ_min < μ (steps from 10⁻⁴·‖w₀‖, or 10⁻⁴ at
        w₀ = 0, growing ×1.4; the last step bisected)."""
        w0 = self.w0
        w, step = w0.clone(), 1e-4 * (float(w0.norm()) or 1.0)
        radii, values = [0.0], [self.lambda_min(w0)]
        try:
            for _ in range(max_steps):
                assign_parameters(self.model, w)
                direction = lambda_min_descent(self.model, self.x, **self.common)
                if direction is None:
                    break
                direction = direction.to(w.dtype)
                value = self.lambda_min(w + step * direction)
                if value < self.mu:
                    w = w + self._bisect(w, direction, 0.0, step) * direction
                    radii.append(float((w - w0).norm()))
                    values.append(self.lambda_min(w))
                    return Crossing("adversarial", radii[-1], radii, values, (w - w0) / radii[-1])
                w = w + step * direction
                radii.append(float((w - w0).norm()))
                values.append(value)
                step *= 1.4
            toward = (w - w0) / max(float((w - w0).norm()), 1e-300)
            return Crossing("adversarial", math.inf, radii, values, toward)
        finally:
            assign_parameters(self.model, w0)


@dataclass
class Region:
    """The PL* region with constant ``mu`` around w₀: ``lower`` from Hessian control with
    ``hessian_norm`` (ε), ``upper`` the nearest crossing found (∞ if none), per direction family
    in ``crossings``."""

    lambda0: float
    mu: float
    hessian_norm: float
    lower: float
    upper: float
    crossings: list[Crossing]

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k != "crossings"}
        return json_safe(data | {"crossings": [c.to_dict() for c in self.crossings]})


def pl_region(
    model: nn.Module,
    x: Tensor,
    *,
    hessian_norm: float,
    mu: float | None = None,
    directions: list[tuple[str, Tensor]] | None = None,
    random_directions: int = 2,
    seed: int = 0,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
    progress: ProgressCallback | None = None,
) -> Region:
    """Bracket the PL* region around the model's w₀ (module docstring).

    ``hessian_norm``: ε for the lower bound (e.g. the largest ‖H_F‖ :func:`plstar.certify` found);
    ``mu``: the PL* constant (default λ₀/2); ``directions``: (name, unit vector) pairs scanned to
    2‖w₀‖ besides the adversarial path, the segment toward 0 and ``random_directions`` random ones
    (``seed``). Cost: about 60 kernels per direction family, plus the path's descent directions.
    """
    search = RegionSearch(model, x, math.nan, memory_budget=memory_budget, output=output)
    lambda0 = search.lambda_min(search.w0)
    assign_parameters(model, search.w0)
    search.mu = mu_ = lambda0 / 2 if mu is None else float(mu)
    reach = float(search.w0.norm()) or 1.0
    generator = torch.Generator().manual_seed(seed)
    scans = [("toward zero", -search.w0 / reach, reach), *[(n, u, 2 * reach) for n, u in
             directions or []]]  # fmt: skip
    for i in range(random_directions):
        u = torch.randn(search.w0.shape, generator=generator, dtype=torch.float64)
        scans.append((f"random {i + 1}", u / u.norm(), 2 * reach))
    total = len(scans) + 1
    crossings = [search.descent_path()]
    if progress is not None:
        progress("PL* region: directions", 1, total)
    for i, (name, u, limit) in enumerate(scans):
        crossings.append(search.along(name, u, limit))
        if progress is not None:
            progress("PL* region: directions", i + 2, total)
    nk = search.outputs
    lower = theory.uniform_conditioning_radius(lambda0, mu_, hessian_norm, nk) if mu_ > 0 else 0.0
    upper = min(c.distance for c in crossings)
    return Region(lambda0, mu_, hessian_norm, lower, upper, crossings)
