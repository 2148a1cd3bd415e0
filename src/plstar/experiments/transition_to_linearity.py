"""Experiment 1: transition to linearity — ‖H_F‖ at w₀ decays like 1/√m only with a linear output.

For NTK-parameterized networks with a twice-differentiable activation and a linear output layer,
‖H_F‖ = max_j ‖H_{F_j}‖₂ = Õ(1/√m) (THEORY.md item 5; LZB §4 and Liu, Zhu & Belkin, NeurIPS 2020),
so the log-log slope of ‖H_F(w₀)‖ against the width is −½ up to log factors. A non-linear output
layer (tanh applied to the output) adds φ''(f̃)∇f̃∇f̃ᵀ, of norm Θ(1); a width-1 bottleneck does the
same inside the network: in both, ‖H_F‖ does not decay.

Measured: one-hidden-layer tanh networks (depth 2: the widest, 2^13, has m ≈ 5.4·10⁵ parameters;
deeper nets at that width are beyond a CPU budget), n = 8 digits, ‖H_F‖ = the maximum over all
n·k = 8 outputs by batched Lanczos on Hessian-vector products (``plstar.model_hessian_norm``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

import plstar
from plstar.experiments.base import Check, ExperimentResult, Run, check_range, check_true
from plstar.experiments.common import (
    VARIANTS,
    by_key,
    digits_problem,
    figure,
    loglog_slope,
    reference_slope,
    seeds_of,
    width_axis,
)
from plstar.experiments.common import network as build_network
from plstar.functional import ProgressCallback
from plstar.models import describe_model

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUMBER = 1
TITLE = "Transition to linearity"
CLAIM = (
    "‖H_F(w₀)‖ of an NTK-parameterized network with a linear output layer decays like width^−½; "
    "with a non-linear output layer or a width-1 bottleneck it does not decay."
)

QUICK_WIDTHS = [2**p for p in range(4, 10)]
FULL_WIDTHS = [2**p for p in range(5, 14)]
SLOPE_LINEAR = (-0.7, -0.3)
"""The theory's −½ with room for the log factor of Õ and for finite-width curvature."""
SLOPE_FLAT = (-0.2, 0.2)
"""Θ(1), slope 0, with the same ±0.2 as the linear check: the two ranges do not overlap."""
DRAWS = {"linear": 1, "nonlinear-output": 1, "bottleneck": 4}
"""Networks per configuration (geometric mean of their ‖H_F‖). Through the bottleneck, ‖H_F‖ is
dominated by g₂''(b)·∇b∇bᵀ, where g₂''(b) is a 1/√m-normalised sum of m random terms: an O(1)
random variable at every width (log-spread ≈ 0.4 measured), which one draw per width turns into a
slope noise of ±0.2; four draws halve it. The other families' ‖H_F‖ concentrate."""
DRAW_SEED_STRIDE = 7919
LANCZOS_TOL = 1e-4
LANCZOS_RELATIVE_ERROR = 1e-3
LABELS = {
    "linear": "linear output",
    "nonlinear-output": "tanh on the output",
    "bottleneck": "width-1 bottleneck",
}


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """Every (variant, width, seed): widths 2^4..2^9 (quick) or 2^5..2^13, depth 2, n = 8."""
    widths = QUICK_WIDTHS if quick else FULL_WIDTHS
    return [
        {"variant": variant, "width": width, "depth": 2, "n": 8, "activation": "tanh",
         "draws": DRAWS[variant], "seed": seed}
        for variant in VARIANTS for width in widths for seed in seeds_of(seeds)
    ]  # fmt: skip


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """‖H_F(w₀)‖ over all n·k outputs for each of ``draws`` networks (seeds seed + 7919·j) on the
    same data. Cost per draw: ≤ 40 per-sample HVPs per output (≈ 10 s at width 2^13)."""
    data = digits_problem(config["n"], config["seed"])
    draws = []
    for j in range(config["draws"]):
        if progress is not None:
            progress("‖H_F(w₀)‖", j, config["draws"])
        model = build_network(
            config["variant"], data.d, config["width"], config["depth"], data.k,
            config["seed"] + DRAW_SEED_STRIDE * j, config["activation"],
        )  # fmt: skip
        found = plstar.model_hessian_norm(
            model, data.x, outputs=None, tol=LANCZOS_TOL, seed=config["seed"]
        )
        draws.append({"value": found.value, "error_bound": found.error_bound,
                      "argmax_output": found.argmax_output, "products": found.products})  # fmt: skip
    if progress is not None:
        progress("‖H_F(w₀)‖", config["draws"], config["draws"])
    values = [d["value"] for d in draws]
    return {
        "hessian_norm": float(np.exp(np.mean(np.log(values)))), "draws": draws,
        "relative_error": max(d["error_bound"] / d["value"] for d in draws),
        "outputs_examined": found.outputs_examined, "outputs_total": found.outputs_total,
        "m": sum(p.numel() for p in model.parameters()), "model": describe_model(model),
    }  # fmt: skip


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Per variant: widths, ‖H_F‖ per seed, the geometric mean, and the least-squares log-log
    slope over every (width, seed) point; checks on the three slopes and on Lanczos accuracy."""
    data: dict[str, Any] = {"variants": {}}
    for variant, group in by_key(runs, "variant").items():
        widths = by_key(group, "width")
        values = [[r.data["hessian_norm"] for r in rs] for rs in widths.values()]
        points = [(w, r.data["hessian_norm"]) for w, rs in widths.items() for r in rs]
        slope = loglog_slope([w for w, _ in points], [v for _, v in points])
        data["variants"][variant] = {
            "widths": list(widths), "m": [rs[0].data["m"] for rs in widths.values()],
            "values": values, "mean": [float(np.exp(np.mean(np.log(v)))) for v in values],
            "slope": slope,
        }  # fmt: skip
    first = runs[0].config if runs else {}
    data["setting"] = {k: first.get(k) for k in ("depth", "n", "activation")}
    slopes = {v: data["variants"].get(v, {}).get("slope", math.nan) for v in VARIANTS}
    checks = [
        check_range("slope of ‖H_F‖ vs width, linear output (theory −½)",
                    slopes["linear"], *SLOPE_LINEAR),
        check_range("slope of ‖H_F‖ vs width, tanh on the output (no decay)",
                    slopes["nonlinear-output"], *SLOPE_FLAT),
        check_range("slope of ‖H_F‖ vs width, width-1 bottleneck (no decay)",
                    slopes["bottleneck"], *SLOPE_FLAT),
    ]  # fmt: skip
    worst = max((r.data["relative_error"] for r in runs), default=math.inf)
    checks.append(
        check_true(
            "every ‖H_F‖ converged (Lanczos residual / value)",
            worst <= LANCZOS_RELATIVE_ERROR,
            f"{worst:.2g}",
            f"≤ {LANCZOS_RELATIVE_ERROR:g}",
        )
    )
    return data, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``hessian_norm_vs_width``: ‖H_F(w₀)‖ against width, log-log, each family with its fit."""
    fig, (ax,) = figure(width=6.5, height=4.8)
    colors = {"linear": "C0", "nonlinear-output": "C3", "bottleneck": "C2"}
    variants = result.data["variants"]
    for variant, entry in variants.items():
        widths, color = entry["widths"], colors.get(variant, "k")
        for w, vs in zip(widths, entry["values"], strict=True):
            ax.loglog([w] * len(vs), vs, ".", color=color, alpha=0.35)
        label = f"{LABELS.get(variant, variant)}: slope {entry['slope']:.2f}"
        ax.loglog(widths, entry["mean"], "o-", color=color, label=label)
    if "linear" in variants:
        entry = variants["linear"]
        reference_slope(ax, entry["widths"], entry["mean"][0], -0.5, "slope −½ (theory)")
    setting = result.data["setting"]
    ax.set(
        ylabel="‖H_F(w₀)‖ = max over outputs j of ‖H_Fj‖₂",
        title=f"Transition to linearity: NTK tanh MLP, depth {setting['depth']}, "
              f"n = {setting['n']} digits",
    )  # fmt: skip
    width_axis(ax)
    ax.legend(fontsize="small")
    return {"hessian_norm_vs_width": fig}
