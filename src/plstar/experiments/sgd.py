"""Experiment 6: mini-batch SGD under PL* (THEORY.md item 6; docs/theory.md derives the constants).

With each ℓ_i β_s-smooth, L λ-smooth and μ-PL*, SGD with batch size b and step
η*(b) = bμ / (λ(nβ_s + μ(b − 1))) satisfies E L_t ≤ (1 − μη*(b))^t L₀. η*(b) grows linearly in b
up to the saturation batch size b* = 1 + nβ_s/μ and flattens beyond, so the steps to reach ε
fall as 1/b up to b*: the same number of epochs for every b ≪ b*.

Measurement: :func:`plstar.train` with ``method="sgd"``, ``lr="theory"`` (η*(b) from μ = λ_min(K(w₀)),
λ = β(w₀) and β_s measured at w₀ over all n·k outputs) for every b = 1, 2, 4, …, n, each from the
same w₀ with ``streams`` independent batch-sampling streams. E L_t is estimated by the mean over
streams and compared with the envelope at every step: the envelope bounds the expectation, single
runs do cross it at small t (measured: by up to 0.3 % at t = 1, 2 for b = 1), so the check fails
when the mean lies above it by more than SIGNIFICANCE standard errors, and reports the raw
maximum of mean/envelope as well. Steps to ε = ``target``·L₀ per stream, their mean against b.

Problem (experiment 4's helpers): Gaussian inputs with d ≥ 4n, so that K is well conditioned
(μ/β_s ≈ 0.15, where the theory step is usable: η*(1) costs a factor β_s/μ against GD's 1/λ),
noise targets, one hidden layer tanh net, k = 1.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from matplotlib.figure import Figure

from plstar import theory
from plstar.experiments.base import Check, ExperimentResult, Run, check_range, check_true
from plstar.experiments.common import (
    figure as panel_figure,
)
from plstar.experiments.common import (
    finite,
    first_below,
    gaussian_problem,
    loglog_slope,
    tanh_net,
)
from plstar.functional import ProgressCallback
from plstar.train import SGD_FAILURE_PROBABILITY, train

NUMBER = 6
TITLE = "SGD with the derived step η*(b)"
CLAIM = (
    "Mini-batch SGD at η*(b) = bμ/(λ(nβ_s + μ(b − 1))) converges exponentially in expectation, "
    "E L_t ≤ (1 − μη*(b))^t L₀, and its steps to ε scale as 1/b up to b* = 1 + nβ_s/μ."
)

QUICK = {"n": 16, "d": 64, "width": 32, "epochs": 40, "streams": 3, "target": 0.1}
FULL = {"n": 32, "d": 128, "width": 64, "epochs": 120, "streams": 8, "target": 0.01}
SLOPE_TOLERANCE = 0.1
"""|measured − predicted| log-log slope of steps-to-ε against b allowed by the scaling check."""
GRID = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
"""Constant steps tried against η*(b), as multiples of it (one stream each): the fastest to ε is
the best step found, which says how conservative the theory's step is."""
SIGNIFICANCE = 3.0
"""A mean over streams counts as above the envelope (a bound on E L_t) beyond this many standard
errors; at small t single runs do cross the envelope."""


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (batch size b ∈ {1, 2, 4, …, n}, seed); each runs ``streams`` SGD runs."""
    size = QUICK if quick else FULL
    sizes = [2**i for i in range(int(math.log2(size["n"])) + 1)]
    return [{"batch_size": b, "seed": seed, **size} for seed in range(seeds) for b in sizes]


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """``streams`` SGD runs at η*(b) from one w₀: losses at epoch ends, steps to ε, constants.

    Cost per run: setup (kernel, β and β_s at w₀: about n·k + 100 Hessian-vector products) plus
    epochs·n/b steps of one b-sample gradient and one full forward pass each.
    """
    n, d, b = config["n"], config["d"], config["batch_size"]
    x, y, model_seed = gaussian_problem(n, d, 1, config["seed"])
    steps_per_epoch = n // b
    streams, runs = [], []
    for stream in range(config["streams"]):
        model = tanh_net(d, config["width"], 1, model_seed)
        result = train(model, x, y, method="sgd", batch_size=b, hessian_outputs=None,
                       steps=config["epochs"] * steps_per_epoch,
                       seed=1000 * config["seed"] + stream)  # fmt: skip
        runs.append(result)
        losses = result.losses
        streams.append({
            "epoch_losses": losses[::steps_per_epoch],
            "steps_to_target": first_below(losses, config["target"] * losses[0]),
            "rate": result.rate, "step_size": result.step_size,
            "max_distance": result.max_distance, "radius": result.radius,
        })  # fmt: skip
        if progress is not None:
            progress(f"SGD b = {b}", stream + 1, config["streams"])
    # E L_t is estimated by the mean over streams; the envelope bounds the expectation, so a mean
    # above it is a violation only when it exceeds the envelope by more than its sampling error
    # (at small t single runs do cross it: the bound's slack there is only (ρ(w₀) − μ)η per step).
    # The streams' constants differ only by Lanczos round-off (~1e-9 relative).
    worst, excess, above_exactly = 0.0, -math.inf, 0  # t = 0 is left out: the ratio is 1 there
    for t in range(1, len(runs[0].losses)):
        values = [r.losses[t] for r in runs]
        mean, envelope = (
            statistics.fmean(values),
            statistics.fmean(r.rate**t * r.loss0 for r in runs),
        )
        error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
        worst = max(worst, mean / envelope if envelope > 0 else math.inf)
        if error > 0:
            excess = max(excess, (mean - envelope) / error)
        elif mean > envelope:
            above_exactly += 1  # identical streams (b = n samples without replacement)
    first = runs[0]
    grid = []
    for factor in GRID:  # the same w₀ and sampling stream as stream 0, other constant steps
        model = tanh_net(d, config["width"], 1, model_seed)
        tried = train(model, x, y, method="sgd", batch_size=b, hessian_outputs=None,
                      steps=config["epochs"] * steps_per_epoch, lr=factor * first.step_size,
                      seed=1000 * config["seed"])  # fmt: skip
        grid.append({"factor": factor, "steps_to_target": first_below(
            tried.losses, config["target"] * tried.losses[0])})  # fmt: skip
    reached = [g for g in grid if g["steps_to_target"] is not None]
    best = min(reached, key=lambda g: (g["steps_to_target"], g["factor"]), default=None)
    return {
        "grid": grid,
        "best_factor": None if best is None else best["factor"],
        "n": n,
        "loss0": first.loss0,
        "mu": first.mu,
        "beta": first.beta,
        "per_sample_smoothness": first.per_sample_smoothness,
        "step_size": first.step_size,
        "rate": first.rate,
        "saturation_batch_size": first.saturation_batch_size,
        "steps_per_epoch": steps_per_epoch,
        "streams": streams,
        "max_mean_over_envelope": worst,
        "max_excess_in_standard_errors": excess if math.isfinite(excess) else None,
        "steps_above_without_spread": above_exactly,
        "predicted_steps": finite(
            theory.steps_to_loss(first.loss0, config["target"] * first.loss0, first.rate)
        ),
    }


def _per_batch(runs: list[Run]) -> list[dict[str, Any]]:
    """Rows per batch size, pooled over seeds: steps to ε, normalized epoch losses, constants."""
    rows = []
    for b in sorted({r.config["batch_size"] for r in runs}):
        mine = [r for r in runs if r.config["batch_size"] == b]
        streams = [s for r in mine for s in r.data["streams"]]
        reached = [s["steps_to_target"] for s in streams if s["steps_to_target"] is not None]
        curves = [[v / s["epoch_losses"][0] for v in s["epoch_losses"]] for s in streams]
        rows.append({
            "batch_size": b, "streams": len(streams), "reached": len(reached),
            "mean_steps": statistics.fmean(reached) if reached else None,
            "min_steps": min(reached, default=None), "max_steps": max(reached, default=None),
            "predicted_steps": finite(
                statistics.fmean(r.data["predicted_steps"] or math.inf for r in mine)
            ),
            "mean_curve": [statistics.fmean(c[e] for c in curves) for e in range(len(curves[0]))],
            "low_curve": [min(c[e] for c in curves) for e in range(len(curves[0]))],
            "high_curve": [max(c[e] for c in curves) for e in range(len(curves[0]))],
            "epoch_envelope": [r.data["rate"] ** (e * r.data["steps_per_epoch"])
                               for r in mine[:1] for e in range(len(curves[0]))],
            "max_mean_over_envelope": max(r.data["max_mean_over_envelope"] for r in mine),
            "step_size": mine[0].data["step_size"],
        })  # fmt: skip
    return rows


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Checks: the mean loss under the envelope at every step; steps to ε ∝ 1/b as predicted."""
    rows = _per_batch(runs)
    constants = {key: runs[0].data[key] for key in
                 ("n", "mu", "beta", "per_sample_smoothness", "saturation_batch_size")}  # fmt: skip
    target = runs[0].config["target"]
    worst = max(r.data["max_mean_over_envelope"] for r in runs)
    found = [r.data["max_excess_in_standard_errors"] for r in runs]
    excess = max((z for z in found if z is not None), default=None)
    exact = sum(r.data["steps_above_without_spread"] for r in runs)
    missing = [f"b = {row['batch_size']}: {row['streams'] - row['reached']} of {row['streams']}"
               for row in rows if row["reached"] < row["streams"]]  # fmt: skip
    both = [row for row in rows if row["mean_steps"] and row["predicted_steps"]]
    sizes = [row["batch_size"] for row in both]
    measured = loglog_slope(sizes, [row["mean_steps"] for row in both])
    predicted = loglog_slope(sizes, [row["predicted_steps"] for row in both])
    saturation = constants["saturation_batch_size"]
    largest = max(row["batch_size"] for row in rows)
    best = {r.config["batch_size"]: r.data["best_factor"] for r in runs}
    shown = ", ".join(f"b = {b}: {f if f is not None else 'none'}" for b, f in sorted(best.items()))
    streams = [s for r in runs for s in r.data["streams"]]
    inside = sum(s["max_distance"] <= s["radius"] for s in streams)
    closest = max((s["max_distance"] / s["radius"] for s in streams), default=math.nan)
    checks = [
        check_true(
            "E L_t ≤ (1 − μη*(b))^t·L₀ at every step, every b: the mean over streams is never "
            f"above it by more than {SIGNIFICANCE:g} standard errors",
            (excess is None or excess <= SIGNIFICANCE) and not exact,
            f"max mean/envelope = {worst:.4g}; max excess = "
            + ("none" if excess is None else f"{excess:.3g} s.e.")
            + f"; steps above with identical streams: {exact}",
            f"excess ≤ {SIGNIFICANCE:g} s.e., none above without spread",
        ),
        check_true(
            f"every SGD run reaches L < {target:g}·L₀",
            not missing,
            "all" if not missing else "; ".join(missing) + " did not",
            "all",
        ),
        check_range(
            f"steps to ε scale as predicted by η*(b) (log-log slope; predicted {predicted:.3f})",
            measured,
            predicted - SLOPE_TOLERANCE,
            predicted + SLOPE_TOLERANCE,
        ),
        check_true(
            "every b lies in the linear regime b ≤ b* = 1 + nβ_s/μ",
            saturation > largest,
            f"b* = {saturation:.4g}, largest b = {largest}",
            "b* > n (docs/theory.md: always)",
            control=True,
        ),
        check_true(
            "η*(b) is conservative: at every b the constant step fastest to ε on the grid "
            "η*(b)·{0.5, 1, …, 64} is at least η*(b)",
            all(f is not None and f >= 1.0 for f in best.values()),
            f"best step / η*(b): {shown}",
            "≥ 1 at every b",
        ),
        check_true(
            f"fraction of SGD runs whose path stays in the SGD ball B(w₀, R), δ = "
            f"{SGD_FAILURE_PROBABILITY:g}",
            bool(streams) and inside / len(streams) >= 1 - SGD_FAILURE_PROBABILITY,
            f"{inside}/{len(streams)}; max ‖w_t − w₀‖/R = {closest:.3g}",
            f"≥ 1 − δ = {1 - SGD_FAILURE_PROBABILITY:g}",
        ),
    ]
    return {"rows": rows, "constants": constants, "target": target,
            "slope": {"measured": measured, "predicted": predicted}}, checks  # fmt: skip


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """Loss against epochs with the envelopes; steps to ε against b; η*(b) and its saturation."""
    data, rows = result.data, result.data["rows"]
    figure, (loss_ax, steps_ax, step_ax) = panel_figure(
        3, title="SGD at the derived step η*(b)", width=5.2, height=4.4
    )
    colors = [f"C{i}" for i in range(len(rows))]
    for row, color in zip(rows, colors, strict=True):
        epochs = range(len(row["mean_curve"]))
        loss_ax.plot(epochs, row["mean_curve"], color=color, label=f"b = {row['batch_size']}")
        loss_ax.fill_between(epochs, row["low_curve"], row["high_curve"], color=color, alpha=0.2)
        loss_ax.plot(epochs, row["epoch_envelope"], color=color, linestyle="--", linewidth=1)
    loss_ax.axhline(data["target"], color="grey", linestyle=":", linewidth=1)
    loss_ax.set(yscale="log", xlabel="epoch", ylabel="L_t / L₀",
                title="mean (band: min–max) and envelope (1 − μη*)^t (dashed)")  # fmt: skip
    loss_ax.legend(fontsize="x-small")
    done = [row for row in rows if row["mean_steps"]]
    sizes = [row["batch_size"] for row in done]
    steps_ax.errorbar(
        sizes, [row["mean_steps"] for row in done],
        yerr=[[row["mean_steps"] - row["min_steps"] for row in done],
              [row["max_steps"] - row["mean_steps"] for row in done]],
        fmt="o-", label="measured (mean, min–max)",
    )  # fmt: skip
    steps_ax.plot(sizes, [row["predicted_steps"] or math.nan for row in done], "s--",
                  label="bound: first t with (1 − μη*)^t ≤ ε/L₀")  # fmt: skip
    if done:
        steps_ax.plot(sizes, [done[0]["mean_steps"] / b for b in sizes], ":", color="grey",
                      label="1/b from b = 1")  # fmt: skip
    steps_ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="steps",
                 title=f"steps to L < {data['target']:g}·L₀")  # fmt: skip
    steps_ax.legend(fontsize="x-small")
    c = data["constants"]
    saturation = c["saturation_batch_size"]
    grid = sorted({round(2 ** (i / 8)) for i in range(int(8 * math.log2(4 * saturation)) + 1)})
    eta = [theory.sgd_step_size(per_sample_smoothness=c["per_sample_smoothness"],
                                loss_smoothness=c["beta"], pl_constant=c["mu"],
                                n_samples=c["n"], batch_size=b) for b in grid]  # fmt: skip
    step_ax.plot(grid, eta, label="η*(b)")
    step_ax.plot(grid, [b * eta[0] for b in grid], ":", color="grey", label="b·η*(1)")
    step_ax.axhline(1 / c["beta"], color="grey", linestyle="--", linewidth=1, label="1/λ")
    step_ax.axvline(saturation, color="red", linestyle="--", linewidth=1,
                    label=f"b* = {saturation:.3g}")  # fmt: skip
    step_ax.axvspan(1, c["n"], color="green", alpha=0.1, label="b ≤ n (run)")
    step_ax.plot(sizes, [row["step_size"] for row in done], "o", color="C0")
    step_ax.set(xscale="log", yscale="log", xlabel="batch size b", ylabel="step",
                title="η*(b): linear up to b*, then flat")  # fmt: skip
    step_ax.legend(fontsize="x-small")
    return {"sgd": figure}
