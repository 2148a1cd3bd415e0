"""What :func:`plstar.landscape.landscape` returns: the grid, its points and the slice.

Points are plain frozen dataclasses that go to JSON with :func:`dataclasses.asdict` and come back
with ``from_dict`` (the store of ``plstar landscape --resume`` keeps them so); :class:`Landscape`
lays any field out on its grid (:meth:`Landscape.values`) for figures and checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
from torch import Tensor

from plstar.conditions import json_safe
from plstar.directions import Direction
from plstar.errors import PlstarInputError
from plstar.validation import whole_number

__all__ = ["KernelPoint", "Landscape", "LandscapeGrid", "LossPoint", "point_key"]


def point_key(index: tuple[int, ...]) -> str:
    """A grid index as the key of stored points: (3, 7) -> "3,7"; () -> "origin"."""
    return ",".join(map(str, index)) if index else "origin"


@dataclass(frozen=True)
class LandscapeGrid:
    """Coordinates per direction: ``axes`` for L and ρ, ``kernel_axes`` for λ_min(K) and H_L
    (empty: no coarse grid). Point (i, j) is w + axes[0][i]·u + axes[1][j]·v."""

    axes: tuple[tuple[float, ...], ...]
    kernel_axes: tuple[tuple[float, ...], ...] = ()

    @classmethod
    def regular(
        cls, spans: Sequence[tuple[float, float]], points: int = 21, kernel_points: int = 11
    ) -> LandscapeGrid:
        """``points`` (≥ 2) evenly spaced coordinates over each (low, high) of ``spans`` (one per
        direction), and ``kernel_points`` (0 = none, else ≥ 2) over the same spans."""
        points = whole_number("points", points, minimum=2)
        kernel_points = whole_number("kernel_points", kernel_points, minimum=0)
        if not 1 <= len(spans) <= 2:
            raise PlstarInputError(f"one span (a line) or two (a plane), got {len(spans)}")
        if kernel_points == 1:
            raise PlstarInputError("kernel_points must be 0 (no coarse grid) or at least 2")
        for low, high in spans:
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise PlstarInputError(f"a span must be finite with low < high, got {low}:{high}")

        def line(low: float, high: float, count: int) -> tuple[float, ...]:
            return tuple(float(c) for c in np.linspace(low, high, count))

        return cls(tuple(line(lo, hi, points) for lo, hi in spans),
                   tuple(line(lo, hi, kernel_points) for lo, hi in spans) if kernel_points else ())  # fmt: skip

    @property
    def dims(self) -> int:
        return len(self.axes)

    def indices(self, coarse: bool = False) -> list[tuple[int, ...]]:
        """Every index of the fine (or coarse) grid, row-major."""
        axes = self.kernel_axes if coarse else self.axes
        return (
            [tuple(int(i) for i in index) for index in np.ndindex(*map(len, axes))] if axes else []
        )

    def coords(self, index: tuple[int, ...], coarse: bool = False) -> tuple[float, ...]:
        """The coordinates of a fine (or coarse) index; () is w itself, all zeros."""
        axes = self.kernel_axes if coarse else self.axes
        return tuple(axes[d][i] for d, i in enumerate(index)) if index else (0.0,) * self.dims


@dataclass(frozen=True)
class LossPoint:
    """L, ‖∇L‖ and ρ = ‖∇L‖²/(2L) (NaN where L = 0) at grid point ``index`` (``coords``)."""

    index: tuple[int, ...]
    coords: tuple[float, ...]
    loss: float
    gradient_norm: float
    pl_ratio: float

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LossPoint:
        return cls(**_typed(cls, data))


@dataclass(frozen=True)
class KernelPoint:
    """What a coarse point measured: L and ρ; λ_min(K) (0 when zero within precision) ±
    ``lambda_min_error`` and λ_max(K); θ_min ≥ λ_min(H_L) after the Lanczos steps with its
    residual (NaN when no steps were asked for); ``negative_curvature``: θ_min < 0 beyond rounding
    (−θ_min > 10³·ε of the model dtype·max(|θ_min|, λ_max(K))), a proof that H_L has a negative
    eigenvalue; None when not measured. ``index`` () is w itself, measured apart when the coarse
    grid misses it."""

    index: tuple[int, ...]
    coords: tuple[float, ...]
    loss: float
    pl_ratio: float
    lambda_min: float
    lambda_min_error: float
    lambda_max: float
    hessian_min: float
    hessian_min_residual: float
    negative_curvature: bool | None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KernelPoint:
        return cls(**_typed(cls, data))


def _typed(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """A stored point's fields back in their types (tuples; "nan"/"inf" strings as floats)."""
    values: dict[str, Any] = {}
    for item in fields(cls):
        value = data[item.name]
        if item.name in ("index", "coords"):
            value = tuple(int(v) if item.name == "index" else float(v) for v in value)
        elif item.name == "negative_curvature":
            value = None if value is None else bool(value)
        else:
            value = float(value)
        values[item.name] = value
    return values


@dataclass
class Landscape:
    """A line or plane of L through w with its annotations (module docstring).

    ``loss_points`` and ``kernel_points`` are keyed by :func:`point_key`; ``origin`` is the coarse
    measurement at w (None without a coarse grid); ``computed`` counts the points this call
    evaluated (the others came from ``known``).
    """

    directions: list[Direction]
    grid: LandscapeGrid
    loss_points: dict[str, LossPoint]
    kernel_points: dict[str, KernelPoint]
    origin: KernelPoint | None
    n: int
    k: int
    m: int
    hessian_steps: int
    hessian_start: Tensor | None = field(default=None, repr=False)
    computed: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def values(self, name: str) -> np.ndarray:
        """One field as an array on its grid: LossPoint fields on the fine grid (``axes``),
        KernelPoint fields on the coarse one (``kernel_axes``); shape (len(axes[0]),) for a line,
        (len(axes[0]), len(axes[1])) for a plane, entry [i, j] at (axes[0][i], axes[1][j]); NaN
        where not measured (booleans as 0/1)."""
        known = ({f.name for f in fields(LossPoint)} | {f.name for f in fields(KernelPoint)}) - {
            "index", "coords"}  # fmt: skip
        if name not in known:
            raise PlstarInputError(f"no field {name!r}; choose one of {', '.join(sorted(known))}")
        coarse = name not in {f.name for f in fields(LossPoint)}
        axes = self.grid.kernel_axes if coarse else self.grid.axes
        points = self.kernel_points if coarse else self.loss_points
        found = np.full(tuple(map(len, axes)), np.nan)
        for point in points.values():
            value = getattr(point, name)
            found[point.index] = np.nan if value is None else float(value)
        return found

    def kernel_held(self, fraction: float = 0.5) -> int:
        """Coarse points where λ_min(K) ≥ fraction·λ₀, λ₀ = λ_min(K(w)) at the origin: where
        the kernel stays as well conditioned as PL* with μ = fraction·λ₀ needs (0 without an
        origin or when λ₀ ≤ 0)."""
        if self.origin is None or not self.origin.lambda_min > 0:
            return 0
        return int(np.sum(self.values("lambda_min") >= fraction * self.origin.lambda_min))

    def bracket_violations(self) -> int:
        """Coarse points where λ_min(K) ≤ ρ ≤ λ_max(K) fails (½‖∇L‖² = ½ rᵀKr puts the PL
        ratio between the extremes of K): λ_min taken at its lower error bar, relative slack of
        1e-9 and 2e-9 for rounding; points with ρ NaN (L = 0) are not counted. A correct run has
        none."""
        return sum(
            1 for p in self.kernel_points.values()
            if math.isfinite(p.pl_ratio) and not p.lambda_min - p.lambda_min_error
            <= p.pl_ratio * (1 + 1e-9) <= p.lambda_max * (1 + 2e-9)
        )  # fmt: skip

    @property
    def cosine(self) -> float | None:
        """cos ∠(u, v) of a plane's directions (None for a line): the axes are drawn as if 0."""
        if len(self.directions) < 2:
            return None
        u, v = (d.vector for d in self.directions)
        return float(u @ v / (u.norm() * v.norm()))

    def to_dict(self) -> dict[str, Any]:
        """Every point and the set-up, JSON-safe (NaN and ±inf as strings)."""
        return json_safe({
            "n": self.n, "k": self.k, "m": self.m, "hessian_steps": self.hessian_steps,
            "directions": [{"kind": d.kind, "label": d.label, "description": d.description,
                            "norm": d.norm} for d in self.directions],
            "cosine": self.cosine, "axes": [list(a) for a in self.grid.axes],
            "kernel_axes": [list(a) for a in self.grid.kernel_axes],
            "origin": None if self.origin is None else asdict(self.origin),
            "loss_points": [asdict(p) for p in self.loss_points.values()],
            "kernel_points": [asdict(p) for p in self.kernel_points.values()],
            "computed": self.computed, "seconds": self.seconds,
        })  # fmt: skip
