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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import assign_parameters, certify, flat_parameters, lambda_min_descent
from plstar.conditions import json_safe
from plstar.curvature import loss_gradient
from plstar.devices import direction_generator, host_normal
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, ProgressCallback
from plstar.kernel import tangent_kernel

__all__ = [
    "Crossing",
    "CrossoverFit",
    "Region",
    "RegionCertificate",
    "RegionSearch",
    "certify_region",
    "fit_crossover",
    "pl_region",
]  # fmt: skip

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
    generator = direction_generator(seed)  # not the stream the model's weights came from
    scans = [("toward zero", -search.w0 / reach, reach), *[(n, u, 2 * reach) for n, u in
             directions or []]]  # fmt: skip
    for i in range(random_directions):
        u = host_normal(search.w0.shape, generator, search.w0.device)
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


@dataclass
class RegionCertificate:
    """The GD theorem's ball against the PL* region (μ = λ₀/2) of one model, and the verdict.

    ``radius`` is R = 2√(2βL₀)/μ with β(w₀), the smallest ball the theorem could use (a crossing
    inside it refutes); ``radius_ball`` uses the largest λ_max(H_L) found on that ball, the ball
    the theorem needs (Hessian control covering it confirms). ``certificate`` is the sampled ball
    (:func:`plstar.certify`), ``region`` the bracket (:func:`pl_region`).
    """

    m: int
    n: int
    k: int
    loss0: float
    lambda0: float
    mu: float
    beta_w0: float
    beta_ball: float
    radius: float
    radius_ball: float
    hessian_norm: float
    region: Region
    sampled_points: int
    verdict: list[str] = field(default_factory=list)

    @property
    def lower(self) -> float:
        return self.region.lower

    @property
    def upper(self) -> float:
        return self.region.upper

    def to_dict(self) -> dict[str, Any]:
        """A plain dict: figures as floats (``upper`` is ∞ when no crossing was found, so pass it
        through :func:`plstar.conditions.json_safe` before writing JSON), the region JSON-safe."""
        data = {k: v for k, v in asdict(self).items() if k != "region"}
        return data | {"lower": self.lower, "upper": self.upper, "region": self.region.to_dict()}


def certify_region(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    directions: int = 2,
    hessian_outputs: int | None = 4,
    seed: int = 0,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
    progress: ProgressCallback | None = None,
) -> RegionCertificate:
    """Does the GD theorem's hypothesis hold on its own ball for this model? (THEORY items 1, 2, 4)

    λ₀ = λ_min(K(w₀)) and μ = λ₀/2; :func:`plstar.certify` samples B(w₀, R) (shells ½ and 1,
    ``directions`` random directions besides the gradient and λ_min descent) for ε, the largest
    ‖H_F‖, and the largest λ_max(H_L); :func:`pl_region` brackets the region (the gradient,
    the segment toward 0, the adversarial path and ``directions`` random ones); the verdict
    compares the bracket with R. Raises PlstarInputError when λ₀ ≤ 0 (PL* fails at w₀).
    Cost: a dense eigh of K, :func:`plstar.certify`, and :func:`pl_region`.
    """
    common: dict[str, Any] = {"memory_budget": memory_budget, "output": output}
    lambda0 = float(torch.linalg.eigvalsh(tangent_kernel(model, x, **common))[0])
    if not lambda0 > 0:
        raise PlstarInputError(
            f"λ_min(K(w₀)) = {lambda0:.3g} ≤ 0: PL* fails at w₀ itself (fewer parameters than "
            "n·k, or duplicated samples); there is no region to certify"
        )
    mu = lambda0 / 2
    cert = certify(model, x, y, mu=mu, samples=directions, shells=(0.5, 1.0),
                   hessian_outputs=hessian_outputs, seed=seed, progress=progress, **common)  # fmt: skip
    beta_ball = max(cert.sharpness_max, cert.beta)
    _, gradient = loss_gradient(model, x, y, **common)
    toward = [("gradient", -gradient / gradient.norm())] if float(gradient.norm()) > 0 else []
    region = pl_region(model, x, hessian_norm=cert.hessian_norm, mu=mu, directions=toward,
                       random_directions=directions, seed=seed, progress=progress, **common)  # fmt: skip
    found = RegionCertificate(
        m=cert.m, n=cert.n, k=cert.k, loss0=cert.loss0, lambda0=lambda0, mu=mu,
        beta_w0=cert.beta, beta_ball=beta_ball,
        radius=theory.gd_radius(cert.beta, mu, cert.loss0),
        radius_ball=theory.gd_radius(beta_ball, mu, cert.loss0),
        hessian_norm=cert.hessian_norm, region=region, sampled_points=cert.sampled_points,
    )  # fmt: skip
    found.verdict = _verdict(region, found.radius, found.radius_ball)
    return found


def _verdict(region: Region, radius: float, radius_ball: float) -> list[str]:
    """The bracket against R, in words (see :class:`RegionCertificate` for the two radii)."""
    lower, upper = region.lower, region.upper
    worst = min(region.crossings, key=lambda c: c.distance)
    lines = []
    if radius_ball > radius * (1 + 1e-9):
        lines.append(
            "β is not constant on the ball: λ_max(H_L) found there exceeds β(w₀), so the "
            f"theorem's R grows from {radius:.4g} (β at w₀) to {radius_ball:.4g}."
        )
    if upper < radius:
        return [
            f"The theorem does not apply at this width: λ_min(K) < μ = λ₀/2 at distance "
            f"{upper:.4g} from w₀ ({worst.name}), inside even the smallest ball the theorem could "
            f"use, R = {radius:.4g} (β at w₀): {radius / upper:.3g}× larger than the PL* region "
            "found.",
            f"Hessian control with the largest ‖H_F‖ found (ε = {region.hessian_norm:.3g}) keeps "
            f"λ_min(K) ≥ μ only up to {lower:.4g}.",
            *lines,
        ]
    found = "no point with λ_min(K) < μ was found" if math.isinf(upper) else (
        f"the nearest point with λ_min(K) < μ is at {upper:.4g} ({worst.name})"
    )  # fmt: skip
    if lower >= radius_ball:
        return [
            f"The theorem applies at this width, if ‖H_F‖ ≤ ε = {region.hessian_norm:.3g} on the "
            f"ball (ε is the largest value sampled): Hessian control keeps λ_min(K) ≥ μ up to "
            f"{lower:.4g}, {lower / radius_ball:.3g}× R = {radius_ball:.4g}; {found}.",
            *lines,
        ]
    return [
        f"Undecided at this width: {found}, so nothing inside R = {radius:.4g} refutes PL* with "
        f"μ = λ₀/2 — evidence, not proof; Hessian control (ε = {region.hessian_norm:.3g}, the "
        f"largest ‖H_F‖ found) covers only {lower:.4g}, {radius_ball / max(lower, 1e-300):.3g}× "
        f"short of R = {radius_ball:.4g}.",
        *lines,
    ]


@dataclass(frozen=True)
class CrossoverFit:
    """log r = intercept + slope·log width, and the width where r reaches ``radius``: ``width``
    (∞ when r does not grow), ``width_range`` from ±1 standard error of both coefficients (None
    with two points, where the fit has no error, or when the slope is within 1 s.e. of 0)."""

    slope: float
    slope_error: float | None
    intercept: float
    radius: float
    width: float
    width_range: tuple[float, float] | None


def fit_crossover(
    widths: Sequence[float], values: Sequence[float], radius: float
) -> CrossoverFit | None:
    """Least-squares power law of ``values`` (a radius of the PL* region) against ``widths``, over
    the finite positive values, and the width where it reaches ``radius`` (None with fewer than
    two such values)."""
    w, v = np.asarray(widths, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(v) & (v > 0)
    if keep.sum() < 2:
        return None
    logs, logv = np.log(w[keep]), np.log(v[keep])
    if keep.sum() > 2:
        (slope, intercept), cov = np.polyfit(logs, logv, 1, cov=True)
        errors: tuple[float, float] | None = tuple(np.sqrt(np.clip(np.diag(cov), 0, None)))  # type: ignore[assignment]
    else:
        slope, intercept = np.polyfit(logs, logv, 1)
        errors = None
    slope, intercept, target = float(slope), float(intercept), math.log(radius)
    width = math.exp((target - intercept) / slope) if slope > 0 else math.inf
    span = None
    if errors is not None and slope - errors[0] > 0:
        corners = [math.exp((target - (intercept + di)) / (slope + ds))
                   for ds in (-errors[0], errors[0]) for di in (-errors[1], errors[1])]  # fmt: skip
        span = (min(corners), max(corners))
    return CrossoverFit(slope, None if errors is None else float(errors[0]), intercept, radius,
                        width, span)  # fmt: skip
