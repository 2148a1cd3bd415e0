"""Slices of the loss landscape through w, annotated with the PL* map (THEORY items 1, 8).

L(w + a·u) along a line, or L(w + a·u + b·v) on a plane, for L = ½‖F − y‖² (summed), on a grid
of coordinates; the directions come from :mod:`plstar.directions`. Every grid point also carries
ρ = ‖∇L‖²/(2L), the PL ratio, which needs a gradient per point. A coarser grid carries what costs
a kernel or Hessian products per point:

* λ_min(K(w)), the PL* map: uniform conditioning (item 1) gives PL* with μ = λ_min(K) at that
  point, and λ_min(K) ≤ ρ ≤ λ_max(K) holds at every point (a check of both computations);
* the smallest Ritz value θ_min of H_L after a few Lanczos steps (``hessian_steps``), each
  point started from one vector, H_L's bottom Ritz vector at w (:func:`hessian_start_vector`:
  neighbouring points share their negative curvature closely, and one start keeps a point's
  value independent of the order of the visit). θ_min is a Rayleigh quotient, so λ_min(H_L) ≤
  θ_min: θ_min < 0 proves a negative eigenvalue of H_L there (L is not convex at that point,
  item 8), while θ_min ≥ 0 proves nothing — more steps may find negative curvature.

Loss and gradient points are evaluated in batches of parameter sets with ``torch.func`` (vmap
over points), the coarse points one by one at the model (moved there and always put back: the
same Parameter objects with the same values, whatever stops the run). ``known`` points (from an
earlier, interrupted run) are not recomputed; ``on_points`` receives new points as they come.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from plstar.certify import (
    assign_parameters,
    flat_parameters,
    kernel_spectrum,
    lambda_min_within_precision,
)
from plstar.costs import activation_bytes_per_sample
from plstar.curvature import loss_gradient, loss_hessian_min
from plstar.directions import Direction
from plstar.errors import PlstarInputError
from plstar.functional import (
    FunctionalModel,
    OutputSelector,
    ProgressCallback,
    check_targets,
    chunks,
    differentiable_attention,
    make_functional,
)
from plstar.landscape_results import (
    KernelPoint,
    Landscape,
    LandscapeGrid,
    LossPoint,
    point_key,
)
from plstar.planning import default_memory_budget
from plstar.validation import memory_budget as check_budget
from plstar.validation import seed as check_seed
from plstar.validation import whole_number

__all__ = [
    "KernelPoint", "Landscape", "LandscapeGrid", "LossPoint", "hessian_start_vector", "landscape",
]  # fmt: skip

MAX_POINTS_PER_BATCH = 32
"""Grid points per vmapped batch at most: more saves nothing measurable and delays the store."""
LOSS_PHASE = "L and ρ on the grid"
KERNEL_PHASE = "λ_min(K) and H_L on the coarse grid"


# ----------------------------------------------------------------------------- fine grid
def _loss_batch(
    fmodel: FunctionalModel, x: Tensor, y: Tensor, points: Tensor, rows_per_block: int
) -> tuple[Tensor, Tensor]:
    """(L, ‖∇L‖) at B parameter vectors ``points`` (B, m) float64, each (B,) float64: vmap over
    points of one gradient per block of samples; point by point where a module has no batching
    rule. Cost: B forward and reverse passes; memory ≈ 3·B·rows·activations + 3·B·m numbers."""
    params = fmodel.unflatten(points)
    batch = points.shape[0]
    total = torch.zeros(batch, dtype=torch.float64, device=points.device)
    gradient = torch.zeros(batch, fmodel.m, dtype=torch.float64, device=points.device)
    for rows in chunks(x.shape[0], rows_per_block):

        def loss(p: dict[str, Tensor], rows: slice = rows) -> tuple[Tensor, Tensor]:
            residual = fmodel(p, x[rows]) - y[rows]
            # the value summed in float64 whatever the model's dtype, as LossGradient does
            return 0.5 * (residual**2).sum(), 0.5 * (residual.detach().double() ** 2).sum()

        with differentiable_attention():
            try:
                parts, values = vmap(grad(loss, has_aux=True))(params)
            except RuntimeError:  # an operation without a batching rule
                each = [grad(loss, has_aux=True)({n: t[b] for n, t in params.items()})
                        for b in range(batch)]  # fmt: skip
                parts = {n: torch.stack([e[0][n] for e in each]) for n in params}
                values = torch.stack([e[1] for e in each])
        gradient += fmodel.flatten(parts, batch).double()
        total += values
    return total, gradient.norm(dim=1)


def _batch_sizes(fmodel: FunctionalModel, x: Tensor, budget: int) -> tuple[int, int]:
    """(points per batch, samples per block) whose working memory fits ``budget``."""
    per_sample = 3 * activation_bytes_per_sample(fmodel, x)
    per_point = 4 * 8 * fmodel.m  # the point, its parameters, its gradient parts and the sum
    n = x.shape[0]
    points = max(1, min(MAX_POINTS_PER_BATCH, budget // (per_point + n * per_sample)))
    return points, max(1, min(n, (budget - points * per_point) // (points * per_sample)))


# ----------------------------------------------------------------------------- coarse grid
def _kernel_point(
    model: nn.Module, x: Tensor, y: Tensor, index: tuple[int, ...], coords: tuple[float, ...],
    hessian_steps: int, hessian_start: Tensor | None, seed: int, common: dict[str, Any],
    fine: LossPoint | None,
) -> KernelPoint:  # fmt: skip
    """Measure a coarse point at the model's current parameters (the caller moved it there); L
    and ρ are taken from ``fine``, the fine grid's point at the same coordinates, when there is
    one (a coarse grid of every other point has all its points there)."""
    if fine is None:
        loss, gradient = loss_gradient(model, x, y, **common)
        ratio = float(gradient @ gradient) / (2 * loss) if loss > 0 else math.nan
    else:
        loss, ratio = fine.loss, fine.pl_ratio
    found = kernel_spectrum(model, x, seed=seed, **common)
    lambda_max = found.lambda_max or math.nan
    low = residual = math.nan
    negative = None
    if hessian_steps:
        bottom = loss_hessian_min(model, x, y, steps=hessian_steps, v0=hessian_start, seed=seed,
                                  **common)  # fmt: skip
        low, residual = bottom.value, bottom.error_bound
        # rounding in the HVPs is relative to the largest curvature, which λ_max(K) ≈ ‖DFᵀDF‖ sets
        eps = float(torch.finfo(next(model.parameters()).dtype).eps)
        negative = low < -1e3 * eps * max(abs(low), abs(lambda_max))
    return KernelPoint(
        index=index, coords=coords, loss=loss, pl_ratio=ratio,
        lambda_min=lambda_min_within_precision(found),
        lambda_min_error=found.lambda_min_error or 0.0, lambda_max=lambda_max,
        hessian_min=low, hessian_min_residual=residual, negative_curvature=negative,
    )  # fmt: skip


def hessian_start_vector(
    model: nn.Module, x: Tensor, y: Tensor, steps: int = 16, *, seed: int = 0,
    memory_budget: int | None = None, output: OutputSelector | None = None,
) -> Tensor:  # fmt: skip
    """The warm start of every coarse point's Lanczos: H_L's bottom Ritz vector (m,) float64 at
    the model's w after ``steps`` steps from a random start (``seed``). One vector for all points,
    so a point's values do not depend on the order the grid is visited in (or on a resume).
    Cost: ``steps`` HVPs."""
    bottom = loss_hessian_min(model, x, y, steps=steps, seed=seed, memory_budget=memory_budget,
                              output=output)  # fmt: skip
    assert bottom.vector is not None  # loss_hessian_min always returns its Ritz vector
    return bottom.vector


# ----------------------------------------------------------------------------- the slice
def landscape(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    directions: Sequence[Direction],
    grid: LandscapeGrid,
    *,
    hessian_steps: int = 4,
    hessian_start: Tensor | None = None,
    seed: int = 0,
    known: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    on_points: Callable[[str, list[LossPoint | KernelPoint]], None] | None = None,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
    progress: ProgressCallback | None = None,
) -> Landscape:
    """L, ρ (every grid point), λ_min(K) and H_L's θ_min (coarse grid) on a line (one direction)
    or plane (two) through the model's current parameters w (module docstring).

    ``directions``: from :func:`plstar.directions.make_directions`; ``grid``: coordinates per
    direction (:meth:`LandscapeGrid.regular`); ``hessian_steps``: Lanczos steps on H_L per coarse
    point (0 = none), each started from ``hessian_start`` (default :func:`hessian_start_vector`
    at w, 4·hessian_steps HVPs, kept in ``Landscape.hessian_start``); ``seed``: random starts. ``known``: {"loss": {key: point dict},
    "kernel": {...}} of points measured before (the dicts of :func:`dataclasses.asdict`), not
    recomputed; ``on_points(kind, points)`` is called with each batch of new points ("loss" or
    "kernel"). The model is moved to each coarse point and always put back at w (same Parameter
    objects and values, also on an exception or Ctrl-C).
    Cost: a forward and reverse pass per grid point (vmapped in batches); per coarse point, one
    tangent kernel with its dense eigenvalues (Lanczos beyond n·k = 20,000), ``hessian_steps``
    HVPs, and a gradient where the fine grid has no point at the same coordinates; plus the point w when the coarse grid misses it. Memory: the budget
    (default :func:`plstar.default_memory_budget`) bounds a batch of points.
    """
    started = time.perf_counter()
    if len(directions) != grid.dims:
        raise PlstarInputError(f"{len(directions)} direction(s) for a grid of {grid.dims} axes")
    hessian_steps = whole_number("hessian_steps", hessian_steps, minimum=0)
    common: dict[str, Any] = {"memory_budget": memory_budget, "output": output}
    fmodel = make_functional(model, x, **common)
    result = Landscape(
        list(directions), grid, {}, {}, None, x.shape[0], fmodel.k, fmodel.m, hessian_steps,
        hessian_start=hessian_start, computed={"loss": 0, "kernel": 0},
    )  # fmt: skip
    plane = _Slice(model, fmodel, x, y, result, check_seed(seed), common)
    stored = known or {}
    plane.fine(stored.get("loss", {}), on_points, progress)
    plane.coarse(stored.get("kernel", {}), on_points, progress)
    result.seconds = time.perf_counter() - started
    return result


class _Slice:
    """The evaluation of one :func:`landscape` call: w, the directions as a basis, the data."""

    def __init__(
        self, model: nn.Module, fmodel: FunctionalModel, x: Tensor, y: Tensor, result: Landscape,
        seed: int, common: dict[str, Any],
    ) -> None:  # fmt: skip
        self.model, self.fmodel, self.x, self.y = model, fmodel, x, y
        self.result, self.seed, self.common = result, seed, common
        self.xs = x.to(fmodel.dtype) if x.is_floating_point() else x
        self.ys = check_targets(fmodel, self.xs, y)
        self.w0 = flat_parameters(model)
        for d in result.directions:
            if d.vector.shape != self.w0.shape:
                raise PlstarInputError(
                    f"direction {d.label} has shape {tuple(d.vector.shape)}, w has "
                    f"{tuple(self.w0.shape)}"
                )
        self.basis = torch.stack(
            [d.vector.to(self.w0.device, torch.float64) for d in result.directions]
        )  # (r, m); fmt: skip

    def position(self, coords: Sequence[tuple[float, ...]]) -> Tensor:
        """w + Σ_d c_d·direction_d for each row of ``coords``: (B, m) float64."""
        c = torch.tensor(coords, dtype=torch.float64, device=self.w0.device)
        return self.w0.double() + c @ self.basis

    def fine(
        self, stored: Mapping[str, Mapping[str, Any]], on_points: Callable[..., None] | None,
        progress: ProgressCallback | None,
    ) -> None:  # fmt: skip
        """L, ‖∇L‖ and ρ at every grid point not in ``stored``, in vmapped batches."""
        grid, result = self.result.grid, self.result
        pending = []
        for index in grid.indices():
            key = point_key(index)
            if key in stored:
                result.loss_points[key] = LossPoint.from_dict(stored[key])
            else:
                pending.append(index)
        budget = check_budget(self.common["memory_budget"])
        budget = budget or default_memory_budget(self.fmodel.device)
        per_batch, rows = _batch_sizes(self.fmodel, self.xs, budget)
        total = len(grid.indices())
        for start in range(0, len(pending), per_batch):
            batch = pending[start : start + per_batch]
            coords = [grid.coords(i) for i in batch]
            losses, norms = _loss_batch(self.fmodel, self.xs, self.ys, self.position(coords), rows)
            new = [LossPoint(i, c, float(v), float(g), float(g) ** 2 / (2 * float(v)) if v > 0
                             else math.nan)
                   for i, c, v, g in zip(batch, coords, losses, norms, strict=True)]  # fmt: skip
            result.loss_points.update({point_key(p.index): p for p in new})
            result.computed["loss"] += len(new)
            if on_points is not None:
                on_points("loss", new)
            if progress is not None:
                progress(LOSS_PHASE, len(result.loss_points), total)

    def coarse(
        self, stored: Mapping[str, Mapping[str, Any]], on_points: Callable[..., None] | None,
        progress: ProgressCallback | None,
    ) -> None:  # fmt: skip
        """λ_min(K), ρ and H_L's bottom at every coarse point not in ``stored`` (and at w when
        the coarse grid misses it), the model moved there and always put back at w."""
        grid, result, steps = self.result.grid, self.result, self.result.hessian_steps
        coarse = grid.indices(coarse=True)
        fine_at = {p.coords: p for p in result.loss_points.values()}
        if coarse and not any(all(c == 0.0 for c in grid.coords(i, True)) for i in coarse):
            coarse = [(), *coarse]
        try:
            for done, index in enumerate(coarse, start=1):
                key = point_key(index)
                if key in stored:
                    point = KernelPoint.from_dict(stored[key])
                else:
                    if steps and result.hessian_start is None:  # the model is still at w
                        result.hessian_start = hessian_start_vector(
                            self.model, self.x, self.y, 4 * steps, seed=self.seed, **self.common
                        )
                    coords = grid.coords(index, coarse=True)
                    assign_parameters(self.model, self.position([coords])[0])
                    point = _kernel_point(self.model, self.x, self.y, index, coords, steps,
                                          result.hessian_start, self.seed, self.common,
                                          fine_at.get(coords))  # fmt: skip
                    result.computed["kernel"] += 1
                    if on_points is not None:
                        on_points("kernel", [point])
                if index:
                    result.kernel_points[key] = point
                if all(c == 0.0 for c in point.coords):
                    result.origin = point
                if progress is not None:
                    progress(KERNEL_PHASE, done, len(coarse))
        finally:
            assign_parameters(self.model, self.w0)
