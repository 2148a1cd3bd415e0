"""Figures of experiment 11 (:mod:`plstar.experiments.pl_region`)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from plstar.experiments.base import ExperimentResult
from plstar.experiments.common import figure, reference_slope, width_axis

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``radii``: r_μ (per direction family), the Hessian-control radius and R against width, the
    crossover marked, and sup ‖H_F‖ on the fixed ball; ``directions``: λ_min(K(w))/λ₀ along each
    direction family at the narrowest and widest width of the first family."""
    families = result.data["families"]
    fig, axes = figure(2, rows=len(families), width=5.5, title=result.title)
    for row, (family, f) in enumerate(families.items()):
        radius_ax, hessian_ax = axes[2 * row], axes[2 * row + 1]
        widths = f["widths"]
        for name, values in f["by_direction"].items():
            shown = [(w, v) for w, v in zip(widths, values, strict=True) if v is not None]
            if shown:
                radius_ax.plot(*zip(*shown, strict=True), "o", markersize=3, alpha=0.5, label=name)
        radius_ax.plot(widths, [v or math.nan for v in f["r_mu"]], "k-", label="r_μ (smallest)")
        radius_ax.plot(widths, f["r_lower"], "k:", label="Hessian-control radius")
        radius_ax.plot(widths, f["radius"], "r--", label="R = 2√(2βL₀)/μ, β on the ball")
        if f["crossover"]:
            radius_ax.axvline(
                f["crossover"], color="red", alpha=0.4, label=f"m* = {f['crossover']}"
            )
        radius_ax.set_yscale("log")
        width_axis(radius_ax, "width (channels for the CNN)")
        radius_ax.set(
            ylabel="distance from w₀", title=f"{family}: PL* region (μ = λ₀/2) and GD ball"
        )
        radius_ax.legend(fontsize="x-small")
        hessian_ax.plot(widths, f["sup_hessian_norm"], "o-", label="sup ‖H_F‖ sampled")
        reference_slope(hessian_ax, widths, f["sup_hessian_norm"][0], -0.5, "slope −½")
        width_axis(hessian_ax, "width (channels for the CNN)")
        hessian_ax.set(ylabel="sup ‖H_F‖ on B(w₀, r_ball)", title=f"{family}: Hessian control")
        hessian_ax.legend(fontsize="small")
    figs = {"radii": fig}
    first = next(iter(families.values()))
    chosen = [str(first["widths"][0]), str(first["widths"][-1])]
    fig, axes = figure(2, width=5.5, title="λ_min(K(w)) / λ₀ along each direction family")
    for ax, width in zip(axes, chosen, strict=True):
        curves = first["curves"][width]
        for name, c in curves.items():
            if isinstance(c, dict) and c["radii"]:
                ax.plot(c["radii"][1:] if name == "adversarial" else c["radii"],
                        np.array(c["values"][1:] if name == "adversarial" else c["values"])
                        / curves["lambda0"], label=name)  # fmt: skip
        ax.axhline(0.5, color="grey", linestyle=":", label="μ = λ₀/2")
        ax.axvline(curves["radius"], color="red", linestyle="--", label="R")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="‖w − w₀‖", ylabel="λ_min(K(w)) / λ₀", title=f"width {width}")
        ax.legend(fontsize="x-small")
    figs["directions"] = fig
    return figs
