"""Experiment 11: the PL* region outgrows the GD ball as width grows (THEORY items 2, 4, 5).

The paper's central theorem is not "λ_min(K(w₀)) > 0" but: for a wide network, PL* holds on a ball
whose radius grows with width, because ‖H_F‖ = Õ(1/√m) keeps K(w) conditioned there (item 4),
while the GD theorem's ball B(w₀, R), R = 2√(2βL₀)/μ, does not grow (item 2); above a crossover
width m* the hypothesis holds on the theorem's own ball, and GD from w₀ stays inside and converges.

Measured per width, with μ = λ₀/2 (λ₀ = λ_min(K(w₀))):

* r_μ, the distance from w₀ at which λ_min(K(w)) first falls below μ, the smallest over four
  direction families: iterated λ_min descent (an adversarial path: step along the direction in
  which λ_min falls fastest, steps growing ×1.4, the crossing bisected), the segment toward w = 0,
  the GD path extended, and random directions. A crossing found is a point of the ball where PL*
  with μ fails, so r_μ is an upper bound on the PL* radius; the Hessian-control radius
  (√λ₀ − √μ)/(√(nk)·ε) is the lower bound, with ε the largest ‖H_F‖ found.
* sup ‖H_F‖ and the largest λ_max(H_L) over sampled points of B(w₀, r_ball), a ball of the same
  radius at every width (shells r_ball/2 and r_ball; the adversarial, gradient, toward-zero and two
  random directions), and λ_min(K) at each point against the Hessian-control bounds (item 4, sharp
  and paper forms, with that ε).
* R(m) = 2√(2βL₀)/μ with β the largest λ_max(H_L) found on the ball and at w₀, then GD from w₀ with
  η = 1/β: its largest distance from w₀ against R and its loss against (1 − μ/β)^t·L₀.

Data: n Gaussian points on the sphere of radius √d (near-orthogonal, so λ₀ is not tiny and R is
moderate: on n = 16 digits R ≈ 600–1,200 and the crossover would need widths near 10⁵–10⁶).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from plstar import theory
from plstar.certify import assign_parameters, flat_parameters
from plstar.curvature import loss_gradient, loss_sharpness, model_hessian_norm
from plstar.devices import HOST, host_normal
from plstar.experiments.base import Check, Run, check_range, check_true
from plstar.experiments.common import DTYPE, gaussian_problem, loglog_slope, network, placed
from plstar.experiments.pl_region_figures import figures as figures  # the module's contract
from plstar.functional import ProgressCallback
from plstar.kernel import tangent_kernel
from plstar.models import cnn
from plstar.region import RegionSearch, fit_crossover
from plstar.train import train

NUMBER = 11
TITLE = "The PL* region outgrows the GD ball"
CLAIM = (
    "PL* with μ = λ₀/2 holds on a ball whose radius r_μ grows like √m, because sup ‖H_F‖ on a "
    "fixed ball falls like 1/√m, while the GD radius R does not grow: above a crossover width m* "
    "the theorem's hypothesis holds on its own ball, and GD stays inside and converges at its rate."
)

QUICK: dict[str, Any] = {
    "families": {"mlp2": [16, 64, 256, 1024, 2048, 4096]},
    "n": 4, "d": 64, "ball": 8.0, "steps": 300,
}  # fmt: skip
FULL: dict[str, Any] = {
    "families": {
        "mlp2": [16, 64, 256, 1024, 4096, 16384, 65536],
        "mlp3": [16, 32, 64, 256, 1024, 2048],
        "cnn": [4, 8, 16, 32, 64, 128],
    },
    "n": 4, "d": 64, "ball": 8.0, "steps": 300,
}  # fmt: skip
SLOPE_RANGE = (0.3, 0.7)
"""r_μ ∝ √m and sup ‖H_F‖ ∝ 1/√m up to the logarithms of the theory's Õ: slopes ½ and −½ ± 0.2."""
CROSSING = ("mlp2",)
"""Families whose widths reach the crossover on a CPU (the others' m* is extrapolated, not checked:
at depth 3 and for the CNN, r_μ at the widest width is still ~10× below R)."""


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """Every (family, width, seed): quick, the depth-2 NTK tanh MLP at 6 widths 16…4096; full,
    widths to 65536, also the depth-3 MLP and a CNN (channels as width)."""
    plan = QUICK if quick else FULL
    return [
        {"family": family, "width": width, "n": plan["n"], "d": plan["d"], "ball": plan["ball"],
         "steps": plan["steps"], "seed": seed}
        for family, widths in plan["families"].items() for width in widths
        for seed in range(seeds)
    ]  # fmt: skip


def build(family: str, d: int, width: int, seed: int) -> tuple[nn.Module, bool]:
    """(float64 NTK model, whether it takes images (n, 4, √(d/4), √(d/4))) of ``family``: "mlp2",
    "mlp3", "cnn" (two 3×3 convolutions of ``width`` channels) or "bottleneck" (two depth-2 MLPs
    through one scalar unit: ‖H_F‖ does not fall with width)."""
    if family == "cnn":
        side = math.isqrt(d // 4)
        return placed(cnn(4, side, width, 2, 1, generator_seed=seed, dtype=DTYPE)), True
    variant = "bottleneck" if family == "bottleneck" else "linear"
    depth = 3 if family == "mlp3" else 2
    return network(variant, d, width, depth, 1, seed), False


def gradient_descent(
    model: nn.Module, x: Tensor, y: Tensor, w0: Tensor, eta: float, steps: int
) -> tuple[list[float], float, Tensor]:
    """GD from w₀ with the constant step η (:func:`plstar.train`): (losses L(w_0..w_T),
    max_t ‖w_t − w₀‖, w_T); the model is left at w₀."""
    assign_parameters(model, w0)
    try:
        result = train(model, x, y, steps=steps, lr=eta)
        return result.losses, result.max_distance, flat_parameters(model)
    finally:
        assign_parameters(model, w0)


def sphere_problem(n: int, d: int, seed: int) -> tuple[Tensor, Tensor, int]:
    """(x (n, d), y (n, 1), model seed): n Gaussian points scaled onto the sphere of radius √d
    (near-orthogonal for n ≪ d), y ~ N(0, 1), float64, from ``seed``."""
    x, y, model_seed = gaussian_problem(n, d, 1, seed)
    return x / x.norm(dim=1, keepdim=True) * math.sqrt(d), y, model_seed


def sample_ball(
    search: RegionSearch, y: Tensor, radii: tuple[float, ...], directions: tuple[Tensor, ...]
) -> list[dict[str, float]]:
    """At w₀ + r·u for every radius r and unit direction u: ‖H_F‖, λ_max(H_L) and λ_min(K), each
    as a dict {"r", "hessian_norm", "sharpness", "lambda_min"}; the model is left at w₀."""
    points = []
    try:
        for u in directions:
            for r in radii:
                eps, beta, lam = _curvature(search, y, search.w0 + r * u)
                points.append({"r": r, "hessian_norm": eps, "sharpness": beta, "lambda_min": lam})
    finally:
        assign_parameters(search.model, search.w0)
    return points


def _curvature(search: RegionSearch, y: Tensor, w: Tensor) -> tuple[float, float, float]:
    """(‖H_F(w)‖ over all outputs, λ_max(H_L(w)), λ_min(K(w))); Lanczos to 10⁻³ relative
    residual (a slope or a bound needs no more), at most 20 and 30 products."""
    model, x = search.model, search.x
    lam = search.lambda_min(w)
    hessian = model_hessian_norm(model, x, tol=1e-3, max_iter=20).value
    return float(hessian), float(loss_sharpness(model, x, y, tol=1e-3, max_iter=30).value), lam


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """One (family, width, seed). Cost here (2 cores), depth 2, d = 64: 3 s at width 1024, 9 s at
    4096, 50 s at 16384 (m ≈ 1.1 M), mostly the Lanczos runs for ‖H_F‖ and λ_max(H_L)."""
    n, d, ball = config["n"], config["d"], config["ball"]
    x, y, model_seed = sphere_problem(n, d, config["seed"])
    model, images = build(config["family"], d, config["width"], model_seed)
    if images:
        x = x.reshape(n, 4, math.isqrt(d // 4), -1)
    w0 = flat_parameters(model)
    spectrum0 = torch.linalg.eigvalsh(tangent_kernel(model, x))
    lam0, lam_max0 = float(spectrum0[0]), float(spectrum0[-1])
    mu = lam0 / 2
    search = RegionSearch(model, x, mu)
    eps0, beta0, _ = _curvature(search, y, w0)
    loss0, gradient0 = loss_gradient(model, x, y)
    reach = float(w0.norm())
    # the GD path extended: the direction to where GD from w₀ (η = 1/β(w₀)) goes
    _, _, w_gd = gradient_descent(model, x, y, w0, 1.0 / beta0, config["steps"])
    generator = torch.Generator(device=HOST).manual_seed(config["seed"] + 17)
    randoms = [host_normal(w0.shape, generator, w0.device) for _ in range(2)]
    randoms = [u / u.norm() for u in randoms]
    crossings = [
        search.descent_path(),
        search.along("toward zero", -w0 / reach, reach),
        search.along("GD path", (w_gd - w0) / (w_gd - w0).norm(), 2 * reach),
        *(search.along(f"random {i + 1}", u, 2 * reach) for i, u in enumerate(randoms)),
    ]
    found = {c.name: {"r": c.distance, "radii": c.radii, "values": c.values} for c in crossings}
    toward_adv = crossings[0].direction
    assert toward_adv is not None
    r_mu = min(f["r"] for f in found.values())
    # the fixed ball: sup ‖H_F‖, sup λ_max(H_L), λ_min(K) against the Hessian-control bounds
    gradient_direction = -gradient0.to(DTYPE) / gradient0.norm()
    points = sample_ball(search, y, (ball / 2, ball), (toward_adv, gradient_direction, randoms[0]))
    sup_eps = max([eps0, *(p["hessian_norm"] for p in points)])
    beta_ball = max([beta0, *(p["sharpness"] for p in points)])
    radius = theory.gd_radius(beta_ball, mu, float(loss0))
    losses, farthest, _ = gradient_descent(model, x, y, w0, 1.0 / beta_ball, config["steps"])
    assign_parameters(model, w0)
    rate = theory.gd_rate(beta_ball, mu)
    envelope = max(
        (loss / (losses[0] * rate**t) for t, loss in enumerate(losses) if t), default=0.0
    )  # fmt: skip
    nk = n
    return {
        "m": int(w0.numel()), "norm_w0": reach, "lambda0": lam0, "lambda_max0": lam_max0,
        "mu": mu, "loss0": float(loss0), "directions": found, "r_mu": r_mu,
        "r_lower": theory.uniform_conditioning_radius(lam0, mu, sup_eps, nk),
        "ball": ball, "points": points, "sup_hessian_norm": sup_eps, "beta_ball": beta_ball,
        "beta_w0": beta0, "radius": radius, "gd_max_distance": farthest,
        "gd_envelope_ratio": envelope, "gd_rate": rate, "gd_final_loss": losses[-1],
        "bound_sharp": {str(r): theory.kernel_lower_bound_on_ball(lam0, sup_eps, r, nk)
                        for r in (ball / 2, ball)},
        "bound_paper": {str(r): theory.kernel_lower_bound_on_ball(
            lam0, sup_eps, r, nk, lipschitz=math.sqrt(lam_max0), form="paper")
            for r in (ball / 2, ball)},
    }  # fmt: skip


def _per_width(runs: list[Run], key: str) -> list[float]:
    """The median over seeds of ``key`` at each width, in width order."""
    widths = sorted({r.config["width"] for r in runs})
    return [float(np.median([r.data[key] if r.data[key] is not None else math.inf
                             for r in runs if r.config["width"] == w])) for w in widths]  # fmt: skip


def crossover(widths: list[int], r_mu: list[float], radius: list[float]) -> int | None:
    """The smallest width from which on r_μ ≥ R at every larger width too, or None."""
    above = [r >= big for r, big in zip(r_mu, radius, strict=True)]
    for i, width in enumerate(widths):
        if all(above[i:]):
            return width
    return None


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Per family: r_μ (each direction family), the Hessian-control radius, R, sup ‖H_F‖, the
    crossover (and where the power law of r_μ reaches the median R, :func:`fit_crossover`)
    against width; three checks per family, two more
    (crossover, GD above it) for the families of ``CROSSING``."""
    data: dict[str, Any] = {"families": {}}
    checks: list[Check] = []
    families = list(dict.fromkeys(r.config["family"] for r in runs))
    for family in families:
        mine = [r for r in runs if r.config["family"] == family]
        widths = sorted({r.config["width"] for r in mine})
        r_mu, radius = _per_width(mine, "r_mu"), _per_width(mine, "radius")
        sup_eps = _per_width(mine, "sup_hessian_norm")
        m_star = crossover(widths, r_mu, radius)
        first = min(r.config["seed"] for r in mine)
        data["families"][family] = {
            "widths": widths, "r_mu": [_finite(v) for v in r_mu], "radius": radius,
            "r_lower": _per_width(mine, "r_lower"), "sup_hessian_norm": sup_eps,
            "lambda0": _per_width(mine, "lambda0"), "crossover": m_star,
            "by_direction": {name: [_finite(r.data["directions"][name]["r"]) for w in widths
                                    for r in mine if r.config["width"] == w and
                                    r.config["seed"] == first]
                             for name in mine[0].data["directions"]},
            "curves": {str(r.config["width"]): {**r.data["directions"], "radius": r.data["radius"],
                                                "lambda0": r.data["lambda0"]}
                       for r in mine if r.config["seed"] == first},
        }  # fmt: skip
        label = f"[{family}]"
        low, high = SLOPE_RANGE
        checks += [
            check_range(f"{label} log-log slope of r_μ against width (PL* region ∝ √m)",
                        loglog_slope(widths, r_mu), low, high),
            check_range(f"{label} log-log slope of sup ‖H_F‖ on B(w₀, r_ball) against width",
                        loglog_slope(widths, sup_eps), -high, -low),
            _bounds_hold(label, mine),
        ]  # fmt: skip
        fit = fit_crossover(widths, r_mu, float(np.median(radius)))
        data["families"][family]["extrapolated_crossover"] = None if fit is None else fit.width
        if family in CROSSING:
            checks += [
                check_true(f"{label} a crossover width m* with r_μ(m) ≥ R(m) from m* on",
                           m_star is not None, f"m* = {m_star}" if m_star else "none in "
                           f"{widths[0]}…{widths[-1]}", "exists"),
                _gd_above(label, mine, m_star),
            ]  # fmt: skip
    return data, checks


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _bounds_hold(label: str, runs: list[Run]) -> Check:
    """Every sampled λ_min(K) on the ball is above both Hessian-control bounds at its radius."""
    worst = math.inf
    for run in runs:
        for point in run.data["points"]:
            r = str(point["r"])
            bound = max(run.data["bound_sharp"][r], run.data["bound_paper"][r])
            worst = min(worst, point["lambda_min"] - bound)
    return check_true(
        f"{label} Hessian-control bounds (sharp and paper) ≤ every sampled λ_min(K) on the ball",
        worst >= 0, f"min (λ_min − bound) = {worst:.3g}", "≥ 0",
    )  # fmt: skip


def _gd_above(label: str, runs: list[Run], m_star: int | None) -> Check:
    """GD from w₀ at every width ≥ m* stays in B(w₀, R) and under (1 − μ/β)^t·L₀."""
    chosen = [r for r in runs if m_star is not None and r.config["width"] >= m_star]
    distance = max((r.data["gd_max_distance"] / r.data["radius"] for r in chosen), default=math.nan)
    envelope = max((r.data["gd_envelope_ratio"] for r in chosen), default=math.nan)
    passed = bool(chosen) and distance <= 1.0 and envelope <= 1.0 + 1e-9
    return check_true(
        f"{label} GD above m* (μ and β from the ball): max ‖w_t − w₀‖/R and max L_t/envelope",
        passed, f"{distance:.3g} and {envelope:.3g}", "both ≤ 1",
    )  # fmt: skip
