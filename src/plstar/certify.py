"""PL* on a ball: sampled evidence and the Hessian-control bound around w₀ (THEORY.md items 2, 4).

:func:`certify` measures the PL* picture at w₀ (:func:`plstar.analyze`), takes the GD theorem's ball
B(w₀, R) with R = 2√(2βL₀)/μ (item 2) unless a radius is given, and evaluates λ_min(K(w)), ρ(w),
‖H_F(w)‖ and λ_max(H_L(w)) at points on shells of that ball. Sampled points are evidence, never a
proof: a ball has infinitely many points and random directions in ℝ^m are nearly orthogonal to the
few that matter, so two informed directions are always added — the gradient direction (where GD
goes first) and the direction in which λ_min(K) falls fastest. The Hessian-control bound (item 4)
turns the largest ‖H_F‖ found into a lower bound on λ_min(K) over the whole ball, which would be a
proof if ‖H_F‖ ≤ ε held everywhere on it; ε is itself sampled, and the verdict says so.

Also home of the parameter-vector helpers and the full-kernel spectrum shared by
:mod:`plstar.monitor` and :mod:`plstar.train` (and, re-exported, of
:func:`plstar.curvature.per_sample_smoothness`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import grad, jvp

from plstar import theory
from plstar.conditions import DENSE_SPECTRUM_LIMIT, analyze, json_safe
from plstar.curvature import loss_gradient, loss_sharpness, model_hessian_norm
from plstar.curvature import per_sample_smoothness as per_sample_smoothness  # re-exported
from plstar.devices import direction_generator, host_normal
from plstar.errors import PlstarInputError
from plstar.functional import (
    OutputSelector,
    ProgressCallback,
    check_targets,
    chunks,
    differentiable_attention,
    make_functional,
)
from plstar.kernel import tangent_kernel
from plstar.matrix_free import KernelOperator
from plstar.planning import activation_bytes_per_sample, default_memory_budget
from plstar.spectrum import Spectrum, spectrum
from plstar.validation import describe, real_number, whole_number


# ----------------------------------------------------------------------------- shared helpers
def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters in plstar's flattening order (tied parameters once), as tensors."""
    return [p for p in model.parameters() if p.requires_grad]


def flat_parameters(model: nn.Module) -> Tensor:
    """w: the trainable parameters as one detached (m,) copy, in the order of ∇L and DF's columns."""
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model)])


def assign_parameters(model: nn.Module, w: Tensor) -> None:
    """Write the flat vector w (m,) into the model's trainable parameters, in place."""
    params = trainable_parameters(model)
    if w.numel() != sum(p.numel() for p in params):
        raise PlstarInputError(
            f"w has {w.numel()} entries, the model {sum(p.numel() for p in params)}"
        )
    with torch.no_grad():
        start = 0
        for p in params:
            p.copy_(w[start : start + p.numel()].reshape(p.shape))
            start += p.numel()


def kernel_spectrum(
    model: nn.Module,
    x: Tensor,
    *,
    implementation: str = "auto",
    memory_budget: int | None = None,
    seed: int = 0,
    output: OutputSelector | None = None,
) -> Spectrum:
    """Extreme eigenvalues of the full K(w) = DF DFᵀ at the current parameters, float64.

    Dense (formed kernel, eigvalsh) when n·k ≤ 20,000, as :func:`plstar.analyze` does; beyond, Lanczos
    on matrix-free products. Cost: one tangent kernel plus (n·k)³/3 flops, or ≤ 300 kernel products.
    """
    fmodel, common = make_functional(model, x, output=output), {"memory_budget": memory_budget}
    eps, common["output"] = float(torch.finfo(fmodel.dtype).eps), fmodel.select
    if x.shape[0] * fmodel.k <= DENSE_SPECTRUM_LIMIT:
        K = tangent_kernel(model, x, implementation=implementation, **common)  # type: ignore[arg-type]
        return spectrum(K, input_precision=eps)
    return spectrum(KernelOperator(model, x, **common), input_precision=eps, tol=1e-8, seed=seed)


def lambda_min_within_precision(found: Spectrum) -> float:
    """λ_min as plstar reports it: 0.0 when zero within precision, never a small positive number."""
    return 0.0 if found.is_singular else float(found.lambda_min or 0.0)


def lambda_min_descent(
    model: nn.Module,
    x: Tensor,
    *,
    memory_budget: int | None = None,
    output: OutputSelector | None = None,
) -> Tensor | None:
    """Unit direction (m,) float64 in which λ_min(K(w)) decreases fastest at w, or None.

    With u the bottom eigenvector of K and v = DFᵀu, ∇_w (uᵀK(w)u) = 2 ∇_w ⟨u, DF(w) v⟩ (v held
    fixed), a forward-over-reverse product summed over sample blocks. None when K is too large to
    diagonalize densely or the gradient vanishes (a linear model: K is constant).
    Cost: one dense eigh of K (n·k ≤ 20,000) plus ≈ 4 passes over the data.
    """
    fmodel = make_functional(model, x, output=output)
    n, k = x.shape[0], fmodel.k
    if n * k > DENSE_SPECTRUM_LIMIT:
        return None
    xs = x.to(fmodel.dtype) if x.is_floating_point() else x
    common = {"memory_budget": memory_budget, "output": output}
    u = torch.linalg.eigh(tangent_kernel(model, x, **common))[1][:, 0]
    v = fmodel.unflatten(KernelOperator(model, x, **common).transpose_product(u))
    u_rows = u.reshape(n, k).to(fmodel.dtype)
    budget = memory_budget if memory_budget is not None else default_memory_budget(fmodel.device)
    block = max(1, min(n, budget // (6 * activation_bytes_per_sample(fmodel, xs))))
    total = torch.zeros(fmodel.m, dtype=torch.float64, device=fmodel.device)
    for rows in chunks(n, block):

        def pairing(params: dict[str, Tensor], rows: slice = rows) -> Tensor:
            tangent = jvp(lambda p: fmodel(p, xs[rows]), (params,), (v,))[1]
            return (u_rows[rows] * tangent).sum()

        with differentiable_attention():  # forward over reverse
            total += fmodel.flatten(grad(pairing)(fmodel.params)).double()
    norm = float(total.norm())
    if not math.isfinite(norm) or norm <= 1e-12 * max(1.0, float(flat_parameters(model).norm())):
        return None
    return -total / norm


# ----------------------------------------------------------------------------- certificate
@dataclass(frozen=True)
class BallPoint:
    """One evaluated point w = w₀ + distance·d of the ball, with what was measured there.

    ``lambda_min``/``lambda_max``: extremes of K(w) (float64, ``lambda_min_error`` absolute; 0
    when zero within precision);
    ``pl_ratio`` ρ(w) (NaN where L(w) = 0); ``hessian_norm`` ‖H_F(w)‖ over the examined outputs;
    ``sharpness`` λ_max(H_L(w)); ``violates``: λ_min(K(w)) + error < μ.
    """

    direction: str
    fraction: float
    distance: float
    loss: float
    pl_ratio: float
    lambda_min: float
    lambda_min_error: float
    lambda_max: float
    hessian_norm: float
    sharpness: float
    violates: bool


@dataclass
class Certificate:
    """PL* evidence on B(w₀, R): what :func:`certify` checked, and what it implies (THEORY.md).

    ``mu``: the PL* constant checked (default λ₀ = λ_min(K(w₀))); ``radius``: R of the ball
    (``radius_source`` "gd theorem" or "given"); ``points`` include w₀ (fraction 0);
    ``violations``: points with λ_min(K) < μ; ``hessian_norm``: ε, the largest ‖H_F‖ found;
    ``kernel_bound``: item 4's sharp lower bound on λ_min(K) over the ball given ε;
    ``conditioning_radius``: the largest radius on which that bound stays ≥ μ.
    """

    n: int
    k: int
    m: int
    loss0: float
    lambda0: float
    lambda0_error: float
    mu: float
    beta: float
    radius: float
    radius_source: str
    points: list[BallPoint]
    violations: int
    worst: BallPoint
    hessian_norm: float
    kernel_bound: float
    hessian_control_implies_conditioning: bool
    conditioning_radius: float
    sharpness_max: float
    verdict: list[str] = field(default_factory=list)

    @property
    def sampled_points(self) -> int:
        """Points evaluated besides w₀."""
        return sum(1 for p in self.points if p.fraction > 0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (infinities and NaN as strings)."""
        return json_safe(asdict(self) | {"sampled_points": self.sampled_points})


def _measure(
    model: nn.Module, x: Tensor, y: Tensor, direction: str, fraction: float, distance: float,
    mu: float, hessian_outputs: int | None, warm: Tensor | None, seed: int,
    common: dict[str, Any],
) -> tuple[BallPoint, Tensor | None]:  # fmt: skip
    loss, gradient = loss_gradient(model, x, y, **common)
    kernel = kernel_spectrum(model, x, seed=seed, **common)
    hess = model_hessian_norm(model, x, outputs=hessian_outputs, seed=seed, **common)
    # Warm-started from the previous point's top vector: neighbouring points share it closely.
    sharp = loss_sharpness(model, x, y, v0=warm, tol=1e-4, seed=seed, **common)
    lam, err = lambda_min_within_precision(kernel), kernel.lambda_min_error or 0.0
    point = BallPoint(
        direction=direction, fraction=fraction, distance=distance, loss=loss,
        pl_ratio=float(gradient @ gradient) / (2 * loss) if loss > 0 else math.nan,
        lambda_min=lam, lambda_min_error=err, lambda_max=kernel.lambda_max or 0.0,
        hessian_norm=hess.value, sharpness=sharp.value, violates=lam + err < mu,
    )  # fmt: skip
    return point, sharp.vector


def _directions(
    model: nn.Module, x: Tensor, y: Tensor, samples: int, seed: int, common: dict[str, Any]
) -> list[tuple[str, Tensor]]:
    """Unit directions (m,) float64: −∇L(w₀), the λ_min-descent direction, then random ones."""
    found: list[tuple[str, Tensor]] = []
    _, gradient = loss_gradient(model, x, y, **common)
    if float(gradient.norm()) > 0:
        found.append(("gradient", -gradient / gradient.norm()))
    descent = lambda_min_descent(model, x, **common)
    if descent is not None:
        found.append(("lambda_min descent", descent))
    generator = direction_generator(seed)  # not the stream the model's weights came from
    m = gradient.numel()
    for i in range(samples):
        d = host_normal((m,), generator, gradient.device)
        found.append((f"random {i + 1}", d / d.norm()))
    return found


def certify(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radius: float | None = None,
    mu: float | None = None,
    samples: int = 4,
    shells: Sequence[float] = (0.25, 0.5, 1.0),
    hessian_outputs: int | None = 4,
    seed: int = 0,
    memory_budget: int | None = None,
    progress: ProgressCallback | None = None,
    output: OutputSelector | None = None,
) -> Certificate:
    """Check PL* on the ball B(w₀, R) around the model's current parameters w₀, by sampling.

    R is the GD theorem's 2√(2βL₀)/μ (THEORY.md item 2; β = λ_max(H_L(w₀))) unless ``radius`` is
    given; μ defaults to λ₀ = λ_min(K(w₀)). Points: w₀, and w₀ + s·R·d for each shell fraction s
    and each unit direction d — ``samples`` random ones (``seed``), −∇L(w₀), and the direction of
    steepest descent of λ_min(K) (when n·k ≤ 20,000). At each point: L, ρ, λ_min/λ_max(K),
    ‖H_F‖ over ``hessian_outputs`` random outputs, and λ_max(H_L). The model's parameters are
    restored afterwards, also on error.
    Cost: :func:`plstar.analyze` plus, per point, one kernel and its spectrum, one Lanczos for
    ‖H_F‖ and one for β: (samples + 2)·len(shells) points; ‖H_F‖ runs to its tolerance at every
    point, w₀ included (no time bound), so ε is comparable across points. ``output`` picks F from
    what the model returns (see :func:`plstar.tangent_kernel`). Raises PlstarInputError for
    samples < 0, shell fractions outside (0, 1], a radius that is negative or not finite, or a
    model whose β or ‖H_F‖ cannot be measured at w₀.
    """
    samples = whole_number("samples", samples, minimum=0)
    if isinstance(shells, str | bytes) or not isinstance(shells, Sequence):
        raise PlstarInputError(f"shells must be a sequence of fractions, got {describe(shells)}")
    fractions = [real_number("each shell fraction", s, minimum=0.0, strict=True) for s in shells]
    if not fractions or any(s > 1.0 for s in fractions):
        raise PlstarInputError(f"shells must be fractions of R in (0, 1], got {fractions}")
    if radius is not None:
        radius = real_number("radius", radius, minimum=0.0)
    if mu is not None:
        mu = real_number("mu", mu, minimum=0.0, strict=True)
    fmodel = make_functional(model, x, output=output)
    y2 = check_targets(fmodel, x, y)
    common = {"memory_budget": memory_budget, "output": fmodel.select}
    a = analyze(model, x, y2, hessian_outputs=hessian_outputs, hessian_time_share=None, seed=seed,
                progress=progress, **common)  # fmt: skip
    if a.beta is None or a.hessian_norm is None:
        stage, error = next(iter(a.failed.items()))
        raise PlstarInputError(
            f"certify needs β and ‖H_F‖ at w₀, and the {stage} stage failed ({error})"
        )
    lambda0 = a.mu  # λ_min(K(w₀)), 0 when zero within precision
    mu_ = mu if mu is not None else lambda0
    if radius is not None:
        R, source = float(radius), "given"
    else:
        R, source = (
            theory.gd_radius(a.beta.value, mu_, a.loss0) if mu_ > 0 else math.inf,
            "gd theorem",
        )
    nk = a.n * a.k
    w0 = flat_parameters(model)
    lam0_err = a.kernel.lambda_min_error or 0.0
    origin = BallPoint(
        "w0", 0.0, 0.0, a.loss0, a.pl_ratio, lambda_min_within_precision(a.kernel), lam0_err,
        a.kernel.lambda_max or 0.0, a.hessian_norm.value, a.beta.value,
        lambda_min_within_precision(a.kernel) + lam0_err < mu_,
    )  # fmt: skip
    points = [origin]
    if mu_ > 0 and math.isfinite(R) and R > 0:
        directions = _directions(model, x, y2, samples, seed, common)
        total, warm = len(directions) * len(fractions), a.beta.vector
        try:
            for i, (label, d) in enumerate(directions):
                for j, s in enumerate(fractions):
                    assign_parameters(model, w0 + (s * R * d).to(w0.dtype))
                    point, warm = _measure(
                        model, x, y2, label, s, s * R, mu_, hessian_outputs, warm, seed, common
                    )
                    points.append(point)
                    if progress is not None:
                        progress("certify: points on the ball", i * len(fractions) + j + 1, total)
        finally:
            assign_parameters(model, w0)
    eps = max(p.hessian_norm for p in points)
    bound = theory.kernel_lower_bound_on_ball(lambda0, eps, R, nk) if math.isfinite(R) else 0.0
    cert = Certificate(
        n=a.n, k=a.k, m=a.m, loss0=a.loss0, lambda0=lambda0, lambda0_error=lam0_err, mu=mu_,
        beta=a.beta.value, radius=R, radius_source=source, points=points,
        violations=sum(p.violates for p in points), worst=min(points, key=lambda p: p.lambda_min),
        hessian_norm=eps, kernel_bound=bound,
        hessian_control_implies_conditioning=mu_ > 0 and bound >= mu_,
        conditioning_radius=theory.uniform_conditioning_radius(lambda0, mu_, eps, nk) if mu_ > 0 else 0.0,
        sharpness_max=max(p.sharpness for p in points),
    )  # fmt: skip
    cert.verdict = _verdict(cert)
    return cert


def _verdict(c: Certificate) -> list[str]:
    """What was checked, in words; sampled evidence is labelled as evidence."""
    if c.mu <= 0:
        return [
            "No certificate: λ_min(K(w₀)) is zero within precision, so PL* fails at w₀ itself "
            "and there is no ball to check (give mu and radius to sample one anyway)."
        ]
    where = "the GD theorem's radius 2√(2βL₀)/μ" if c.radius_source == "gd theorem" else "given"
    lines = [
        f"Checked μ = {c.mu:.4g} on B(w₀, R), R = {c.radius:.4g} ({where}; β(w₀) = {c.beta:.4g}), "
        f"at w₀ and {c.sampled_points} sampled points on shells of the ball.",
    ]
    w = c.worst
    at = f"worst {w.lambda_min:.4g} at distance {w.distance:.3g}, direction {w.direction}"
    if c.sampled_points == 0:
        lines.append("No points were sampled (R is 0 or infinite): nothing beyond w₀ was checked.")
    elif c.violations == 0:
        lines.append(f"Evidence, not proof: λ_min(K) ≥ μ at every sampled point ({at}); points "
                     "between samples were not checked.")  # fmt: skip
    else:
        lines.append(f"PL* with μ = {c.mu:.4g} fails on this ball: λ_min(K) < μ at {c.violations} "
                     f"of {len(c.points)} points ({at}). A smaller μ needs a larger ball: R ∝ 1/μ.")  # fmt: skip
    if c.hessian_control_implies_conditioning:
        lines.append(
            f"Hessian control (item 4): IF ‖H_F‖ ≤ ε = {c.hessian_norm:.3g} everywhere on the ball "
            f"— ε is the largest value found at the samples, not a proven bound — then "
            f"λ_min(K) ≥ {c.kernel_bound:.4g} ≥ μ on all of it: uniform conditioning, hence μ-PL*."
        )
    else:
        half = theory.uniform_conditioning_radius(
            c.lambda0, c.lambda0 / 2, c.hessian_norm, c.n * c.k
        )
        lines.append(
            f"Hessian control (item 4) alone does not imply it: with ε = {c.hessian_norm:.3g} (the "
            f"largest ‖H_F‖ found) its bound on λ_min(K) over the ball is {c.kernel_bound:.4g} < μ; "
            f"it holds μ up to radius {c.conditioning_radius:.3g}, and λ₀/2 up to {half:.3g}."
        )
    if c.sharpness_max > c.beta * (1 + 1e-3):
        lines.append(
            f"λ_max(H_L) reaches {c.sharpness_max:.4g} > β(w₀) on the ball: the theorem's β, step "
            "1/β and R should use the larger value."
        )
    return lines
