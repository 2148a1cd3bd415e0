"""Experiment 5: essential non-convexity (THEORY.md item 8).

An over-parameterized non-linear system has a manifold of solutions of dimension m − n·k, and its
loss is not convex in any neighbourhood of it: at a minimizer H_L = DFᵀDF is PSD of rank ≤ n·k,
but at points w* + r·u off the manifold the term Σ_j r_j H_{F_j} has negative directions inside
ker DF, of size O(r), at every distance r. A linear model has H_L = DFᵀDF everywhere: PSD.

Measurement: train with :func:`plstar.train` (GD, η = 1/β) to L < 10⁻¹⁰; at the point reached
form the exact loss Hessian by ``torch.func.hessian`` in float64 (m ≤ a few hundred, so the dense
Hessian is affordable and is the honest measurement: no Lanczos tolerance is involved), its full
spectrum, and λ_min(H_L) at w* + r·u for random unit directions u and r from 10⁻⁴ to 1, each with
the precision floor of :func:`plstar.spectrum` ((m + 1)·eps₆₄·‖H‖). The numerical rank at w*
counts eigenvalues above ‖H_L − DFᵀDF‖₂ + floor: by Weyl, the remaining residual term moves
every eigenvalue of the Gauss–Newton part DFᵀDF (rank ≤ n·k) by at most its norm.

Models (problem of experiment 4: Gaussian inputs, noise targets): a one hidden layer tanh network
(non-linear) and the linear model x ↦ Wx/√d with d > n (over-parameterized, m = d·k), whose loss
Hessian is the closed form I_k ⊗ XᵀX/d.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn
from torch.func import hessian

from plstar import theory
from plstar.certify import flat_parameters
from plstar.curvature import loss_value
from plstar.devices import HOST, host_normal
from plstar.experiments.base import Check, ExperimentResult, Run, check_range, check_true
from plstar.experiments.common import (
    all_hold,
    first_below,
    gaussian_problem,
    loglog_slope,
    parameter_count,
    tanh_net,
)
from plstar.experiments.common import (
    figure as panel_figure,
)
from plstar.functional import ProgressCallback, check_targets, jacobian_matrix, make_functional
from plstar.spectrum import spectrum
from plstar.train import train

NUMBER = 5
TITLE = "Essential non-convexity"
CLAIM = (
    "Near the solution manifold of an over-parameterized non-linear net H_L has negative "
    "eigenvalues at every distance (L is nowhere locally convex), while at a minimizer H_L is PSD "
    "of rank n·k; a linear model's H_L stays PSD."
)

SOLVED = 1e-10
"""Trained means L < SOLVED (summed loss)."""
SLOPE_RADII = 1e-2
"""λ_min(H_L) is O(r) to first order: its log-log slope is fitted over r ≤ SLOPE_RADII."""
QUICK = {"n": 8, "d": 16, "k": 2, "width": 8, "steps": 600, "radii": 5, "directions": 3}
FULL = {"n": 16, "d": 32, "k": 2, "width": 24, "steps": 1500, "radii": 9, "directions": 8}
"""Radii: ``radii`` values log-spaced over [1e-4, 1]; ``directions`` random unit u per radius."""


def loss_hessian(model: nn.Module, x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
    """Exact H_L (m, m) float64 of L = ½‖F − y‖² at w (default: the model's parameters).

    Dense, by forward-over-reverse ``torch.func.hessian``: cost m reverse-and-forward passes over
    the data and m² memory, so only for small models. The model is not modified.
    """
    fmodel = make_functional(model, x)
    targets = check_targets(fmodel, x, y)
    point = flat_parameters(model) if w is None else w
    matrix = hessian(lambda v: loss_value(fmodel, fmodel.unflatten(v), x, targets))(point)
    return matrix.to(torch.float64)


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (model, seed): ``nonlinear`` (tanh net) and ``linear`` (x ↦ Wx/√d)."""
    size = QUICK if quick else FULL
    return [{"model": kind, "seed": seed, **size}
            for seed in range(seeds) for kind in ("nonlinear", "linear")]  # fmt: skip


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """Train to L < 1e-10, then the spectrum of H_L at w* and λ_min(H_L) at w* + r·u.

    Cost: ``steps`` GD steps plus 1 + radii·directions dense Hessians (m passes each) and
    eigensolves (m³).
    """
    n, d, k = config["n"], config["d"], config["k"]
    x, y, model_seed = gaussian_problem(n, d, k, config["seed"])
    depth = 2 if config["model"] == "nonlinear" else 1
    model = tanh_net(d, config["width"], k, model_seed, depth=depth)
    m = parameter_count(model)
    result = train(model, x, y, steps=config["steps"], progress=progress)
    solution = flat_parameters(model).double()
    at_solution = loss_hessian(model, x, y)
    fmodel = make_functional(model, x)
    jacobian = jacobian_matrix(fmodel, x, torch.float64)
    residual_term = float(torch.linalg.matrix_norm(at_solution - jacobian.T @ jacobian, ord=2))
    found = spectrum(at_solution)
    eigenvalues = torch.linalg.eigvalsh(at_solution).flip(0)  # descending
    threshold = residual_term + found.precision_floor
    # its own stream: the model's seed would draw u = w₀/‖w₀‖, the initial weights themselves
    generator = torch.Generator(device=HOST).manual_seed(model_seed + 1)
    radii = [10.0 ** (-4 + 4 * i / (config["radii"] - 1)) for i in range(config["radii"])]
    points, largest_change = [], 0.0
    for i, radius in enumerate(radii):
        for _ in range(config["directions"]):
            u = host_normal((m,), generator, solution.device)
            moved = loss_hessian(model, x, y, solution + radius * u / u.norm())
            there = spectrum(moved)
            largest_change = max(largest_change, float((moved - at_solution).abs().max()))
            points.append({"radius": radius, "lambda_min": there.lambda_min,
                           "precision_floor": there.precision_floor})  # fmt: skip
        if progress is not None:
            progress("Hessians off the minimizer", i + 1, len(radii))
    return {
        "m": m, "nk": n * k, "final_loss": result.final_loss,
        "steps_to_solved": first_below(result.losses, SOLVED),
        "eigenvalues": eigenvalues.tolist(), "residual_term_norm": residual_term,
        "precision_floor": found.precision_floor, "rank_threshold": threshold,
        "rank": int((eigenvalues.abs() > threshold).sum()),
        "manifold_dimension": theory.solution_manifold_dimension(m, n * k),
        "points": points, "largest_hessian_change": largest_change,
    }  # fmt: skip


def _median_curve(points: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Radii and the median of −λ_min(H_L) over the directions at each radius."""
    radii = sorted({p["radius"] for p in points})
    return radii, [statistics.median(-p["lambda_min"] for p in points if p["radius"] == r)
                   for r in radii]  # fmt: skip


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Checks: trained, rank n·k at w*, negative curvature at every r (non-linear), its O(r)
    scaling, PSD and constant H_L (linear)."""
    by_model: dict[str, list[dict[str, Any]]] = {"nonlinear": [], "linear": []}
    for run in runs:
        by_model[run.config["model"]].append({"seed": run.config["seed"], **run.data})
    checks: list[Check] = []
    for kind, rows in by_model.items():
        worst = max(r["final_loss"] for r in rows)
        control = kind == "linear"  # a convex quadratic: its checks hold by construction
        checks.append(check_range(f"{kind}: trained to L < {SOLVED:g}", worst, 0.0, SOLVED,
                                  control=control))  # fmt: skip
        ranks = [f"{r['rank']} (nk = {r['nk']}, m − rank = {r['m'] - r['rank']}, manifold "
                 f"dimension {r['manifold_dimension']})" for r in rows]  # fmt: skip
        checks.append(check_true(
            f"{kind}: rank H_L(w*) = n·k, nullity = dim of the solution manifold m − n·k",
            all(r["rank"] == r["nk"] for r in rows), "; ".join(ranks),
            "rank n·k (eigenvalues above ‖H_L − DFᵀDF‖₂ + floor)", control=control,
        ))  # fmt: skip
    nonlinear = [p for r in by_model["nonlinear"] for p in r["points"]]
    closest = max((p["lambda_min"] for p in nonlinear), default=math.nan)
    checks.append(all_hold(
        "non-linear: λ_min(H_L) < 0 beyond precision at every sampled point, r ∈ [1e-4, 1]",
        len(nonlinear),
        [f"r = {p['radius']:.2g}" for p in nonlinear if p["lambda_min"] >= -p["precision_floor"]],
        f"largest λ_min = {closest:.3g}", "all below −(precision floor)",
    ))  # fmt: skip
    for row in by_model["nonlinear"]:
        radii, depth = _median_curve([p for p in row["points"] if p["radius"] <= SLOPE_RADII])
        usable = [(r, v) for r, v in zip(radii, depth, strict=True) if v > 0]
        slope = loglog_slope([r for r, _ in usable], [v for _, v in usable])
        checks.append(check_range(
            f"non-linear (seed {row['seed']}): −λ_min(H_L) ∝ r near w* (log-log slope, r ≤ "
            f"{SLOPE_RADII:g})", slope, 0.8, 1.2,
        ))  # fmt: skip
    linear = [p for r in by_model["linear"] for p in r["points"]]
    lowest = min((p["lambda_min"] for p in linear), default=math.nan)
    checks.append(all_hold(
        "linear: λ_min(H_L) ≥ −(precision floor) at every sampled point (PSD)", len(linear),
        [f"r = {p['radius']:.2g}" for p in linear if p["lambda_min"] < -p["precision_floor"]],
        f"lowest λ_min = {lowest:.3g}", "all", control=True,
    ))  # fmt: skip
    change = max((r["largest_hessian_change"] for r in by_model["linear"]), default=math.nan)
    floor = min((r["precision_floor"] for r in by_model["linear"]), default=math.nan)
    checks.append(check_range("linear: H_L is the same at every point (max entry change)",
                              change, 0.0, floor, control=True))  # fmt: skip
    return {"models": by_model, "solved": SOLVED}, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """−λ_min(H_L) against the distance r from w*; the spectrum of H_L(w*)."""
    figure, (curvature_ax, spectrum_ax) = panel_figure(
        2, title="essential non-convexity", width=5.2, height=4.4
    )
    for kind, color in (("nonlinear", "tab:red"), ("linear", "tab:blue")):
        for row in result.data["models"][kind]:
            pts = row["points"]
            if kind == "nonlinear":
                curvature_ax.scatter([p["radius"] for p in pts], [-p["lambda_min"] for p in pts],
                                     s=12, color=color, alpha=0.5)  # fmt: skip
                radii, depth = _median_curve(pts)
                curvature_ax.plot(radii, depth, "-", color=color,
                                  label=f"tanh net: −λ_min(H_L) (seed {row['seed']})")  # fmt: skip
            else:  # PSD: λ_min is zero within precision, drawn at its floor
                curvature_ax.plot([p["radius"] for p in pts], [p["precision_floor"] for p in pts],
                                  "o", mfc="none", color=color,
                                  label="linear: λ_min ≥ −floor (drawn at the floor)")  # fmt: skip
            magnitudes = sorted((max(abs(v), 1e-300) for v in row["eigenvalues"]), reverse=True)
            spectrum_ax.semilogy(range(1, len(magnitudes) + 1), magnitudes, ".", color=color,
                                 label=f"{kind} (m = {row['m']})")  # fmt: skip
            spectrum_ax.axhline(row["rank_threshold"], color=color, linestyle=":", linewidth=1)
            spectrum_ax.axvline(row["nk"] + 0.5, color="black", linestyle="--", linewidth=1)
    curvature_ax.plot([1e-4, 1], [1e-4, 1], color="grey", linestyle="--", linewidth=1,
                      label="slope 1 (O(r))")  # fmt: skip
    curvature_ax.set(xscale="log", yscale="log", xlabel="distance r = ‖w − w*‖",
                     ylabel="−λ_min(H_L(w* + r·u))", title="negative curvature at every scale")  # fmt: skip
    spectrum_ax.set(xlabel="index (|eigenvalue| descending)", ylabel="|λ_i(H_L(w*))|",
                    title="|spectrum| at w* (dashed: n·k; dotted: threshold)")  # fmt: skip
    curvature_ax.legend(fontsize="x-small")
    spectrum_ax.legend(fontsize="x-small")
    return {"non_convexity": figure}
