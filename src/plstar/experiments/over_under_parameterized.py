"""Experiment 4: over- versus under-parameterized (THEORY.md item 8).

rank K ≤ min(m, n·k), so for m < n·k the tangent kernel is singular, λ_min(K) ≡ 0 and no PL*
constant exists; for m > n·k it is generically non-singular and GD at η = 1/β converges
exponentially (item 2). We sweep m/(n·k) from ¼ to 8 twice: over the hidden width at fixed n, and
over n at fixed width. Per point we measure at w₀ λ_min(K) with :func:`plstar.spectrum` (float64,
reported *zero within precision* when it does not exceed the precision floor), the numerical rank
of K (eigenvalues above that floor), and train with :func:`plstar.train` (GD, η = 1/β) for a
fixed number of steps: the final loss and the first step with L < 10⁻⁶·L₀.

Problem (also used by experiments 5–7, which import the helpers below): inputs x ~ N(0, I_d), so
‖x‖² ≈ d as the NTK parameterization wants (THEORY.md) and the inputs are in general position;
targets y ~ N(0, I_k), pure noise, so that no model with m < n·k fits them; the model is a one
hidden layer tanh network without biases in NTK parameterization, m = (d + k)·width, float64.
Why not digits: their 64 pixels span only ≈ 57 dimensions after centring, so first-layer weights
orthogonal to that span do not move F and the nominal m overstates the parameters that count
(measured: with n = 32, k = 10, K is singular at m/(n·k) = 1.9); and parity targets are nearly fit
by under-parameterized nets. Gaussian inputs put the threshold exactly at m = n·k.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from matplotlib.figure import Figure

from plstar import theory
from plstar.experiments.base import Check, ExperimentResult, Run
from plstar.experiments.common import (
    all_hold,
    first_below,
    gaussian_problem,
    parameter_count,
    tanh_net,
)
from plstar.experiments.common import figure as panel_figure
from plstar.functional import ProgressCallback
from plstar.kernel import tangent_kernel
from plstar.spectrum import spectrum
from plstar.train import train

NUMBER = 4
TITLE = "Over- versus under-parameterized"
CLAIM = (
    "For m < n·k the tangent kernel is singular (λ_min(K) = 0 within precision: no PL*) and GD "
    "stalls at a positive loss; for m > n·k λ_min(K) > 0 and GD at η = 1/β converges to zero loss."
)

TARGET = 1e-6
"""Converged means L < TARGET·L₀."""
RECHECK = 500
RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
QUICK = {"d": 12, "k": 4, "n": 16, "width": 8, "steps": 1500, "ratios": RATIOS}
FULL = {"d": 12, "k": 4, "n": 64, "width": 32, "steps": 6000,
        "ratios": (0.25, 0.375, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)}  # fmt: skip
"""m = (d + k)·width = 16·width and n·k = 4n: the width sweep uses widths ratio·n/4 at the fixed n
(every ratio exact), the sample sweep n = round(4·width/ratio) at the fixed width (exact for the
powers of two; the data record the ratio actually run)."""


# ----------------------------------------------------------------------------- experiment
def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (sweep, ratio, seed): the width sweep at fixed n, the n sweep at fixed width."""
    size = QUICK if quick else FULL
    common = {"d": size["d"], "k": size["k"], "steps": size["steps"]}
    per_unit = size["d"] + size["k"]  # parameters per hidden unit
    units = []
    for seed in range(seeds):
        for ratio in size["ratios"]:
            width = round(ratio * size["n"] * size["k"] / per_unit)
            units.append({"sweep": "width", "n": size["n"], "width": width, "seed": seed, **common})
        for ratio in size["ratios"]:
            n = round(per_unit * size["width"] / (ratio * size["k"]))
            units.append({"sweep": "samples", "n": n, "width": size["width"], "seed": seed,
                          **common})  # fmt: skip
    return units


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """λ_min, precision floor and rank of K(w₀), then GD at η = 1/β for ``steps`` steps.

    Cost: one kernel (n·k)² entries and two (n·k)³ eigensolves, plus ``steps`` GD steps.
    """
    n, d, k = config["n"], config["d"], config["k"]
    x, y, model_seed = gaussian_problem(n, d, k, config["seed"])
    model = tanh_net(d, config["width"], k, model_seed)
    m = parameter_count(model)
    kernel = tangent_kernel(model, x)
    found = spectrum(kernel)
    eigenvalues = torch.linalg.eigvalsh(kernel)  # all of them, for the rank only
    rank = int((eigenvalues > found.precision_floor).sum())
    # β is re-measured every RECHECK steps (train lowers η if it grew; a loss rise halves η at
    # once): train's default of 100 would spend a third of the run on those Lanczos steps.
    result = train(model, x, y, steps=config["steps"], recheck_every=RECHECK, progress=progress)
    losses = result.losses
    return {
        "m": m, "nk": n * k, "ratio": m / (n * k), "lambda_min": found.lambda_min,
        "lambda_max": found.lambda_max, "precision_floor": found.precision_floor,
        "zero_within_precision": found.is_singular, "rank": rank, "beta": result.beta,
        "loss0": losses[0], "final_loss": losses[-1], "steps": result.steps,
        "target": TARGET * losses[0], "steps_to_target": first_below(losses, TARGET * losses[0]),
        "overparameterized": theory.is_overparameterized(m, n * k),
    }  # fmt: skip


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Points per sweep; checks: K singular below the threshold, non-singular above, rank, and
    GD converging above (m ≥ 2nk) but not below."""
    points = [{"sweep": r.config["sweep"], "seed": r.config["seed"], "n": r.config["n"],
               "width": r.config["width"], **r.data} for r in runs]  # fmt: skip
    points.sort(key=lambda p: (p["sweep"], p["ratio"], p["seed"]))
    under = [p for p in points if p["m"] < p["nk"]]
    over = [p for p in points if p["m"] > p["nk"]]
    well_over = [p for p in points if p["m"] >= 2 * p["nk"]]

    def where(p: dict[str, Any]) -> str:
        return f"{p['sweep']} sweep m/nk = {p['ratio']:.3g} (seed {p['seed']})"

    bad_under = [where(p) for p in under if not p["zero_within_precision"]]
    bad_over = [where(p) for p in over if p["zero_within_precision"]]
    bad_rank = [f"{where(p)}: {p['rank']}" for p in points if p["rank"] != min(p["m"], p["nk"])]
    slow = [where(p) for p in well_over if p["steps_to_target"] is None]
    fitted = [where(p) for p in under if p["steps_to_target"] is not None]
    ratio_lo = min((p["lambda_min"] / p["precision_floor"] for p in over), default=math.nan)
    ratio_hi = max((p["lambda_min"] / p["precision_floor"] for p in under), default=math.nan)
    slowest = max((p["steps_to_target"] or 0 for p in well_over), default=0)
    lowest_under = min((p["final_loss"] / p["loss0"] for p in under), default=math.nan)
    checks = [
        all_hold("λ_min(K(w₀)) is zero within precision whenever m < n·k", len(under), bad_under,
                 f"max λ_min/floor = {ratio_hi:.3g}", "all (rank K ≤ m < n·k)", control=True),
        all_hold("λ_min(K(w₀)) is above its precision floor whenever m > n·k", len(over), bad_over,
                 f"min λ_min/floor = {ratio_lo:.3g}", "all (generic full rank)"),
        all_hold("rank K(w₀) = min(m, n·k) at every point", len(points), bad_rank, "",
                 "all (eigenvalues above the precision floor)", control=True),
        all_hold(f"GD (η = 1/β) reaches L < {TARGET:g}·L₀ whenever m ≥ 2·n·k", len(well_over),
                 slow, f"slowest at step {slowest}", f"all, within {points[0]['steps']} steps"),
        all_hold(f"GD never reaches L < {TARGET:g}·L₀ when m < n·k", len(under), fitted,
                 f"lowest final L/L₀ = {lowest_under:.3g}", "all (L* > 0 for noise targets)",
                 control=True),
    ]  # fmt: skip
    return {"points": points, "target": TARGET}, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """λ_min(K(w₀)) with its precision floor, final L/L₀ and steps to 10⁻⁶·L₀ against m/(n·k)."""
    points = result.data["points"]
    figure, (kernel_ax, loss_ax, steps_ax) = panel_figure(
        3, title="over- vs under-parameterized", width=5.2, height=4.4
    )
    for sweep, marker in (("width", "o"), ("samples", "s")):
        rows = [p for p in points if p["sweep"] == sweep]
        ratios = [p["ratio"] for p in rows]
        label = "vary width (fixed n)" if sweep == "width" else "vary n (fixed width)"
        # a λ_min zero within precision is drawn at its floor, hollow: it has no correct digit
        shown = [max(p["lambda_min"], p["precision_floor"]) for p in rows]
        filled = [not p["zero_within_precision"] for p in rows]
        kernel_ax.scatter([r for r, f in zip(ratios, filled, strict=True) if f],
                          [s for s, f in zip(shown, filled, strict=True) if f],
                          marker=marker, label=f"λ_min, {label}")  # fmt: skip
        kernel_ax.scatter([r for r, f in zip(ratios, filled, strict=True) if not f],
                          [s for s, f in zip(shown, filled, strict=True) if not f], marker=marker,
                          facecolors="none", edgecolors="grey", label=f"zero within precision, {label}")  # fmt: skip
        loss_ax.scatter(ratios, [p["final_loss"] / p["loss0"] for p in rows], marker=marker,
                        label=label)  # fmt: skip
        reached = [(p["ratio"], p["steps_to_target"]) for p in rows if p["steps_to_target"]]
        missed = [p["ratio"] for p in rows if p["steps_to_target"] is None]
        steps_ax.scatter(
            [a for a, _ in reached], [b for _, b in reached], marker=marker, label=label
        )
        steps_ax.scatter(missed, [p["steps"] for p in rows if p["steps_to_target"] is None],
                         marker="x", color="red")  # fmt: skip
    for ax in (kernel_ax, loss_ax, steps_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(RATIOS, [f"{r:g}" if r >= 1 else f"1/{round(1 / r)}" for r in RATIOS])
        ax.set_yscale("log")
        ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
        ax.set_xlabel("m / (n·k)")
    kernel_ax.set(title="λ_min(K(w₀)) (hollow: at its precision floor)", ylabel="λ_min")
    loss_ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1)
    loss_ax.set(title="final L / L₀ after GD (η = 1/β)", ylabel="L_T / L₀")
    steps_ax.set(title=f"steps to L < {TARGET:g}·L₀ (×: not within T)", ylabel="steps")
    for ax in (kernel_ax, loss_ax, steps_ax):
        ax.legend(fontsize="x-small")
    return {"over_under_parameterized": figure}
