"""The PL* condition at a point: the PL ratio, and :func:`analyze`, every figure of the summary.

``analyze`` composes the core: the tangent kernel and its spectrum give μ = λ_min(K(w₀)) (THEORY.md
item 1), Lanczos on loss HVPs gives β, and :mod:`plstar.theory` turns (L₀, μ, β) into the GD
theorem's radius, step, rate and step count (item 2). It measures at w₀ only; what holds on the
ball around w₀ is evidence until certified.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from plstar import theory
from plstar.curvature import (
    EigenEstimate,
    HessianNorm,
    loss_gradient,
    loss_sharpness,
    model_hessian_norm,
)
from plstar.errors import PlstarInputError
from plstar.functional import OutputSelector, ProgressCallback, check_targets, make_functional
from plstar.kernel import planned_tangent_kernel
from plstar.lanczos import lanczos
from plstar.matrix_free import KernelOperator
from plstar.model_checks import one_line
from plstar.planning import IMPLEMENTATIONS, Implementation
from plstar.spectrum import Spectrum, spectrum
from plstar.validation import callback, choice, floating_dtype, real_number, whole_number
from plstar.validation import memory_budget as check_budget
from plstar.validation import seed as check_seed

DENSE_SPECTRUM_LIMIT = 20_000
"""Largest n·k for which ``analyze`` forms K and solves it densely; beyond, Lanczos on products."""
HESSIAN_MIN_SECONDS = 0.2
"""‖H_F‖'s time budget in ``analyze`` is never below this, so a fast run still gets an estimate."""
HESSIAN_TOL, HESSIAN_ITERATIONS = 1e-4, 20
"""‖H_F‖ in ``analyze``: four digits, as the table prints, in at most 20 Lanczos steps per output
(a shorter basis than the solver's default lets more outputs share one batch)."""


def pl_ratio(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> float:
    """ρ(w) = ‖∇L(w)‖² / (2 L(w)) for L = ½‖F − y‖² (summed), at the model's current parameters.

    Since ½‖∇L‖² = ½ rᵀ K r, λ_min(K) ≤ ρ ≤ λ_max(K) (docs/theory.md). Cost: one forward and one
    reverse pass. ``output`` picks F from what the model returns (see :func:`plstar.tangent_kernel`).
    Raises PlstarInputError when L(w) = 0 (the ratio is 0/0 at an interpolating point).
    """
    loss, gradient = loss_gradient(model, x, y, memory_budget=memory_budget, output=output)
    if loss == 0.0:
        raise PlstarInputError("L(w) = 0: the model interpolates y and the PL ratio is 0/0")
    return float(gradient @ gradient) / (2.0 * loss)


@dataclass
class Analysis:
    """Every figure of ``plstar analyze`` at the current parameters w₀ (docs/theory.md conventions).

    A stage after the kernel that raised (β: "sharpness", ‖H_F‖: "model hessian") is listed in
    ``failed`` with its one-line error; its field is then None and the figures that need it (κ,
    R, η, rate, steps for β) are NaN, while everything measured before is kept.
    """

    n: int
    k: int
    m: int
    overparameterized: bool
    model_dtype: str
    implementation: str
    loss0: float
    kernel: Spectrum
    pl_ratio: float
    beta: EigenEstimate | None
    hessian_norm: HessianNorm | None
    mu: float
    kappa: float
    radius: float
    gd_step: float
    gd_rate: float
    target_loss: float
    steps_to_target: float
    lipschitz: float
    verdict: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def pl_star_at_w0(self) -> bool:
        """μ > 0: K(w₀) is non-singular within precision, so PL* holds at w₀ with μ = λ_min."""
        return self.mu > 0.0

    @property
    def at_global_minimum(self) -> bool:
        """L(w₀) = 0: w₀ interpolates y, a global minimum of L; ρ(w₀) is 0/0 and GD stays put."""
        return self.loss0 == 0.0

    @property
    def complete(self) -> bool:
        """Every stage ran (``failed`` is empty); converged or not, each figure has a value."""
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinities as the strings "inf"; a failed stage's field null)."""
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            out[key] = value
        out["pl_star_at_w0"] = self.pl_star_at_w0
        out["at_global_minimum"] = self.at_global_minimum
        out["complete"] = self.complete
        return json_safe(out)


def json_safe(value: Any) -> Any:
    """Dicts/lists of plain values with non-finite floats spelled "inf"/"-inf"/"nan" (strict JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


STAGE_NAMES = {"sharpness": "β (loss sharpness)", "model hessian": "‖H_F‖ (model Hessian norm)"}
_NEEDING = {"sharpness": "κ, R, η, rate and steps need it and are not given; "}


def _caveats(a: Analysis) -> list[str]:
    """Failed stages and estimates that stopped before their tolerance, in words."""
    lines = [
        f"{STAGE_NAMES.get(stage, stage)} could not be measured ({error}): "
        f"{_NEEDING.get(stage, '')}every other figure was measured."
        for stage, error in a.failed.items()
    ]
    for label, found in (("β", a.beta), ("‖H_F‖", a.hessian_norm)):
        if found is None or found.converged:
            continue
        text = (
            f"{label} stopped before converging (after {found.products} products): "
            f"{found.value:.4g} is a lower estimate, with residual bound {found.error_bound:.2g}"
        )
        if label == "‖H_F‖" and found.error_bound >= found.value:  # nothing resolved yet
            text += (
                ", larger than itself: not resolved in its time bound; give it more time "
                "(hessian_time_share, --hessian-time-share; 0 or None: no bound) or fewer outputs"
            )
        lines.append(text + ".")
    return lines


def _verdict(a: Analysis) -> list[str]:
    nk = a.n * a.k
    if a.at_global_minimum:
        return [
            "L(w₀) = 0: the model interpolates y at w₀, a global minimum of L. ∇L(w₀) = 0, so GD "
            "does not move and there is nothing to optimize; ρ(w₀) = 0/0 is undefined, R = 0, "
            "and the kernel figures describe the solution set at w₀.",
        ]
    if not a.overparameterized:
        return [
            f"PL* cannot hold: m = {a.m} < n·k = {nk}, so K = DF DFᵀ has rank ≤ m and "
            "λ_min(K) = 0 (docs/theory.md item 8); GD need not reach zero loss.",
        ]
    if not a.pl_star_at_w0:
        return [
            f"λ_min(K(w₀)) is zero within precision (floor {a.kernel.precision_floor:.2e}): "
            "no PL* certificate at w₀, although m ≥ n·k.",
        ]
    lines = [
        f"PL* holds at w₀ with μ = λ_min(K(w₀)) = {a.mu:.4g} (uniform conditioning, item 1).",
        f"If μ-PL* and β-smoothness hold on the ball of radius R = {a.radius:.4g} around w₀, GD with "
        f"η = 1/β = {a.gd_step:.3g} stays in it and L_t ≤ (1 − μ/β)^t L₀ with 1 − μ/β = "
        f"{a.gd_rate:.6g} (item 2)."
        if a.beta is not None
        else "Without β the GD theorem's radius, step and rate are not given (item 2).",
        "Measured at w₀ only: this is evidence for the ball, not a certificate of it.",
    ]
    if not (a.kernel.lambda_min or 0.0) <= a.pl_ratio * (1 + 1e-9) + a.kernel.error_bound:
        lines.append(
            "Warning: ρ(w₀) < λ_min(K) beyond the error bound; check the model for randomness."
        )
    return lines


def top_eigenvector(kernel: Any, *, assembled: bool, seed: int = 0) -> Tensor:
    """K's top eigenvector (N,) float64 on K's device, by Lanczos on ``kernel @ V`` (a Tensor, a
    :class:`plstar.KernelOperator` or a distributed kernel: anything with ``shape``, ``device``
    and ``@``); the warm start of β. An ``assembled`` K is cheap to multiply: 100 steps to 1e-10
    relative; products through the model: 60 to 1e-8."""
    iterations, tol = (100, 1e-10) if assembled else (60, 1e-8)
    return lanczos(
        lambda v: (kernel @ v.T).T, kernel.shape[0], max_iter=iterations, tol=tol, seed=seed,
        converge="max", device=kernel.device,
    ).vector_max[0]  # fmt: skip


def analyze(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    implementation: Implementation = "auto",
    dtype: torch.dtype = torch.float64,
    target_loss: float | None = None,
    hessian_outputs: int | None = 16,
    hessian_time_share: float | None = 0.35,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    precomputed: tuple[Spectrum, Tensor, str] | None = None,
    output: OutputSelector | None = None,
) -> Analysis:
    """Measure the PL* picture of ``model`` on (x, y) at its current parameters w₀.

    Computes L(w₀); K(w₀) and its extreme eigenvalues with error bounds (dense float64 when
    n·k ≤ 20,000, Lanczos on kernel products beyond); ρ(w₀); β = λ_max(H_L) by Lanczos; ‖H_F‖ over
    ``hessian_outputs`` randomly chosen outputs (None: all n·k) to a relative tolerance of 1e-4;
    then μ = λ_min(K) (0 if singular), κ = β/μ, and the GD theorem's R, η, rate and steps to
    ``target_loss`` (default 1e-6·L₀).
    Cost is dominated by the kernel (see :func:`plstar.tangent_kernel`): ‖H_F‖ may take at most
    ``hessian_time_share`` × the time of everything before it (default 0.35, so about a quarter of
    the run; never less than 0.2 s), after which its estimate is reported with ``converged``
    False and its residual bound; None lets it run to its tolerance (reproducible to the bit,
    where the time bound depends on the machine's speed). If β or ‖H_F‖ raises (a model whose
    second-order pass fails), the figures measured before are kept and the stage is listed in
    :attr:`Analysis.failed` (see :class:`Analysis`). ``precomputed`` = (the Spectrum of K(w₀),
    its unit top eigenvector (n·k,), the implementation's label) replaces the kernel's
    computation when it was made elsewhere (:func:`plstar.distributed.analyze`). ``output``
    picks F from what the model returns (see :func:`plstar.tangent_kernel`).
    """
    started = time.perf_counter()
    implementation = choice("implementation", implementation, IMPLEMENTATIONS)  # type: ignore[assignment]
    dtype = floating_dtype("dtype", dtype)
    if target_loss is not None:
        target_loss = real_number("target_loss", target_loss, minimum=0.0)
    if hessian_outputs is not None:
        hessian_outputs = whole_number("hessian_outputs (None for all)", hessian_outputs, minimum=1)
    if hessian_time_share is not None:
        hessian_time_share = real_number(
            "hessian_time_share (None for no bound)", hessian_time_share, minimum=0.0, strict=True
        )
    seed, memory_budget = check_seed(seed), check_budget(memory_budget)
    callback("progress", progress)
    fmodel = make_functional(model, x, memory_budget=memory_budget, output=output)
    output = fmodel.select
    y2 = check_targets(fmodel, x, y)
    n, k, m = x.shape[0], fmodel.k, fmodel.m
    eps_model = float(torch.finfo(fmodel.dtype).eps)
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    common = {"memory_budget": memory_budget, "output": output}

    def timed(name: str, fn: Any) -> Any:
        start = time.perf_counter()
        value = fn()
        seconds[name] = time.perf_counter() - start
        if progress is not None:
            progress(name, 1, 1)
        return value

    def late(name: str, fn: Any) -> Any:
        """A stage after K: if it raises, keep what was measured and say which stage failed."""
        try:
            return timed(name, fn)
        except Exception as error:  # any model's second-order pass may fail in its own way
            failed[name] = one_line(error)
            return None

    loss0, _ = timed("loss", lambda: loss_gradient(model, x, y2, **common))
    if precomputed is not None:
        kernel, top_vector, used = precomputed
    elif n * k <= DENSE_SPECTRUM_LIMIT:
        K, plan = timed(
            "tangent kernel",
            lambda: planned_tangent_kernel(
                model, x, implementation=implementation, dtype=dtype, progress=progress, **common
            ),
        )  # fmt: skip
        used = plan.implementation
        kernel = timed("kernel spectrum", lambda: spectrum(K, input_precision=eps_model))
        top_vector = top_eigenvector(K, assembled=True, seed=seed)
        del K
    else:
        chosen = {"structured": "structured", "jacobian": "ntvp", "ntvp": "ntvp"}
        op = KernelOperator(
            model, x, implementation=chosen.get(implementation, "auto"),  # type: ignore[arg-type]
            dtype=dtype, **common,
        )  # fmt: skip
        used = f"{op.implementation} operator"
        kernel = timed(
            "kernel spectrum", lambda: spectrum(op, input_precision=eps_model, tol=1e-8, seed=seed)
        )
        top_vector = top_eigenvector(op, assembled=False, seed=seed)
    rho = timed("pl ratio", lambda: pl_ratio(model, x, y2, **common)) if loss0 > 0 else math.nan

    def sharpness() -> EigenEstimate:
        # Warm start: DFᵀu for the top eigenvector u of K is the top eigenvector of the
        # Gauss–Newton part DFᵀDF of H_L, which dominates H_L near a good fit.
        gauss_newton = KernelOperator(model, x, implementation="ntvp", dtype=dtype, **common)
        v0 = gauss_newton.transpose_product(top_vector)
        return loss_sharpness(model, x, y2, v0=v0, seed=seed, **common)

    beta = late("sharpness", sharpness)
    limit = None
    if hessian_time_share is not None:
        limit = max(HESSIAN_MIN_SECONDS, hessian_time_share * (time.perf_counter() - started))
    hess = late(
        "model hessian",
        lambda: model_hessian_norm(
            model, x, outputs=hessian_outputs, tol=HESSIAN_TOL, max_iter=HESSIAN_ITERATIONS,
            seed=seed, time_budget=limit, **common,
        ),
    )  # fmt: skip
    overparameterized = theory.is_overparameterized(m, n * k)
    lambda_min = kernel.lambda_min if kernel.lambda_min is not None else 0.0
    mu = 0.0 if kernel.is_singular or not overparameterized else theory.pl_constant(lambda_min)
    target = target_loss if target_loss is not None else 1e-6 * loss0
    nan = math.nan
    if beta is not None:
        b = beta.value
        rate = theory.gd_rate(b, mu) if mu > 0 else 1.0
        radius = 0.0 if loss0 == 0 else theory.gd_radius(b, mu, loss0) if mu > 0 else math.inf
        kappa, step = (b / mu if mu > 0 else math.inf), theory.gd_step_size(b)
        steps = theory.steps_to_loss(loss0, target, rate)
    else:
        rate = radius = kappa = step = steps = nan
    analysis = Analysis(
        n=n, k=k, m=m, overparameterized=overparameterized,
        model_dtype=str(fmodel.dtype).replace("torch.", ""), implementation=used,
        loss0=loss0, kernel=kernel, pl_ratio=rho, beta=beta, hessian_norm=hess, mu=mu,
        kappa=kappa, radius=radius, gd_step=step, gd_rate=rate, target_loss=target,
        steps_to_target=steps, lipschitz=math.sqrt(max(kernel.lambda_max or 0.0, 0.0)),
        seconds=seconds, failed=failed,
    )  # fmt: skip
    analysis.verdict = _verdict(analysis) + _caveats(analysis)
    return analysis
