"""Figures of a landscape slice (report layer; matplotlib's object API on an Agg canvas, no pyplot).

A plane: four panels on the (a, b) grid — L with the PL* map's contours λ_min(K) = μ for a few
μ/λ₀, the PL* map λ_min(K(w)) itself, ρ(w), and θ_min(H_L) (negative: not convex there). A line:
L(t) above, ρ with λ_min(K) and λ_max(K) under it, then θ_min(H_L). λ_min values that are zero
within precision cannot sit on a log axis: they are left out and counted in the panel's title.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from plstar.landscape_results import Landscape
from plstar.plots import png_bytes
from plstar.report import write_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MU_LEVELS = (0.25, 0.5, 1.0, 2.0, 4.0)
"""μ/λ₀ of the PL* contours drawn over L (λ₀ = λ_min(K(w))); ½ is plstar certify's μ."""


def plot_landscape(found: Landscape, path: str | Path, *, title: str | None = None) -> Path:
    """Draw ``found`` (a plane: 2×2 panels; a line: three stacked panels) and write it as a PNG,
    atomically. Cost: negligible next to the slice."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plane = found.grid.dims == 2
    figure = Figure(figsize=(12, 9.5) if plane else (7, 8.5), layout="constrained")
    FigureCanvasAgg(figure)
    (_plane if plane else _line)(figure, found)
    cosine = found.cosine
    note = "" if cosine is None else f"; cos∠(u, v) = {cosine:.2g}"
    figure.suptitle(f"{title or 'loss landscape'} (n = {found.n}, k = {found.k}, "
                    f"m = {found.m:,}{note})")  # fmt: skip
    return write_bytes(path, png_bytes(figure))


def _axis_label(found: Landscape, axis: int, letter: str) -> str:
    d = found.directions[axis]
    return f"{letter} · {d.label} (‖d‖ = {d.norm:.3g})"


def _lambda0(found: Landscape) -> float:
    return math.nan if found.origin is None else found.origin.lambda_min


def _positive(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Values for a log scale: zeros (within precision) masked, and how many there were."""
    zeros = int(np.sum(values <= 0))
    return np.where(values > 0, values, np.nan), zeros


def _zeros_note(zeros: int) -> str:
    return f"; {zeros} point(s) 0 within precision (blank)" if zeros else ""


def _mark_points(ax: Axes, found: Landscape, legend: bool) -> None:
    """w at the origin; the second point of a segment at coordinate 1."""
    ax.plot([0], [0], marker="*", color="white", markeredgecolor="black", markersize=13,
            linestyle="none", label="w")  # fmt: skip
    for axis, d in enumerate(found.directions):
        if d.kind == "segment":
            at = [0.0, 0.0]
            at[axis] = 1.0
            ax.plot(*at, marker="o", color="white", markeredgecolor="black", markersize=8,
                    linestyle="none", label="w₂ (segment end)")  # fmt: skip
    if legend:
        ax.legend(loc="upper right", fontsize="x-small")


def _plane(figure: Figure, found: Landscape) -> None:
    from matplotlib.colors import LogNorm, SymLogNorm

    a, b = (np.asarray(axis) for axis in found.grid.axes)
    (loss_ax, kernel_ax), (ratio_ax, hessian_ax) = figure.subplots(2, 2)
    loss = found.values("loss")
    log_loss = np.log10(np.maximum(loss, 1e-300))
    filled = loss_ax.contourf(a, b, log_loss.T, levels=24, cmap="viridis")
    figure.colorbar(filled, ax=loss_ax, label="log₁₀ L")
    lambda0 = _lambda0(found)
    if found.grid.kernel_axes and lambda0 > 0:
        ka, kb = (np.asarray(axis) for axis in found.grid.kernel_axes)
        ratio = found.values("lambda_min") / lambda0
        levels = [v for v in MU_LEVELS if np.nanmin(ratio) < v < np.nanmax(ratio)]
        if levels:
            lines = loss_ax.contour(ka, kb, ratio.T, levels=levels, colors="white",
                                    linewidths=1.2)  # fmt: skip
            loss_ax.clabel(lines, fmt=lambda v: f"μ={v:g}λ₀", fontsize="x-small")
    loss_ax.set_title("L = ½‖F − y‖² with the PL* map: λ_min(K) = μ contours")

    if found.grid.kernel_axes:
        ka, kb = (np.asarray(axis) for axis in found.grid.kernel_axes)
        values, zeros = _positive(found.values("lambda_min"))
        if np.any(np.isfinite(values)):
            mesh = kernel_ax.pcolormesh(ka, kb, values.T, shading="nearest", cmap="magma",
                                        norm=LogNorm())  # fmt: skip
            figure.colorbar(mesh, ax=kernel_ax, label="λ_min(K(w)): PL* holds with this μ")
        kernel_ax.contour(a, b, log_loss.T, levels=10, colors="grey", linewidths=0.6)
        kernel_ax.set_title(f"PL* map λ_min(K(w)), λ₀ = {lambda0:.3g} at w{_zeros_note(zeros)}")

    hessian = found.values("hessian_min")
    if np.any(np.isfinite(hessian)):
        ka, kb = (np.asarray(axis) for axis in found.grid.kernel_axes)
        scale = float(np.nanmax(np.abs(hessian))) or 1.0
        mesh = hessian_ax.pcolormesh(
            ka, kb, hessian.T, shading="nearest", cmap="RdBu",
            norm=SymLogNorm(linthresh=1e-3 * scale, vmin=-scale, vmax=scale),
        )  # fmt: skip
        figure.colorbar(mesh, ax=hessian_ax, label="θ_min(H_L) ≥ λ_min(H_L)")
        negative = int(np.nansum(found.values("negative_curvature")))
        total = len(found.kernel_points)
        hessian_ax.set_title(f"θ_min(H_L) ({found.hessian_steps} Lanczos steps): < 0, not "
                             f"convex, at {negative} of {total}")  # fmt: skip
    else:  # no Hessian asked for (or no coarse grid): no empty panel
        hessian_ax.set_axis_off()
    if not found.grid.kernel_axes:
        kernel_ax.set_axis_off()

    values, _ = _positive(found.values("pl_ratio"))
    mesh = ratio_ax.pcolormesh(a, b, values.T, shading="nearest", cmap="cividis", norm=LogNorm())
    figure.colorbar(mesh, ax=ratio_ax, label="ρ(w)")
    ratio_ax.set_title("PL ratio ρ = ‖∇L‖²/(2L) ≥ λ_min(K)")
    for ax in (loss_ax, kernel_ax, ratio_ax, hessian_ax):
        if ax.axison:  # every panel on the span of the fine grid, whatever its own grid
            ax.set(xlabel=_axis_label(found, 0, "a"), ylabel=_axis_label(found, 1, "b"),
                   xlim=(a[0], a[-1]), ylim=(b[0], b[-1]))  # fmt: skip
            _mark_points(ax, found, legend=ax is loss_ax)


def _line(figure: Figure, found: Landscape) -> None:
    t = np.asarray(found.grid.axes[0])
    hessian = found.values("hessian_min")
    curvature = bool(np.any(np.isfinite(hessian)))  # a third panel only when H_L was measured
    axes = figure.subplots(3 if curvature else 2, 1, sharex=True)
    loss_ax, ratio_ax = axes[:2]
    loss_ax.semilogy(t, np.maximum(found.values("loss"), 1e-300), label="L")
    loss_ax.set(ylabel="L (summed)", title="L along the line")
    ratio, _ = _positive(found.values("pl_ratio"))
    ratio_ax.semilogy(t, ratio, label="ρ(w) (every point)")
    zeros = 0
    if found.grid.kernel_axes:
        kt = np.asarray(found.grid.kernel_axes[0])
        low, zeros = _positive(found.values("lambda_min"))
        ratio_ax.semilogy(kt, low, "o-", markersize=4, label="λ_min(K(w)): PL* with this μ")
        ratio_ax.semilogy(kt, found.values("lambda_max"), "s--", markersize=3,
                          label="λ_max(K(w))")  # fmt: skip
        lambda0 = _lambda0(found)
        if lambda0 > 0:
            ratio_ax.axhline(lambda0 / 2, color="grey", linestyle=":", label="μ = λ₀/2")
    ratio_ax.set(title=f"ρ and the PL* map{_zeros_note(zeros)}")
    ratio_ax.legend(fontsize="x-small")
    if curvature:
        hessian_ax = axes[2]
        hessian_ax.plot(np.asarray(found.grid.kernel_axes[0]), hessian, "o-", markersize=4,
                        color="tab:red")  # fmt: skip
        scale = float(np.nanmax(np.abs(hessian))) or 1.0
        hessian_ax.set_yscale("symlog", linthresh=1e-3 * scale)
        hessian_ax.axhline(0, color="black", linewidth=0.8)
        hessian_ax.set(title=f"θ_min(H_L) after {found.hessian_steps} Lanczos steps (< 0: not "
                       "convex)", ylabel="θ_min(H_L)")  # fmt: skip
    axes[-1].set(xlabel=_axis_label(found, 0, "t"))
    for ax in axes:
        ax.axvline(0, color="black", linestyle=":", linewidth=0.8)
        if found.directions[0].kind == "segment":
            ax.axvline(1, color="tab:green", linestyle=":", linewidth=0.8)
