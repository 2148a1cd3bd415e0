"""Second-order quantities by Hessian-vector products, never by dense m×m Hessians.

* :func:`loss_sharpness` — β at w: λ_max of H_L = DFᵀDF + Σ_j r_j H_{F_j} for L = ½‖F − y‖² (summed).
* :func:`loss_hessian_min` — an upper bound θ_min on λ_min(H_L): negative curvature, when < 0.
* :func:`model_hessian_norm` — ‖H_F‖ = max_j ‖H_{F_j}‖₂ over the outputs F_j = f_a(w; x_i).
* :func:`per_sample_smoothness` — β_s ≥ max_i λ_max(H_ℓi), the per-sample smoothness SGD needs.

Products are forward-over-reverse (``jvp`` of ``grad``), run in the model's dtype and accumulated by
Lanczos in float64. The loss is written out as ``0.5 * ((f - y) ** 2).sum()``: ``nn.MSELoss`` breaks
``jvp(grad)`` in torch 2.13 ("ZeroTensors are immutable", ARCHITECTURE.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from plstar.devices import model_device
from plstar.functional import (
    FunctionalModel,
    OutputSelector,
    Params,
    check_targets,
    chunks,
    differentiable_attention,
    jacobian_matrix,
    make_functional,
)
from plstar.lanczos import lanczos
from plstar.output_hessians import OutputLanczos, select_outputs
from plstar.planning import activation_bytes_per_sample, default_memory_budget
from plstar.validation import memory_budget as check_budget
from plstar.validation import positive_tolerance, real_number, whole_number
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
    converged: bool = True
    """False when Lanczos stopped (iteration cap or time budget) before its tolerance was met:
    ``value`` is then still a Rayleigh quotient, with ``error_bound`` its explicit residual."""

    def __float__(self) -> float:
        return self.value

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "vector"}


@dataclass(frozen=True)
class HessianNorm(EigenEstimate):
    """‖H_F‖ = max_j ‖H_{F_j}‖₂ over the examined outputs, with the output that attains it.

    ``outputs_examined < outputs_total`` means a subset was examined (chosen at random, or cut
    short by a time budget): the value is then the maximum over that subset, a lower bound on the
    maximum over all outputs.
    """

    argmax_output: int = 0
    outputs_examined: int = 0
    outputs_total: int = 0


def _setup(
    model: nn.Module, x: Tensor, output: OutputSelector | None = None
) -> tuple[FunctionalModel, Tensor]:
    fmodel = make_functional(model, x, output=output)
    return fmodel, (x.to(fmodel.dtype) if x.is_floating_point() else x)


def _sample_block(
    fmodel: FunctionalModel, x: Tensor, memory_budget: int | None, factor: int
) -> int:
    budget = check_budget(memory_budget) or default_memory_budget(fmodel.device)
    per_sample = factor * activation_bytes_per_sample(fmodel, x)
    return int(max(1, min(x.shape[0], budget // per_sample)))


def loss_value(fmodel: FunctionalModel, params: Params, x: Tensor, y: Tensor) -> Tensor:
    """L = ½‖F(w; x) − y‖², summed over samples and outputs (no 1/n)."""
    return 0.5 * ((fmodel(params, x) - y) ** 2).sum()


class LossGradient:
    """L = ½‖F − y‖² and ∇L at the model's current parameters, prepared once for repeated calls.

    Validates (model, x, y) and sizes the sample blocks at construction; each call is then one
    forward and one reverse pass in blocks, through the module's own parameters, so it follows
    in-place updates (a training loop); ``output`` picks F from what the module returns, as in
    :func:`plstar.make_functional`. Memory ≈ 3 · block · activations per sample.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        memory_budget: int | None = None,
        output: OutputSelector | None = None,
    ) -> None:
        fmodel, self.x = _setup(model, x, output)
        self.model, self.y = model, check_targets(fmodel, self.x, y)
        self.output, self.pick = fmodel.select, fmodel.pick
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.block = _sample_block(fmodel, self.x, memory_budget, 3)

    def __call__(self, index: Tensor | None = None) -> tuple[float, list[Tensor]]:
        """(L, ∇L as per-parameter tensors in the model dtype) over all samples or ``index``."""
        x, y = (self.x, self.y) if index is None else (self.x[index], self.y[index])
        total, grads = 0.0, [torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            for rows in chunks(x.shape[0], self.block):
                residual = self.pick(self.model(x[rows])).reshape(y[rows].shape) - y[rows]
                loss = 0.5 * (residual**2).sum()
                # materialize: a parameter F does not use (output= picked around it) has ∇ = 0
                parts = torch.autograd.grad(
                    loss, self.params, allow_unused=True, materialize_grads=True
                )
                torch._foreach_add_(grads, parts)
                total += 0.5 * float((residual.detach().double() ** 2).sum())
        return total, grads

    def loss(self) -> float:
        """L over all samples, forward passes only."""
        with torch.no_grad():
            parts = [self.pick(self.model(self.x[r])).reshape(self.y[r].shape) - self.y[r]
                     for r in chunks(self.x.shape[0], self.block)]  # fmt: skip
            return 0.5 * sum(float((part.double() ** 2).sum()) for part in parts)


def flat(grads: list[Tensor]) -> Tensor:
    """Per-parameter tensors -> one (m,) float64 vector, in plstar's flattening order."""
    return torch.cat([g.reshape(-1) for g in grads]).double()


def loss_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> tuple[float, Tensor]:
    """(L(w), ∇L(w)) with ∇L = DFᵀ r flattened to (m,) float64; one reverse pass in sample blocks.
    ``output`` picks F from what the model returns (see :func:`plstar.tangent_kernel`)."""
    loss, grads = LossGradient(model, x, y, memory_budget=memory_budget, output=output)()
    return loss, flat(grads)


def loss_hvp(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> tuple[int, Any]:
    """(m, hvp) where hvp(V (b, m) float64) -> H_L V (b, m) float64, summed over sample blocks.
    Forward over reverse, so attention runs on its differentiable (math) backend."""
    fmodel, x = _setup(model, x, output)
    y = check_targets(fmodel, x, y)
    block = _sample_block(fmodel, x, memory_budget, 6)

    def one(vector: Tensor) -> Tensor:
        tangent = fmodel.unflatten(vector)
        total = torch.zeros(fmodel.m, dtype=torch.float64, device=fmodel.device)
        for rows in chunks(x.shape[0], block):
            gradient = grad(lambda p, rows=rows: loss_value(fmodel, p, x[rows], y[rows]))
            total += fmodel.flatten(jvp(gradient, (fmodel.params,), (tangent,))[1]).double()
        return total

    def hvp(vectors: Tensor) -> Tensor:
        with differentiable_attention():
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
    output: OutputSelector | None = None,
) -> EigenEstimate:
    """β at w: the largest eigenvalue of the loss Hessian H_L (L = ½‖F − y‖², summed).

    Lanczos on Hessian-vector products until the relative residual is ≤ ``tol``. ``v0`` (m,) warm
    start, e.g. the Gauss–Newton direction DFᵀu for the top eigenvector u of K; a zero v0 (DF = 0,
    e.g. f = (w·x)² at w = 0) starts at random, and a v0 inside an invariant subspace of H_L is
    followed by a random restart, so a vanishing warm start never reports β = 0 for H_L ≠ 0.
    Cost: ≤ ``max_iter`` HVPs, each ≈ 4 passes over the data. Memory: 2 · iterations · m float64,
    with the iterations capped so that it fits ``memory_budget``. ``output`` picks F from what the
    model returns (see :func:`plstar.tangent_kernel`).
    """
    tol, seed = positive_tolerance("tol", tol), check_seed(seed)
    max_iter = whole_number("max_iter", max_iter, minimum=1)
    m, hvp = loss_hvp(model, x, y, memory_budget=memory_budget, output=output)
    device = model_device(model)
    budget = check_budget(memory_budget) or default_memory_budget(device)
    max_iter = _iterations_within(budget, m, max_iter)
    result = lanczos(
        hvp, m, 1, v0=v0, max_iter=max_iter, tol=tol, seed=seed, converge="max", device=device
    )
    value, error = float(result.theta_max[0]), float(result.residual_max[0])
    return EigenEstimate(
        value=value,
        error_bound=error,
        products=result.iterations,
        vector=result.vector_max[0],
        converged=result.iterations < max_iter or error <= tol * abs(value),
    )


def loss_hessian_min(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    v0: Tensor | None = None,
    seed: int = 0,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> EigenEstimate:
    """θ_min: the smallest Ritz value of H_L after ``steps`` Lanczos steps on −H_L (L summed).

    A Rayleigh quotient, so λ_min(H_L) ≤ θ_min: a negative θ_min proves that H_L has a negative
    eigenvalue (L is not convex at w); a non-negative one proves nothing. ``error_bound`` is the
    explicit residual ‖H_L s − θ_min s‖, ``vector`` s the unit Ritz vector (a warm start for a
    neighbouring point); ``v0`` (m,) warm-starts, else the start is drawn with ``seed``.
    Cost: ``steps`` HVPs (≈ 4 passes over the data each); memory 2·steps·m float64.
    """
    steps = whole_number("steps", steps, minimum=1)
    m, hvp = loss_hvp(model, x, y, memory_budget=memory_budget, output=output)
    result = lanczos(
        lambda v: -hvp(v), m, 1, v0=v0, max_iter=steps, tol=1e-10, seed=check_seed(seed),
        converge="max", device=model_device(model),
    )  # fmt: skip
    value, error = -float(result.theta_max[0]), float(result.residual_max[0])
    return EigenEstimate(
        value=value, error_bound=error, products=result.iterations, vector=result.vector_max[0],
        converged=error <= 1e-10 * abs(value),
    )  # fmt: skip


def _iterations_within(budget: int, m: int, wanted: int) -> int:
    """Lanczos steps whose basis (steps · m float64) fits the budget; never fewer than 10, since the
    residual bound then says how far from converged the estimate is."""
    return int(min(wanted, max(10, budget // (16 * m) - 4)))


def model_hessian_norm(
    model: nn.Module,
    x: Tensor,
    *,
    outputs: int | list[int] | Tensor | None = None,
    tol: float = 1e-6,
    max_iter: int = 40,
    seed: int = 0,
    memory_budget: int | None = None,
    time_budget: float | None = None,
    output: OutputSelector | None = None,
) -> HessianNorm:
    """‖H_F‖ = max_j ‖H_{F_j}‖₂, with j = i*k + a running over the n·k outputs (docs/theory.md).

    Each H_{F_j} involves sample i only, so batches of outputs run as independent Lanczos problems
    side by side (vmap over samples); an output whose Lanczos has converged costs no further
    products. ``outputs``: None = all n·k; an int = that many chosen at random with ``seed`` (the
    result is then the maximum over that subset); or explicit indices. Every estimate is a Rayleigh
    quotient, a lower bound on its output's norm; ``converged`` says whether the one reported met
    ``tol`` (residual ≤ tol·value), ``error_bound`` is its explicit residual.
    ``time_budget`` (seconds, None = none): batches of outputs run in turn, Lanczos stopping
    before a step that would end after the budget, and no batch starts whose first product would
    (``outputs_examined`` says how many ran). Fewer outputs examined well rather than each for a
    step or two: Lanczos needs a few steps to see the top of a Hessian from a random start (on
    the default ``plstar analyze``, 16 outputs reach 0.039, 0.207, 0.275, 0.2935 of a true
    0.2981 after 2, 3, 4, 6 steps; starting from the gradients ∇F_j gains little).
    ``output`` picks F from what the model returns (see :func:`plstar.tangent_kernel`); second
    order, so attention runs on its math backend. Cost: ≤ max_iter per-sample HVPs per output.
    Memory: 2 · max_iter · m float64 per output in flight, batched under ``memory_budget``.
    """
    tol, seed = positive_tolerance("tol", tol), check_seed(seed)
    max_iter = whole_number("max_iter", max_iter, minimum=1)
    if time_budget is not None:
        time_budget = real_number("time_budget (seconds)", time_budget, minimum=0.0, strict=True)
    started = time.perf_counter()
    fmodel, x = _setup(model, x, output)
    total = x.shape[0] * fmodel.k
    chosen = select_outputs(total, outputs, seed)
    budget = check_budget(memory_budget) or default_memory_budget(fmodel.device)
    run = OutputLanczos(fmodel, x, _iterations_within(budget, fmodel.m, max_iter), tol, seed)
    end = None if time_budget is None else started + time_budget
    norms, errors, products, examined = run(chosen, budget, end)
    position = int(torch.argmax(norms))
    value, error = float(norms[position]), float(errors[position])
    return HessianNorm(
        value, error, products, converged=error <= tol * value,
        argmax_output=int(chosen[position]), outputs_examined=examined, outputs_total=total,
    )  # fmt: skip


def per_sample_smoothness(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    hessian_outputs: int | None = 4,
    seed: int = 0,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> float:
    """Estimate β_s ≥ max_i λ_max(H_ℓi) at w₀ for ℓ_i = ½‖f(w; x_i) − y_i‖², as SGD's theory needs.

    H_ℓi = J_iᵀJ_i + Σ_a r_ia H_{f_a(x_i)}, so λ_max(H_ℓi) ≤ λ_max(K_ii) + ‖r_i‖₁·‖H_F‖ with
    K_ii = J_iJ_iᵀ the (k × k) diagonal block of the tangent kernel (Gauss–Newton term, exact) and
    ‖H_F‖ measured over ``hessian_outputs`` random outputs (a lower estimate of the maximum; None:
    all n·k outputs, then the value is a bound at w₀).
    An estimate at w₀, not a bound on a ball. Cost: n·k reverse passes (Jacobian rows in blocks)
    plus the ‖H_F‖ Lanczos runs; memory: one block of rows, c·k·m float64, within the budget.
    """
    fmodel = make_functional(model, x, output=output)
    y2 = check_targets(fmodel, x, y)
    xs = x.to(fmodel.dtype) if x.is_floating_point() else x
    n, k = x.shape[0], fmodel.k
    budget = check_budget(memory_budget) or default_memory_budget(fmodel.device)
    block = max(1, min(n, budget // (3 * 8 * k * fmodel.m)))
    gauss_newton, residual = torch.empty(2, n, dtype=torch.float64, device=fmodel.device)
    for rows in chunks(n, block):
        jac = jacobian_matrix(fmodel, xs[rows], torch.float64).reshape(-1, k, fmodel.m)
        gauss_newton[rows] = torch.linalg.eigvalsh(jac @ jac.transpose(1, 2))[:, -1]
        with torch.no_grad():
            r = fmodel(fmodel.params, xs[rows]).double() - y2[rows].double()
        residual[rows] = r.abs().sum(dim=1)
    hess = model_hessian_norm(
        model, x, outputs=hessian_outputs, seed=seed, memory_budget=memory_budget, output=output
    )
    return float((gauss_newton + residual * hess.value).max())
