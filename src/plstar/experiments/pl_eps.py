"""Experiment 7: PL*_ε on an almost over-parameterized system (THEORY.md item 7).

With m a little below n·k, K = DF DFᵀ has rank m < n·k: λ_min(K) ≡ 0, no PL* holds and the GD
theorem (item 2) promises no rate. Yet the loss is μ_ε-PL* wherever L ≥ ε > L*: writing the
residual r = r_∥ + r_⊥ along and across the range of DF, ρ(w) = rᵀKr/‖r‖² ≥ λ⁺·‖r_∥‖²/‖r‖²,
with λ⁺ the smallest non-zero eigenvalue of K (that of the m × m matrix DFᵀDF), and for a linear
model ‖r_⊥‖² = 2L* gives ρ ≥ λ⁺(1 − L*/L) ≥ λ⁺(1 − L*/ε) =: μ_ε
(:func:`plstar.theory.pl_eps_constant`, docs/theory.md item 7). Item 7
then bounds GD's first passage below ε by ⌊(β/μ_ε) log(L₀/ε)⌋ + 1
(:func:`plstar.theory.pl_eps_first_passage_bound`).

Measurement: GD by :func:`plstar.train` (η = 1/β, β re-measured every 500 steps) watched by a
:class:`plstar.Monitor` for ρ(w_t); λ_min(K(w₀)) by :func:`plstar.spectrum` (zero within precision);
λ⁺ as λ_min(DFᵀDF) at w₀ and at the last point w_T (their minimum is used: the network's kernel
moves, so the linear-model constant is a prediction here, not a theorem). L* is predicted before
the run by the model linearized at w₀, L*_lin = ½‖r₀ outside the range of DF(w₀)‖², and the
levels ε = c·L*_lin for c ∈ LEVELS (those below L₀) and μ_ε = λ⁺(1 − L*_lin/ε) are fixed from it
before GD starts (not chosen after the run from L_T). The tightness ρ/μ_ε is reported per level.
Per level: does ρ stay above μ_ε while L ≥ ε; is the first passage T_ε within the bound with
κ_ε = β/μ_ε, and within the tighter bound with the path's own PL*_ε constant min{ρ_t : L_t ≥ ε}.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from plstar import theory
from plstar.experiments.base import Check, ExperimentResult, Run
from plstar.experiments.common import (
    all_hold,
    finite,
    first_below,
    gaussian_problem,
    parameter_count,
    tanh_net,
)
from plstar.experiments.common import (
    figure as panel_figure,
)
from plstar.functional import ProgressCallback, jacobian_matrix, make_functional
from plstar.kernel import tangent_kernel
from plstar.monitor import Monitor
from plstar.spectrum import Spectrum, spectrum
from plstar.train import train

NUMBER = 7
TITLE = "PL*_ε: almost over-parameterized"
CLAIM = (
    "With m a little below n·k (λ_min(K) ≡ 0, no PL*), L is still μ_ε-PL* while L ≥ ε, and GD "
    "at η = 1/β first reaches ε within ⌊κ_ε log(L₀/ε)⌋ + 1 steps, κ_ε = β/μ_ε."
)

LEVELS = (1.25, 1.5, 2.0, 4.0, 10.0, 30.0)
"""ε = c·L_T; c close to 1 probes the bottom, where PL* itself fails."""
RECHECK = 500
QUICK = {"n": 16, "d": 12, "k": 4, "widths": [3], "steps": 1500}
FULL = {"n": 32, "d": 12, "k": 4, "widths": [6, 7], "steps": 20000}
"""m = (d + k)·width against n·k: 48/64 (quick), 96/128 and 112/128 (full)."""


def gauss_newton_spectrum(model: nn.Module, x: Tensor) -> Spectrum:
    """Extremes of DFᵀDF (m × m, float64): for m ≤ n·k its λ_min is the smallest non-zero
    eigenvalue λ⁺ of K = DF DFᵀ when DF has full column rank. Cost: n·k Jacobian rows, m³."""
    jacobian = jacobian_matrix(make_functional(model, x), x, torch.float64)
    return spectrum(jacobian.T @ jacobian)


def linearized_minimum(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """L* of the model linearized at its current w: ½‖r − DF·δ‖² at the least-squares δ, i.e.
    half the squared residual outside the range of DF (r = F(w) − y). Known before training, so
    the levels ε and μ_ε = λ⁺(1 − L*_lin/ε) are fixed before the run."""
    jacobian = jacobian_matrix(make_functional(model, x), x, torch.float64)
    with torch.no_grad():
        residual = (model(x) - y).double().reshape(-1)
    step = torch.linalg.lstsq(jacobian, residual.unsqueeze(1)).solution
    return 0.5 * float(((residual.unsqueeze(1) - jacobian @ step) ** 2).sum())


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (width, seed); every width keeps m < n·k."""
    size = QUICK if quick else FULL
    return [{"n": size["n"], "d": size["d"], "k": size["k"], "width": width,
             "steps": size["steps"], "seed": seed}
            for seed in range(seeds) for width in size["widths"]]  # fmt: skip


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """K(w₀) and λ⁺ at both ends of a monitored GD run; the loss and ρ at every step.

    Cost: two kernels/Jacobians and m³ eigensolves, plus ``steps`` GD steps (ρ comes free with
    the gradient GD computes anyway).
    """
    n, d, k = config["n"], config["d"], config["k"]
    x, y, model_seed = gaussian_problem(n, d, k, config["seed"])
    model = tanh_net(d, config["width"], k, model_seed)
    kernel = spectrum(tangent_kernel(model, x))
    start = gauss_newton_spectrum(model, x)
    predicted = linearized_minimum(model, x, y)
    monitor = Monitor(model, x, y, mu=theory.pl_constant(0.0 if kernel.is_singular else
                                                         kernel.lambda_min or 0.0),
                      every=config["steps"] + 1, kernel_samples=1, sharpness=False)  # fmt: skip
    result = train(model, x, y, steps=config["steps"], monitor=monitor, recheck_every=RECHECK,
                   progress=progress)  # fmt: skip
    end = gauss_newton_spectrum(model, x)
    return {
        "m": parameter_count(model), "nk": n * k,
        "kernel_lambda_min": kernel.lambda_min, "kernel_floor": kernel.precision_floor,
        "kernel_zero_within_precision": kernel.is_singular,
        "lambda_plus_start": start.lambda_min, "lambda_plus_end": end.lambda_min,
        "lambda_plus_floor": max(start.precision_floor, end.precision_floor),
        "loss_star_linear": predicted,
        "beta": result.beta, "final_step_size": result.final_step_size,
        "events": result.events,
        "losses": result.losses, "pl_ratios": [r.pl_ratio for r in monitor.history],
    }  # fmt: skip


def level_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Per level ε = c·L*_lin (fixed before the run, below L₀): μ_ε = λ⁺(1 − L*_lin/ε), the
    path's min ρ while L ≥ ε and its ratio to μ_ε (the bound's tightness), T_ε and both bounds.

    β of the bounds is 1/η for the smallest step GD used, the smoothness its steps assumed.
    """
    losses, ratios = data["losses"], data["pl_ratios"]
    loss0, last = losses[0], data["loss_star_linear"]
    lambda_plus = min(data["lambda_plus_start"], data["lambda_plus_end"])
    beta = 1.0 / data["final_step_size"]
    rows = []
    for c in LEVELS:
        eps = c * last
        if eps >= loss0:
            continue
        above = [rho for loss, rho in zip(losses, ratios, strict=True) if loss >= eps]
        mu_eps = theory.pl_eps_constant(lambda_plus, last, eps)
        path_mu = min(above)
        rows.append({
            "c": c, "eps": eps, "mu_eps": mu_eps, "path_mu": path_mu,
            "tightness": path_mu / mu_eps if mu_eps > 0 else None,
            "first_passage": first_below(losses, eps),
            "bound": finite(theory.pl_eps_first_passage_bound(beta, mu_eps, loss0, eps)),
            "path_bound": finite(theory.pl_eps_first_passage_bound(beta, path_mu, loss0, eps)),
        })  # fmt: skip
    return rows


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Checks: no PL* (K singular), ρ ≥ μ_ε while L ≥ ε, first passage within both bounds."""
    cases = [{"seed": r.config["seed"], "width": r.config["width"], **r.data,
              "levels": level_rows(r.data)} for r in runs]  # fmt: skip
    levels = [(case, row) for case in cases for row in case["levels"]]

    def where(case: dict[str, Any], row: dict[str, Any]) -> str:
        return f"m/nk = {case['m'] / case['nk']:.3g} seed {case['seed']} c = {row['c']:g}"

    def beyond(row: dict[str, Any], bound: str) -> bool:  # no bound (μ ≤ 0) counts as a failure
        return (
            row[bound] is None or row["first_passage"] is None or row["first_passage"] > row[bound]
        )

    low = [where(c, r) for c, r in levels if not r["path_mu"] >= r["mu_eps"] > 0]
    late = [where(c, r) for c, r in levels if beyond(r, "bound")]
    late_path = [where(c, r) for c, r in levels if beyond(r, "path_bound")]
    margin = min((r["path_mu"] / r["mu_eps"] for _, r in levels if r["mu_eps"] > 0),
                 default=math.nan)  # fmt: skip
    median_tightness = float(
        statistics.median(
            [r["tightness"] for _, r in levels if r["tightness"] is not None] or [math.nan]
        )
    )
    finals = ", ".join(f"{c['losses'][-1] / c['loss_star_linear']:.3g}" for c in cases)
    tight = max((r["first_passage"] / r["path_bound"] for _, r in levels
                 if r["first_passage"] is not None and r["path_bound"]), default=math.nan)  # fmt: skip

    def case(c: dict[str, Any]) -> str:
        return f"m/nk = {c['m'] / c['nk']:.3g} seed {c['seed']}"

    regular = [case(c) for c in cases if not c["kernel_zero_within_precision"]]
    deficient = [case(c) for c in cases if min(c["lambda_plus_start"], c["lambda_plus_end"])
                 <= c["lambda_plus_floor"]]  # fmt: skip
    kernels = ", ".join(f"{c['kernel_lambda_min']:.2g} (floor {c['kernel_floor']:.2g})"
                        for c in cases)  # fmt: skip
    ends = ", ".join(f"{c['lambda_plus_start']:.3g} → {c['lambda_plus_end']:.3g}" for c in cases)
    checks = [
        all_hold("λ_min(K(w₀)) is zero within precision (m < n·k): no PL*, no rate from item 2",
                 len(cases), regular, f"λ_min = {kernels}", "all", control=True),
        all_hold("λ⁺ = λ_min(DFᵀDF) > 0 at w₀ and w_T (DF has full column rank m)", len(cases),
                 deficient, f"λ⁺: {ends}", "all above the precision floor", control=True),
        all_hold("ρ(w_t) ≥ μ_ε = λ⁺(1 − L*_lin/ε) at every step with L_t ≥ ε, every level "
                 "(ε and μ_ε fixed before the run)", len(levels), low,
                 f"tightness min ρ/μ_ε = {margin:.3g}, median {median_tightness:.3g}; "
                 f"L_T/L*_lin = {finals}", "all"),
        all_hold("first passage T_ε ≤ ⌊(β/μ_ε) log(L₀/ε)⌋ + 1 at every level", len(levels), late,
                 "", "all"),
        all_hold("first passage T_ε ≤ the same bound with the path's PL*_ε constant "
                 "min{ρ_t : L_t ≥ ε}", len(levels), late_path, f"max T_ε/bound = {tight:.3g}",
                 "all"),
    ]  # fmt: skip
    return {"cases": cases, "levels": list(LEVELS)}, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """L_t and ρ_t; ρ against L with the predicted μ(L); T_ε against both bounds. Colour = run
    (legend in the first panel), line style = quantity (legend in each panel)."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter

    figure, (path_ax, ratio_ax, passage_ax) = panel_figure(
        3, title="PL*_ε: almost over-parameterized", width=5.2, height=4.4
    )
    for i, case in enumerate(result.data["cases"]):
        color, label = f"C{i}", f"m/nk = {case['m'] / case['nk']:.3g}, seed {case['seed']}"
        losses, ratios = case["losses"], case["pl_ratios"]
        path_ax.semilogy(losses, color=color, label=label)
        path_ax.semilogy(ratios, color=color, linestyle="--")
        ratio_ax.loglog(losses, ratios, color=color)
        lambda_plus = min(case["lambda_plus_start"], case["lambda_plus_end"])
        last = case["loss_star_linear"]
        grid = [last * 1.02**j for j in range(1, 2000) if last * 1.02**j <= losses[0]]
        ratio_ax.loglog(grid, [theory.pl_eps_constant(lambda_plus, last, v) for v in grid], color=color,
                        linestyle=":")  # fmt: skip
        rows = case["levels"]
        eps = [r["eps"] for r in rows]
        passage_ax.loglog(eps, [r["first_passage"] or math.nan for r in rows], "o-", color=color)
        passage_ax.loglog(eps, [r["bound"] or math.nan for r in rows], "s:", color=color)
        passage_ax.loglog(eps, [r["path_bound"] or math.nan for r in rows], "^--", color=color)

    def styles(ax: Any, entries: list[tuple[str, str | None, str]], **where: Any) -> None:
        handles = [Line2D([], [], color="grey", linestyle=ls, marker=mk, label=text)
                   for ls, mk, text in entries]  # fmt: skip
        ax.add_artist(ax.legend(handles=handles, fontsize="x-small", **where))

    styles(path_ax, [("-", None, "L_t"), ("--", None, "ρ(w_t)")], loc="lower left")
    path_ax.legend(  # after styles: it must stay the axes' own legend
        fontsize="x-small", loc="upper right", title="run", title_fontsize="x-small"
    )
    styles(ratio_ax, [("-", None, "ρ(w_t)"), (":", None, "μ(L) = λ⁺(1 − L_T/L)")],
           loc="lower right")  # fmt: skip
    styles(passage_ax, [("-", "o", "measured T_ε"), (":", "s", "⌊(β/μ_ε) log(L₀/ε)⌋ + 1"),
                        ("--", "^", "same, μ = path's min ρ while L ≥ ε")], loc="upper right")  # fmt: skip
    path_ax.set(xlabel="GD step t", title="loss and PL ratio along GD (η = 1/β)")
    ratio_ax.set(xlabel="L(w_t)", ylabel="ρ(w_t)", title="ρ stays above μ_ε while L ≥ ε")
    passage_ax.set(xlabel="ε", ylabel="steps", title="first passage below ε and its bounds")
    for ax in (ratio_ax, passage_ax):
        ax.xaxis.set_minor_formatter(NullFormatter())
    return {"pl_eps": figure}
