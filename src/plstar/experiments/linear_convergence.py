"""Experiment 3: linear convergence of GD under PL*, inside the ball of the theorem.

THEORY.md item 2 (LZB Thm. 6): if L is β-smooth and μ-PL* on B(w₀, R), R = 2√(2βL₀)/μ, then GD
with η = 1/β stays in B and L(w_t) ≤ (1 − μ/β)^t L(w₀). Measured with μ = λ_min(K(w₀)) over all
samples and β = λ_max(H_L(w₀)) (``plstar.Monitor``), GD by ``plstar.train`` (η = 1/β, re-checked
every ``every`` steps), for several widths: the loss against the envelope at every step, the
distance ‖w_t − w₀‖ against R, and the rate over the last half of the run — an envelope can hold
on the slack of a fast start, a linear rate to the end cannot. The PL ratio ρ(w_t) = ‖∇L‖²/(2L),
the PL* hypothesis measured along the path, is recorded and drawn.

Stated honestly: at these widths the theorem's ball is far larger than the PL* region. Along
the adversarial path of :class:`plstar.region.RegionSearch` (iterated λ_min descent from w₀),
λ_min(K) falls below λ₀/2 at a distance r_{λ₀/2} far smaller than R (measured per run, reported
in the checks and drawn in the figure), and the ball contains w = 0 (R > ‖w₀‖), where K is
singular: no μ > 0 gives PL* on it. The envelope and the rate hold here although the hypothesis
does not. Experiment 11 measures where hypothesis and conclusion hold together: above its
crossover width, on near-orthogonal data, with μ = λ₀/2 and β from the ball.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from plstar.certify import assign_parameters, flat_parameters
from plstar.experiments.base import Check, ExperimentResult, Run, check_range, check_true
from plstar.experiments.common import (
    by_key,
    figure,
    late_rate,
    monitored_gd,
    thin,
    width_colors,
    width_configurations,
)
from plstar.functional import ProgressCallback
from plstar.region import RegionSearch
from plstar.train import envelope_ratio

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUMBER = 3
TITLE = "Linear convergence under PL*"
CLAIM = (
    "GD with η = 1/β converges linearly: L(w_t) ≤ (1 − μ/β)^t·L(w₀) at every step, and the path "
    "stays in the ball of radius R = 2√(2βL₀)/μ."
)

QUICK = {"widths": [2**6, 2**8, 2**10], "n": 32, "steps": 1000, "every": 100}
FULL = {"widths": [2**5, 2**7, 2**9, 2**11, 2**13], "n": 32, "steps": 3000, "every": 100}
POINTS = 300
"""Samples of each curve kept for the figure (the checks use every step)."""


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """Every (width, seed), depth-2 NTK tanh MLP, n = 32 digits, k = 1: quick widths 2^6, 2^8,
    2^10 and 1000 steps; full widths 2^5..2^13 (every other power) and 3000 steps."""
    return width_configurations(QUICK if quick else FULL, seeds)


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """GD under the Monitor. Cost: ``steps`` gradient passes over n samples plus steps/every
    n × n kernels; ≈ 40 s at width 2^13, n = 32, 3000 steps."""
    result, monitor, model = monitored_gd(config, progress)
    history = monitor.history
    trained = flat_parameters(monitor.model)
    assign_parameters(monitor.model, monitor.w0)  # the PL* region around w₀, μ = λ₀/2
    region = RegionSearch(monitor.model, monitor.x, result.mu / 2).descent_path()
    assign_parameters(monitor.model, trained)
    rho = [r.pl_ratio / result.mu for r in history if math.isfinite(r.pl_ratio)]
    index, losses = thin(result.losses, POINTS)
    return {
        "model": model, "m": monitor.m, "loss0": result.loss0, "final_loss": result.final_loss,
        "mu": result.mu, "beta": result.beta, "rate": result.rate, "radius": result.radius,
        "step_size": result.step_size, "final_step_size": result.final_step_size,
        "max_envelope_ratio": envelope_ratio(result.losses, result.rate),
        "max_distance": result.max_distance,
        "late_rate": late_rate(result.losses), "min_pl_ratio_over_mu": min(rho, default=math.nan),
        "region_radius": region.distance, "norm_w0": float(monitor.w0.double().norm()),
        "curve": {
            "step": index, "loss": losses,
            "envelope": [result.loss0 * result.rate**t for t in index],
            "distance": [history[t].distance for t in index],
            "pl_ratio_over_mu": [history[t].pl_ratio / result.mu for t in index],
        },
        "events": result.events,
    }  # fmt: skip


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Per width and seed the figures of merit; the curves of the first seed; three checks, each
    the worst case over every run."""
    widths = by_key(runs, "width")
    keys = ("max_envelope_ratio", "max_distance", "radius", "rate", "late_rate",
            "min_pl_ratio_over_mu", "mu", "beta", "final_loss", "loss0", "region_radius",
            "norm_w0")  # fmt: skip
    first_seed = min(r.config["seed"] for r in runs) if runs else 0
    data: dict[str, Any] = {
        "widths": list(widths),
        "per_width": {str(w): {k: [r.data[k] for r in rs] for k in keys} for w, rs in widths.items()},
        "curves": {str(w): r.data["curve"] | {"radius": r.data["radius"],
                                              "region_radius": r.data["region_radius"]}
                   for w, rs in widths.items() for r in rs if r.config["seed"] == first_seed},
        "setting": {k: runs[0].config[k] for k in ("n", "depth", "steps", "every")} if runs else {},
    }  # fmt: skip
    envelope = max((r.data["max_envelope_ratio"] for r in runs), default=math.nan)
    distance = max((r.data["max_distance"] / r.data["radius"] for r in runs), default=math.nan)
    # log(late rate)/log(1 − μ/β) ≥ 1: the last half converged at least at the theory's rate.
    exponents = [
        math.log(r.data["late_rate"]) / math.log(r.data["rate"]) if 0 < r.data["rate"] < 1
        else math.nan for r in runs
    ]  # fmt: skip
    slowest = min(exponents, default=math.nan)
    if any(math.isnan(e) for e in exponents):
        slowest = math.nan
    excess = min((r.data["radius"] / r.data["region_radius"] for r in runs), default=math.nan)
    contains_zero = sum(r.data["radius"] > r.data["norm_w0"] for r in runs)
    checks = [
        check_true(
            "the theorem's hypothesis fails at these widths: its ball is larger than the PL* "
            "region (λ_min(K) < λ₀/2 at r_{λ₀/2} found by λ_min descent), so what follows is the "
            "conclusion observed without it (experiment 11: widths where both hold)",
            excess > 1, f"min R / r_{{λ₀/2}} = {excess:.3g}; R > ‖w₀‖ (w = 0 inside) in "
            f"{contains_zero}/{len(runs)} runs", "R / r_{λ₀/2} > 1 in every run",
        ),
        check_range("max over t ≥ 1 of L(w_t) / ((1 − μ/β)^t·L₀), every run (under the envelope)",
                    envelope, 0.0, 1.0),
        check_range("max_t ‖w_t − w₀‖ / R over every run (path inside the ball)",
                    distance, 0.0, 1.0),
        check_range("log(rate over the last half) / log(1 − μ/β), slowest run (linear to the end)",
                    slowest, 1.0, math.inf),
    ]  # fmt: skip
    data["late_rate_exponents"] = exponents
    return data, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``convergence``: L(w_t) with its envelope, ‖w_t − w₀‖ with R, and ρ(w_t)/μ, per width."""
    data, setting = result.data, result.data["setting"]
    curves = {int(w): c for w, c in data["curves"].items()}
    colors = width_colors(list(curves))
    fig, (loss_ax, distance_ax, rho_ax) = figure(3, width=5.0)
    for w, c in sorted(curves.items()):
        color = colors[w]
        loss_ax.semilogy(c["step"], c["loss"], color=color, label=f"m = {w}")
        loss_ax.semilogy(c["step"], c["envelope"], "--", color=color, linewidth=0.9)
        distance_ax.semilogy(c["step"][1:], c["distance"][1:], color=color, label=f"m = {w}")
        distance_ax.axhline(c["radius"], color=color, linestyle="--", linewidth=0.9)
        distance_ax.axhline(c["region_radius"], color=color, linestyle=":", linewidth=0.9)
        rho_ax.plot(c["step"], c["pl_ratio_over_mu"], color=color, label=f"m = {w}")
    rho_ax.axhline(1.0, color="grey", linestyle=":")
    rho_ax.set_yscale("log")
    loss_ax.set(xlabel="GD step t", ylabel="L(w_t) (summed)",
                title="loss (solid) and envelope (1 − μ/β)^t·L₀ (dashed)")  # fmt: skip
    distance_ax.set(xlabel="GD step t", ylabel="‖w_t − w₀‖",
                    title="distance from w₀ (solid), R = 2√(2βL₀)/μ (dashed) and the PL* region "
                    "r_{λ₀/2} (dotted)")  # fmt: skip
    rho_ax.set(
        xlabel="GD step t", ylabel="ρ(w_t) / μ", title="PL ratio along the path, μ = λ_min(K(w₀))"
    )
    loss_ax.legend(fontsize="small")
    fig.suptitle(
        f"Linear convergence of GD with η = 1/β: n = {setting['n']} digits, "
        f"depth-{setting['depth']} NTK tanh MLP, first seed"
    )
    return {"convergence": fig}
