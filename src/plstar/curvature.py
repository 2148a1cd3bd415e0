"""Second-order quantities by Hessian-vector products, never by dense m×m Hessians.

* :func:`loss_sharpness` — β at w: λ_max of H_L = DFᵀDF + Σ_j r_j H_{F_j} for L = ½‖F − y‖² (summed).
* :func:`model_hessian_norm` — ‖H_F‖ = max_j ‖H_{F_j}‖₂ over the outputs F_j = f_a(w; x_i).

Products are forward-over-reverse (``jvp`` of ``grad``), run in the model's dtype and accumulated by
Lanczos in float64. The loss is written out as ``0.5 * ((f - y) ** 2).sum()``: ``nn.MSELoss`` breaks
``jvp(grad)`` in torch 2.13 ("ZeroTensors are immutable", ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from plstar.errors import PlstarInputError
from plstar.functional import FunctionalModel, Params, check_targets, chunks, make_functional
from plstar.lanczos import lanczos
from plstar.planning import activation_bytes_per_sample, default_memory_budget
from plstar.validation import memory_budget as check_budget
from plstar.validation import positive_tolerance, whole_number
from plstar.validation import seed as check_seed


@dataclass(frozen=True)
class EigenEstimate:
    """One extreme eigenvalue with the explicit residual bound of its Ritz pair.

    ``value`` is a Rayleigh quotient, so it never exceeds the true λ_max (a lower bound on it);
    some eigenvalue lies within ``error_bound`` of it. ``products`` counts operator applications.
    """

    value: float
    error_bound: float
    products: int
    vector: Tensor | None = field(default=None, repr=False, compare=False)
    """The unit Ritz vector (m,) float64, for warm starts (None for ‖H_F‖)."""

    def __float__(self) -> float:
        return self.value

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "vector"}


@dataclass(frozen=True)
class HessianNorm(EigenEstimate):
    """‖H_F‖ = max_j ‖H_{F_j}‖₂ over the examined outputs, with the output that attains it.

    ``outputs_examined < outputs_total`` means a random subset was examined: the value is then the
    maximum over that subset, a lower bound on the maximum over all outputs.
    """

    argmax_output: int = 0
    outputs_examined: int = 0
    outputs_total: int = 0


def _setup(model: nn.Module, x: Tensor) -> tuple[FunctionalModel, Tensor]:
    fmodel = make_functional(model, x)
    return fmodel, (x.to(fmodel.dtype) if x.is_floating_point() else x)


def _sample_block(
    fmodel: FunctionalModel, x: Tensor, memory_budget: int | None, factor: int
) -> int:
    budget = check_budget(memory_budget) or default_memory_budget()
    per_sample = factor * activation_bytes_per_sample(fmodel, x)
    return int(max(1, min(x.shape[0], budget // per_sample)))


def loss_value(fmodel: FunctionalModel, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """L = ½‖F(w; x) − y‖², summed over samples and outputs (no 1/n)."""
    return 0.5 * ((fmodel(params, x) - y) ** 2).sum()


class LossGradient:
    """L = ½‖F − y‖² and ∇L at the model's current parameters, prepared once for repeated calls.

    Validates (model, x, y) and sizes the sample blocks at construction; each call is then one
    forward and one reverse pass in blocks, through the module's own parameters, so it follows
    in-place updates (a training loop). Memory ≈ 3 · block · activations per sample.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, *, memory_budget: int | None = None):
        fmodel, self.x = _setup(model, x)
        self.model, self.y = model, check_targets(fmodel, self.x, y)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.block = _sample_block(fmodel, self.x, memory_budget, 3)

    def __call__(self, index: Tensor | None = None) -> tuple[float, list[Tensor]]:
        """(L, ∇L as per-parameter tensors in the model dtype) over all samples or ``index``."""
        x, y = (self.x, self.y) if index is None else (self.x[index], self.y[index])
        total, grads = 0.0, [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            for rows in chunks(x.shape[0], self.block):
                residual = self.model(x[rows]).reshape(y[rows].shape) - y[rows]
                loss = 0.5 * (residual**2).sum()
                torch._foreach_add_(grads, torch.autograd.grad(loss, self.params))
                total += 0.5 * float((residual.detach().double() ** 2).sum())
        return total, grads

    def loss(self) -> float:
        """L over all samples, forward passes only."""
        with torch.no_grad():
            parts = [self.model(self.x[r]).reshape(self.y[r].shape) - self.y[r]
                     for r in chunks(self.x.shape[0], self.block)]  # fmt: skip
            return 0.5 * sum(float((part.double() ** 2).sum()) for part in parts)


def flat(grads: list[Tensor]) -> Tensor:
    """Per-parameter tensors -> one (m,) float64 vector, in plstar's flattening order."""
    return torch.cat([g.reshape(-1) for g in grads]).double()


def loss_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, memory_budget: int | None = None
) -> tuple[float, Tensor]:
    """(L(w), ∇L(w)) with ∇L = DFᵀ r flattened to (m,) float64; one reverse pass in sample blocks."""
    loss, grads = LossGradient(model, x, y, memory_budget=memory_budget)()
    return loss, flat(grads)


def loss_hvp(
    model: nn.Module, x: Tensor, y: Tensor, *, memory_budget: int | None = None
) -> tuple[int, Any]:
    """(m, hvp) where hvp(V (b, m) float64) -> H_L V (b, m) float64, summed over sample blocks."""
    fmodel, x = _setup(model, x)
    y = check_targets(fmodel, x, y)
    block = _sample_block(fmodel, x, memory_budget, 6)

    def one(vector: Tensor) -> Tensor:
        tangent, total = fmodel.unflatten(vector), torch.zeros(fmodel.m, dtype=torch.float64)
        for rows in chunks(x.shape[0], block):
            gradient = grad(lambda p, rows=rows: loss_value(fmodel, p, x[rows], y[rows]))
            total += fmodel.flatten(jvp(gradient, (fmodel.params,), (tangent,))[1]).double()
        return total

    def hvp(vectors: Tensor) -> Tensor:
        return torch.stack([one(v) for v in vectors])

    return fmodel.m, hvp


def loss_sharpness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    v0: Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 60,
    seed: int = 0,
    memory_budget: int | None = None,
) -> EigenEstimate:
    """β at w: the largest eigenvalue of the loss Hessian H_L (L = ½‖F − y‖², summed).

    Lanczos on Hessian-vector products until the relative residual is ≤ ``tol``. ``v0`` (m,) warm
    start, e.g. the Gauss–Newton direction DFᵀu for the top eigenvector u of K; a zero v0 (DF = 0,
    e.g. f = (w·x)² at w = 0) starts at random, and a v0 inside an invariant subspace of H_L is
    followed by a random restart, so a vanishing warm start never reports β = 0 for H_L ≠ 0.
    Cost: ≤ ``max_iter`` HVPs, each ≈ 4 passes over the data. Memory: 2 · iterations · m float64,
    with the iterations capped so that it fits ``memory_budget``.
    """
    tol, seed = positive_tolerance("tol", tol), check_seed(seed)
    max_iter = whole_number("max_iter", max_iter, minimum=1)
    m, hvp = loss_hvp(model, x, y, memory_budget=memory_budget)
    budget = check_budget(memory_budget) or default_memory_budget()
    max_iter = _iterations_within(budget, m, max_iter)
    result = lanczos(hvp, m, 1, v0=v0, max_iter=max_iter, tol=tol, seed=seed, converge="max")
    return EigenEstimate(
        value=float(result.theta_max[0]),
        error_bound=float(result.residual_max[0]),
        products=result.iterations,
        vector=result.vector_max[0],
    )


def _iterations_within(budget: int, m: int, wanted: int) -> int:
    """Lanczos steps whose basis (steps · m float64) fits the budget; never fewer than 10, since the
    residual bound then says how far from converged the estimate is."""
    return int(min(wanted, max(10, budget // (16 * m) - 4)))


def _select_outputs(total: int, outputs: int | list[int] | Tensor | None, seed: int) -> np.ndarray:
    if outputs is None:
        return np.arange(total)
    if isinstance(outputs, int | np.integer | bool):
        count = whole_number("outputs (a count; None for all)", outputs, minimum=1)
        if count >= total:
            return np.arange(total)
        return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    try:
        given = torch.as_tensor(outputs).cpu()
    except (TypeError, ValueError, RuntimeError):
        given = None
    if (
        given is None
        or given.is_floating_point()
        or given.is_complex()
        or given.dtype == torch.bool
    ):
        raise PlstarInputError(
            f"outputs must be None, a count, or integer output indices; got {type(outputs).__name__}"
        )
    chosen = np.asarray(given, dtype=np.int64).reshape(-1)
    if chosen.size == 0 or chosen.min() < 0 or chosen.max() >= total:
        raise PlstarInputError(
            f"output indices must lie in [0, {total}), got {chosen.tolist()[:8]}"
        )
    return chosen


def model_hessian_norm(
    model: nn.Module,
    x: Tensor,
    *,
    outputs: int | list[int] | Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 40,
    seed: int = 0,
    memory_budget: int | None = None,
) -> HessianNorm:
    """‖H_F‖ = max_j ‖H_{F_j}‖₂, with j = i*k + a running over the n·k outputs (THEORY.md).

    Each H_{F_j} involves sample i only, so batches of outputs run as independent Lanczos problems
    side by side (vmap over samples). ``outputs``: None = all n·k; an int = that many chosen at
    random with ``seed`` (the result is then the maximum over that subset); or explicit indices.
    Cost: ≤ max_iter per-sample HVPs per output. Memory: 2 · max_iter · m float64 per output
    in flight, batched under ``memory_budget``.
    """
    tol, seed = positive_tolerance("tol", tol), check_seed(seed)
    max_iter = whole_number("max_iter", max_iter, minimum=1)
    fmodel, x = _setup(model, x)
    k, total = fmodel.k, x.shape[0] * fmodel.k
    chosen = _select_outputs(total, outputs, seed)
    budget = check_budget(memory_budget) or default_memory_budget()
    max_iter = _iterations_within(budget, fmodel.m, max_iter)
    batch = int(max(1, min(len(chosen), budget // ((2 * max_iter + 6) * fmodel.m * 8))))

    def output_hvp(params: Params, xi: Tensor, direction: Tensor, tangent: Params) -> Params:
        gradient = grad(lambda p: (fmodel.single(p, xi) * direction).sum())
        return jvp(gradient, (params,), (tangent,))[1]

    batched_hvp = vmap(output_hvp, in_dims=(None, 0, 0, 0))
    best, best_error, best_index, products = -1.0, 0.0, int(chosen[0]), 0
    for start in range(0, len(chosen), batch):
        indices = chosen[start : start + batch]
        samples = x[torch.as_tensor(indices // k)]
        directions = torch.eye(k, dtype=fmodel.dtype)[torch.as_tensor(indices % k)]

        def matvec(vectors: Tensor, samples=samples, directions=directions) -> Tensor:
            tangents = fmodel.unflatten(vectors)
            out = batched_hvp(fmodel.params, samples, directions, tangents)
            return fmodel.flatten(out, batch=len(vectors)).double()

        result = lanczos(matvec, fmodel.m, len(indices), max_iter=max_iter, tol=tol, seed=seed)
        products += result.iterations
        top_is_max = result.theta_max.abs() >= result.theta_min.abs()
        norms = torch.where(top_is_max, result.theta_max.abs(), result.theta_min.abs())
        errors = torch.where(top_is_max, result.residual_max, result.residual_min)
        position = int(torch.argmax(norms))
        if float(norms[position]) > best:
            best, best_error = float(norms[position]), float(errors[position])
            best_index = int(indices[position])
    return HessianNorm(
        value=best,
        error_bound=best_error,
        products=products,
        argmax_output=best_index,
        outputs_examined=len(chosen),
        outputs_total=total,
    )
