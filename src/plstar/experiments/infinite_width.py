"""Experiment 10: the empirical tangent kernel of a width-m MLP converges to the analytic NTK.

K_∞ is :func:`plstar.infinite_width.infinite_width_ntk` of the network ``mlp(64, m, depth=3, 1,
activation=φ, parameterization="ntk")`` (plstar's NTK layers: N(0, 1) weights, trainable biases
that start at zero), for φ = ReLU and erf, whose Gaussian expectations have closed forms; the
recursion is derived in :mod:`plstar.infinite_width`. K_m is :func:`plstar.tangent_kernel` of such
a network at initialisation, on n digits (centred, rows of norm √64, so that the first
pre-activation has unit variance). For each width and activation, ``draws`` independent networks;
we record ‖K_m − K_∞‖_F/‖K_∞‖_F (also the spectral norm) and |λ_min(K_m) − λ_min(K_∞)| (float64
spectra). Fluctuations of K_m are O(m^{-1/2}) (the kernel is an average over m hidden units), so
the log-log slope of each error against m should be −1/2.

λ_min's error also carries a second-order part: λ_min is concave, so E λ_min(K_m) < λ_min(K_∞)
by O(‖K_m − K_∞‖²/gap) = O(1/m), which can steepen its slope at small widths; the check for it
therefore asks for a decay at least as fast as m^{-1/2} (slope ≤ −0.35), while the Frobenius error,
whose first-order term dominates, must have slope in [−0.65, −0.35].
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.ticker import NullLocator

from plstar.certify import lambda_min_within_precision
from plstar.experiments.base import Check, ExperimentResult, Run, check_range
from plstar.experiments.common import digits_problem, figure, loglog_slope, placed, seeds_of
from plstar.functional import ProgressCallback
from plstar.infinite_width import infinite_width_ntk
from plstar.kernel import tangent_kernel
from plstar.models import mlp
from plstar.spectrum import spectrum

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUMBER = 10
TITLE = "Infinite-width reference"
CLAIM = (
    "The tangent kernel K_m of an NTK-parameterized MLP of width m converges to the analytic "
    "infinite-width NTK K_∞: ‖K_m − K_∞‖/‖K_∞‖ and |λ_min(K_m) − λ_min(K_∞)| shrink like m^{-1/2}."
)

ACTIVATIONS = ("relu", "erf")
DEPTH = 3
QUICK = {"n": 64, "widths": [64, 128, 256, 512, 1024, 2048], "draws": 4}
FULL = {"n": 128, "widths": [64, 128, 256, 512, 1024, 2048, 4096], "draws": 16}
FROBENIUS_SLOPE = (-0.65, -0.35)
LAMBDA_MIN_SLOPE_MAX = -0.35


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (activation, width, seed), each with ``draws`` networks."""
    size = QUICK if quick else FULL
    return [
        {"activation": act, "width": w, "seed": s, "n": size["n"], "draws": size["draws"],
         "depth": DEPTH}
        for s in seeds_of(seeds) for act in ACTIVATIONS for w in size["widths"]
    ]  # fmt: skip


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """Errors of ``draws`` width-m networks against K_∞. Cost: ``draws`` tangent kernels
    (n×n, m² parameters each) and n×n eigensolves; K_∞ itself is negligible."""
    # The data subset is fixed (seed 0), so that every configuration compares with the same K_∞.
    x = digits_problem(config["n"], seed=0).x
    depth, activation = config["depth"], config["activation"]
    limit = infinite_width_ntk(x, depth=depth, activation=activation)
    limit_spectrum = spectrum(limit)
    limit_min = lambda_min_within_precision(limit_spectrum)
    out: dict[str, list[float]] = {"frobenius": [], "spectral": [], "lambda_min": []}
    for draw in range(config["draws"]):
        key = [config["seed"], config["width"], draw]
        net_seed = int(np.random.SeedSequence(key).generate_state(1)[0])
        net = placed(mlp(x.shape[1], config["width"], depth, 1, activation=activation,
                         generator_seed=net_seed, dtype=torch.float64))  # fmt: skip
        diff = tangent_kernel(net, x) - limit
        out["frobenius"].append(float(diff.norm() / limit.norm()))
        out["spectral"].append(float(torch.linalg.matrix_norm(diff, ord=2)))
        out["lambda_min"].append(lambda_min_within_precision(spectrum(diff + limit)))
        if progress is not None:
            progress(f"{activation} width {config['width']}", draw + 1, config["draws"])
    return {
        "limit_lambda_min": limit_min, "limit_lambda_max": limit_spectrum.lambda_max,
        "limit_norm": float(limit.norm()), "limit_spectral_norm": float(limit_spectrum.lambda_max),
        "frobenius_error": out["frobenius"], "spectral_error": out["spectral"],
        "lambda_min": out["lambda_min"],
        "lambda_min_error": [abs(v - limit_min) for v in out["lambda_min"]],
    }  # fmt: skip


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Per activation: mean errors per width and the fitted log-log slopes, with their checks."""
    data: dict[str, Any] = {}
    checks: list[Check] = []
    for act in ACTIVATIONS:
        mine = [r for r in runs if r.config["activation"] == act]
        if not mine:
            continue
        widths = sorted({r.config["width"] for r in mine})
        series: dict[str, Any] = {"widths": widths}
        for key in ("frobenius_error", "spectral_error", "lambda_min_error"):
            points = [(r.config["width"], v) for r in mine for v in r.data[key]]
            per_width = [[v for w, v in points if w == width] for width in widths]
            slope = loglog_slope([w for w, _ in points], [v for _, v in points])
            # Draw j at each width is an independent network, so the slopes of the curves
            # "draw j against width" are independent estimates: their spread gives the s.e.
            curves = [loglog_slope(widths, column) for column in zip(*per_width, strict=False)]
            error = float(np.std(curves, ddof=1) / math.sqrt(len(curves)))
            series[key] = {"mean": [float(np.mean(v)) for v in per_width],
                           "all": per_width, "slope": slope, "slope_error": error}  # fmt: skip
        # signed λ_min(K_m) − λ_min(K_∞): negative on average, the O(1/m) concavity bias
        series["lambda_min_bias"] = [
            float(np.mean([v - r.data["limit_lambda_min"] for r in mine
                           if r.config["width"] == width for v in r.data["lambda_min"]]))
            for width in widths
        ]  # fmt: skip
        series["limit_lambda_min"] = mine[0].data["limit_lambda_min"]
        series["limit_lambda_max"] = mine[0].data["limit_lambda_max"]
        series["draws"] = sum(len(r.data["frobenius_error"]) for r in mine)
        data[act] = series
        fro, lam = series["frobenius_error"], series["lambda_min_error"]
        checks.append(check_range(
            f"{act}: slope of ‖K_m − K_∞‖_F/‖K_∞‖_F against m (log-log; expected −1/2; "
            f"s.e. {fro['slope_error']:.2g})", fro["slope"], *FROBENIUS_SLOPE,
        ))  # fmt: skip
        checks.append(check_range(
            f"{act}: slope of |λ_min(K_m) − λ_min(K_∞)| against m (decays at least like m^(-1/2); "
            f"s.e. {lam['slope_error']:.2g})", lam["slope"], -math.inf, LAMBDA_MIN_SLOPE_MAX,
        ))  # fmt: skip
    return data, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``convergence``: both errors against width (log-log) with the m^{-1/2} reference lines."""
    canvas, panels = figure(2, width=5.5, height=4.5)
    labels = {"frobenius_error": "‖K_m − K_∞‖_F / ‖K_∞‖_F",
              "lambda_min_error": "|λ_min(K_m) − λ_min(K_∞)| / λ_min(K_∞)"}  # fmt: skip
    for ax, key in zip(panels, labels, strict=True):
        for index, (act, series) in enumerate(result.data.items()):
            color, widths = f"C{index}", series["widths"]
            scale = series["limit_lambda_min"] if key == "lambda_min_error" else 1.0
            scale = scale if scale > 0 else 1.0
            for width, values in zip(widths, series[key]["all"], strict=True):
                ax.loglog([width] * len(values), [v / scale for v in values], ".", alpha=0.3,
                          color=color)  # fmt: skip
            means = [v / scale for v in series[key]["mean"]]
            ax.loglog(widths, means, "o-", color=color,
                      label=f"{act}: mean of draws (slope {series[key]['slope']:.2f})")  # fmt: skip
            # the m^(-1/2) line through the means (least squares in logs, slope fixed)
            level = np.exp(np.mean(np.log(means) + 0.5 * np.log(widths)))
            reference = [level / math.sqrt(w) for w in widths]
            ax.loglog(widths, reference, ":", color=color, label=f"{act}: ∝ m^(-1/2)")
        ax.set(title=labels[key], xlabel="width m")
        ticks = sorted({w for series in result.data.values() for w in series["widths"]})
        ax.set_xticks(ticks, labels=[str(w) for w in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize="small")
    canvas.suptitle(f"Empirical NTK vs the analytic infinite-width NTK (depth {DEPTH}, digits)")
    return {"convergence": canvas}
