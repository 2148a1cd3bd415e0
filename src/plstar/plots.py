"""Figures of the report layer (matplotlib, Agg canvas): the core never plots.

The figure is drawn on an explicit ``FigureCanvasAgg`` rather than through ``pyplot``, so importing
plstar never switches the user's matplotlib backend (a notebook keeps its own).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plstar.report import write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def png_bytes(figure: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes, drawn on its own Agg canvas (no pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _series(records: Sequence[Any], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) where ``key`` was measured and is a finite number."""
    steps, values = [], []
    for record in records:
        row = record if isinstance(record, Mapping) else vars(record)
        value = row.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            steps.append(int(row["step"]))
            values.append(float(value))
    return steps, values


def plot_training(
    records: Sequence[Any],
    path: str | Path,
    *,
    mu: float | None = None,
    radius: float | None = None,
    title: str | None = None,
    subsample: int | None = None,
    n: int | None = None,
) -> Path:
    """Four panels from monitor records (``Record`` objects or their dicts), saved as a PNG.

    The panels are :func:`training_figure`'s. Written atomically (temporary file, then rename).
    Cost: negligible next to training.
    """
    figure = training_figure(records, mu=mu, radius=radius, title=title, subsample=subsample, n=n)
    return write_bytes(path, png_bytes(figure))


def training_figure(
    records: Sequence[Any],
    *,
    mu: float | None = None,
    radius: float | None = None,
    title: str | None = None,
    subsample: int | None = None,
    n: int | None = None,
) -> Figure:
    """The four training panels as a matplotlib Figure on its own Agg canvas (no pyplot).

    Loss L(w_t) against the envelope rate^t·L₀ (log axis); λ_min and λ_max of the subsample kernel
    with μ = λ_min(K(w₀)) of the full kernel; relative kernel drift ‖K_t − K₀‖_F/‖K₀‖_F; the
    distance ‖w_t − w₀‖ against the radius R (log axis, so that both show when R ≫ the path).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 7.5), layout="constrained")
    FigureCanvasAgg(figure)
    loss_ax, kernel_ax, drift_ax, distance_ax = figure.subplots(2, 2).ravel()
    steps, losses = _series(records, "loss")
    env_steps, envelope = _series(records, "envelope")
    loss_ax.semilogy(steps, [max(v, 1e-300) for v in losses], label="L(w_t)")
    loss_ax.semilogy(
        env_steps, [max(v, 1e-300) for v in envelope], "--", label="envelope rate^t·L₀"
    )
    loss_ax.set(title="loss and the theory's envelope", xlabel="step", ylabel="L (summed)")
    loss_ax.legend()

    scope = "" if subsample is None else f" ({subsample} of {n} samples)"
    plotted: list[float] = []
    for key, label, style in (("lambda_min", "λ_min", "o-"), ("lambda_max", "λ_max", "s-")):
        xs, ys = _series(records, key)
        plotted += ys
        if xs:
            kernel_ax.plot(xs, ys, style, markersize=3, label=f"{label}(K_t){scope}")
    if mu is not None and math.isfinite(mu) and mu > 0:
        kernel_ax.axhline(mu, color="grey", linestyle=":", label="μ = λ_min(K(w₀)), full data")
        plotted.append(mu)
    if plotted and min(plotted) > 0:  # λ_min and λ_max differ by orders of magnitude
        kernel_ax.set_yscale("log")
    kernel_ax.set(title="tangent kernel extremes", xlabel="step")
    kernel_ax.legend(fontsize="small")

    xs, ys = _series(records, "drift")
    drift_ax.plot(xs, ys, "o-", markersize=3)
    drift_ax.set(title="relative kernel drift ‖K_t − K₀‖_F / ‖K₀‖_F" + scope, xlabel="step")

    xs, ys = _series(records, "distance")
    has_radius = radius is not None and math.isfinite(radius) and radius > 0
    if has_radius:  # log axis, so that both show when R ≫ the path; w₀ itself (0) is left out
        xs, ys = [s for s, d in zip(xs, ys, strict=True) if d > 0], [d for d in ys if d > 0]
        distance_ax.set_yscale("log")
        distance_ax.axhline(radius, color="red", linestyle="--", label=f"R = {radius:.3g}")
    distance_ax.plot(xs, ys, label="‖w_t − w₀‖")
    distance_ax.set(title="distance from w₀ and the theory's radius", xlabel="step")
    distance_ax.legend()
    if title:
        figure.suptitle(title)
    return figure


def plot_region(
    results: Sequence[Mapping[str, Any]], fit: Mapping[str, Any] | None, path: str | Path
) -> Path:
    """``plstar certify``'s figure: λ_min(K(w))/λ₀ along each direction family from w₀ (the last
    result), with μ = λ₀/2, R and the Hessian-control radius; with a width fit, the bracket and R
    against width with the fitted power laws. Written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11 if fit else 5.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2 if fit else 1, squeeze=False).ravel()
    last = results[-1]
    ax = axes[0]
    for crossing in last["region"]["crossings"]:
        radii, values = crossing["radii"], crossing["values"]
        shown = [(r, v / last["lambda0"]) for r, v in zip(radii, values, strict=True) if r > 0]
        if shown:
            ax.plot(*zip(*shown, strict=True), label=crossing["name"])
    ax.axhline(0.5, color="grey", linestyle=":", label="μ = λ₀/2")
    ax.axvline(last["radius"], color="red", linestyle="--", label="R (GD theorem)")
    if last["lower"] > 0:
        ax.axvline(last["lower"], color="black", linestyle=":", label="Hessian-control radius")
    ax.set_xscale("log")
    where = "" if last["width"] is None else f", width {last['width']}"
    ax.set(xlabel="‖w − w₀‖", ylabel="λ_min(K(w)) / λ₀", title=f"PL* region around w₀{where}")
    ax.legend(fontsize="x-small")
    if fit:
        ax = axes[1]
        widths = [r["width"] for r in results]
        for key, style, label in (("upper", "o-", "nearest crossing (upper)"),
                                  ("lower", "s-", "Hessian control (lower)"),
                                  ("radius", "r^--", "R")):  # fmt: skip
            values = [r[key] if math.isfinite(r[key]) else math.nan for r in results]
            ax.plot(widths, values, style, label=label)
        for key in ("upper", "lower"):
            line = fit.get(key)
            if line:
                crossing = line["width"]
                span = [min(widths), max(widths)]
                if math.isfinite(crossing):  # the fit drawn on to where it reaches R
                    span = [min(span[0], crossing), max(span[1], crossing)]
                ax.plot(span, [math.exp(line["intercept"]) * w ** line["slope"] for w in span],
                        ":", color="grey")  # fmt: skip
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set(xlabel="width", ylabel="distance from w₀", title="bracket and R against width")
        ax.legend(fontsize="x-small")
    return write_bytes(path, png_bytes(figure))
