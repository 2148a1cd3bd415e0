"""Experiment 8: a non-linear output layer keeps PL* although the tangent kernel is not constant.

Model: f = φ(f̃) with f̃ = ``mlp(64, m, depth=2, 1, activation="tanh")`` (NTK parameterization,
float64) and φ = softplus, built as ``mlp(..., output_activation="softplus")``; f̃ is the same
network without its last module (``model[:-1]``, sharing the parameters). Data: n digits (centred,
rows of norm √64); targets y = φ(±1) by parity, so that f̃ must travel to ±1, where
φ' = sigmoid(±1) ∈ {0.27, 0.73}, from φ' ≈ 1/2 at initialisation: Λ = diag(φ'(f̃)) changes by O(1)
whatever the width.

GD runs through :func:`plstar.train` (η = 1/β, re-checked); a :class:`plstar.Monitor` callback
measures, every ``every`` steps and at the end, both kernels K_f̃ and K_f (float64, dense spectra),
Λ, ρ = min|φ'(f̃)|, the chain rule K_f = Λ K_f̃ Λ, the bound λ_min(K_f) ≥ ρ² λ_min(K_f̃)
(:func:`plstar.theory.output_layer_kernel_bound`, THEORY item 5) and β = λ_max(H_L). ‖H_F‖ at w₀
(:func:`plstar.model_hessian_norm`, a random subset of outputs) is measured for f and f̃.

Expected: the relative drift ‖K(w_T) − K(w₀)‖_F/‖K(w₀)‖_F of K_f̃ and ‖H_f̃‖ vanish like m^{-1/2}
or faster (log-log slope ≤ −0.35), while those of K_f and H_f stay O(1) (slope ≥ −0.25, i.e. closer
to 0 than to −1/2, and a drift ≥ 0.1 at every width); the bound holds at every measured point; and
the loss decays linearly: L_t ≤ q^t L₀ with the descent-lemma rate q = 1 − 2μη + μβη²
(:func:`plstar.theory.gd_rate_for_step`) from constants measured on the path (μ = the smallest bound
ρ²λ_min(K_f̃), β the largest measured λ_max(H_L), η the smallest step GD used), and over the second
half of the run L still contracts at least as fast as q per step. The constants are measured at
sampled points of the path, not proved on a ball.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.ticker import NullLocator
from torch import Tensor

from plstar import theory
from plstar.curvature import loss_sharpness, model_hessian_norm
from plstar.experiments.base import Check, ExperimentResult, Run, check_range, check_true
from plstar.experiments.common import (
    digits_problem,
    figure,
    late_rate,
    loglog_slope,
    placed,
    seeds_of,
)
from plstar.functional import ProgressCallback
from plstar.kernel import tangent_kernel
from plstar.models import mlp
from plstar.monitor import Monitor, Record
from plstar.spectrum import spectrum
from plstar.train import envelope_ratio, train

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUMBER = 8
TITLE = "Non-linear output layer"
CLAIM = (
    "With f = φ(f̃) and |φ'| ≥ ρ on the path, K_f = ΛK_f̃Λ changes by O(1) along the GD path at "
    "every width while λ_min(K_f) ≥ ρ²λ_min(K_f̃) holds, and GD converges linearly."
)

MODEL = {"depth": 2, "activation": "tanh", "output_activation": "softplus", "target_logit": 1.0}
QUICK = {"n": 16, "widths": [128, 512, 2048], "steps": 300, "every": 50}
FULL = {"n": 16, "widths": [64, 128, 256, 512, 1024, 2048, 4096], "steps": 1000, "every": 50}
HESSIAN_OUTPUTS = 4
CHAIN_RULE_TOLERANCE = 1e-10
VANISHING_SLOPE_MAX = -0.35
CONSTANT_SLOPE_MIN = -0.25
"""Does not vanish: a log-log slope closer to 0 (O(1)) than to −1/2 (the linear-output rate)."""
DRIFT_MIN = 0.1


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (width, seed): one GD run with its path measurements."""
    size = QUICK if quick else FULL
    return [
        {"width": w, "seed": s, "n": size["n"], "steps": size["steps"], "every": size["every"]}
        | MODEL
        for s in seeds_of(seeds) for w in size["widths"]
    ]  # fmt: skip


def _relative_change(kernel: Tensor, start: Tensor) -> float:
    return float((kernel - start).norm() / start.norm())


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """GD on f = φ(f̃) with both kernels measured along the path. Cost: ``steps`` gradient passes,
    and per measured point two n×n tangent kernels, their spectra and one loss-sharpness Lanczos."""
    data = digits_problem(config["n"], seed=0)
    x = data.x
    net_seed = int(np.random.SeedSequence([config["seed"], config["width"]]).generate_state(1)[0])
    model = placed(mlp(x.shape[1], config["width"], config["depth"], 1,
                       activation=config["activation"], generator_seed=net_seed,
                       output_activation=config["output_activation"], dtype=torch.float64))  # fmt: skip
    inner, phi = model[:-1], model[-1]
    with torch.no_grad():
        y = phi(config["target_logit"] * data.y)
    hessian = {name: model_hessian_norm(net, x, outputs=HESSIAN_OUTPUTS, max_iter=20, tol=1e-4)
               for name, net in (("outer", model), ("inner", inner))}  # fmt: skip
    path: list[dict[str, Any]] = []
    start: dict[str, Tensor] = {}
    warm: list[Tensor | None] = [None]

    def measure(record: Record) -> None:
        if record.step % config["every"] and record.step != config["steps"]:
            return
        with torch.no_grad():
            pre = inner(x).detach().requires_grad_()
        slope = torch.autograd.grad(phi(pre).sum(), pre)[0].reshape(-1)  # φ'(f̃), sample-major
        kernels = {"inner": tangent_kernel(inner, x), "outer": tangent_kernel(model, x)}
        start.update({k: v for k, v in kernels.items() if k not in start})
        chain = slope[:, None] * kernels["inner"] * slope[None, :]
        found = {k: spectrum(v) for k, v in kernels.items()}
        rho = float(slope.abs().min())
        sharp = loss_sharpness(model, x, y, v0=warm[0], seed=config["seed"])
        warm[0] = sharp.vector
        path.append({
            "step": record.step, "loss": record.loss, "rho": rho,
            "bound": theory.output_layer_kernel_bound(rho, found["inner"].lambda_min),
            "chain_rule_error": float((kernels["outer"] - chain).abs().max()
                                      / kernels["outer"].abs().max()),
            "sharpness": sharp.value, "sharpness_error": sharp.error_bound,
        } | {f"{key}_{name}": value for name in kernels for key, value in (
            ("lambda_min", found[name].lambda_min), ("lambda_max", found[name].lambda_max),
            ("lambda_min_error", found[name].lambda_min_error),
            ("drift", _relative_change(kernels[name], start[name])))})  # fmt: skip

    monitor = Monitor(model, x, y, every=config["every"], kernel_samples=config["n"],
                      seed=config["seed"], on_record=measure)  # fmt: skip
    result = train(model, x, y, method="gd", steps=config["steps"], monitor=monitor,
                   seed=config["seed"], progress=progress)  # fmt: skip
    return {
        "losses": result.losses, "step_size": result.step_size,
        "final_step_size": result.final_step_size, "events": result.events,
        "mu0": result.mu, "beta0": result.beta, "path": path,
        "hessian_outer": hessian["outer"].value, "hessian_inner": hessian["inner"].value,
        "hessian_error": max(h.error_bound for h in hessian.values()),
    }  # fmt: skip


def _path_rate(run: Run) -> tuple[float, float, float]:
    """(q, μ, β): the descent-lemma rate from the constants measured on this run's path."""
    path = run.data["path"]
    mu = min(p["bound"] for p in path)
    beta = max(p["sharpness"] + p["sharpness_error"] for p in path)
    return theory.gd_rate_for_step(run.data["final_step_size"], beta, mu), mu, beta


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Per-width summaries and the width trends; checks as in the module docstring."""
    runs = sorted(runs, key=lambda r: (r.config["width"], r.config["seed"]))
    points = [p for r in runs for p in r.data["path"]]
    widths = [r.config["width"] for r in runs]
    rows = []
    for run in runs:
        q, mu, beta = _path_rate(run)
        losses, last = run.data["losses"], run.data["path"][-1]
        rows.append({
            "width": run.config["width"], "seed": run.config["seed"], "path_rate": q,
            "path_mu": mu, "path_beta": beta, "envelope_ratio": envelope_ratio(losses, q),
            "late_rate": late_rate(losses), "loss_reduction": losses[-1] / losses[0],
            "drift_outer": last["drift_outer"], "drift_inner": last["drift_inner"],
            "hessian_outer": run.data["hessian_outer"], "hessian_inner": run.data["hessian_inner"],
            "min_rho": min(p["rho"] for p in run.data["path"]),
        })  # fmt: skip
    slopes = {key: loglog_slope(widths, [row[key] for row in rows])
              for key in ("drift_outer", "drift_inner", "hessian_outer", "hessian_inner")}  # fmt: skip
    slack = [(p["lambda_min_outer"] + p["lambda_min_error_outer"]) / p["bound"]
             if p["bound"] > 0 else math.inf for p in points]  # fmt: skip
    worst_chain = max(p["chain_rule_error"] for p in points)
    # log of the late contraction over log q: ≥ 1 means at least as fast as the certified rate
    late = min(math.inf if row["late_rate"] <= 0 else 0.0 if row["path_rate"] >= 1
               else math.log(row["late_rate"]) / math.log(row["path_rate"]) for row in rows)  # fmt: skip
    checks = [
        check_range(f"chain rule K_f = ΛK_f̃Λ at all {len(points)} measured points "
                    "(max relative entry error)", worst_chain, 0.0, CHAIN_RULE_TOLERANCE,
                    control=True),
        check_true(
            f"λ_min(K_f) ≥ ρ²·λ_min(K_f̃) at all {len(points)} measured points (all widths)",
            min(slack) >= 1.0,
            f"min λ_min(K_f)/(ρ²λ_min(K_f̃)) = {min(slack):.3g}; ρ ≥ "
            f"{min(row['min_rho'] for row in rows):.3g} on every path", "ratio ≥ 1 everywhere",
        ),
        check_range("K_f changes by O(1) along the path: smallest relative drift over widths",
                    min(row["drift_outer"] for row in rows), DRIFT_MIN, math.inf),
        check_range("K_f's drift does not vanish with width (log-log slope)",
                    slopes["drift_outer"], CONSTANT_SLOPE_MIN, math.inf),
        check_range("K_f̃'s drift vanishes with width (log-log slope; m^(-1/2) or faster)",
                    slopes["drift_inner"], -math.inf, VANISHING_SLOPE_MAX),
        check_range("‖H_f‖ at w₀ does not vanish with width (log-log slope)",
                    slopes["hessian_outer"], CONSTANT_SLOPE_MIN, math.inf),
        check_range("‖H_f̃‖ at w₀ vanishes with width (log-log slope; Õ(m^(-1/2)))",
                    slopes["hessian_inner"], -math.inf, VANISHING_SLOPE_MAX),
        check_range("GD linear: max over t, widths of L_t / (q^t L₀), q from the path's μ, β, η",
                    max(row["envelope_ratio"] for row in rows), 0.0, 1.0),
        check_range("GD linear to the end: log(late per-step contraction of L) / log q "
                    "(worst width)", late, 1.0, math.inf),
    ]  # fmt: skip
    data = {"rows": rows, "slopes": slopes,
            "paths": {f"{r.config['width']}/{r.config['seed']}": r.data["path"] for r in runs},
            "losses": {f"{r.config['width']}/{r.config['seed']}": r.data["losses"] for r in runs}}  # fmt: skip
    return data, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``path``: loss and kernel extremes along GD at the widest width;
    ``width``: kernel drifts and Hessian norms against width, f against f̃."""
    data = result.data
    widest = max(data["paths"], key=lambda key: int(key.split("/")[0]))
    path, losses = data["paths"][widest], data["losses"][widest]
    row = next(r for r in data["rows"] if f"{r['width']}/{r['seed']}" == widest)
    along, (loss_ax, kernel_ax) = figure(2, width=5.5, height=4.5)
    loss_ax.semilogy(range(len(losses)), losses, label="L(w_t)")
    loss_ax.semilogy(range(len(losses)), [losses[0] * row["path_rate"] ** t
                                          for t in range(len(losses))], "--",
                     label=f"q^t·L₀, q = {row['path_rate']:.5f} (path constants)")  # fmt: skip
    loss_ax.set(title=f"GD, width {row['width']}", xlabel="step", ylabel="L (summed)")
    loss_ax.legend(fontsize="small")
    steps = [p["step"] for p in path]
    for key, label, style in (("lambda_min_outer", "λ_min(K_f)", "o-"),
                              ("bound", "ρ²·λ_min(K_f̃) (bound)", "s--"),
                              ("lambda_min_inner", "λ_min(K_f̃)", "^-"),
                              ("lambda_max_outer", "λ_max(K_f)", "o:"),
                              ("lambda_max_inner", "λ_max(K_f̃)", "^:")):  # fmt: skip
        kernel_ax.semilogy(steps, [p[key] for p in path], style, markersize=4, label=label)
    kernel_ax.set(title="kernel extremes along the path", xlabel="step")
    kernel_ax.legend(fontsize="small")

    trend, (drift_ax, hessian_ax) = figure(2, width=5.5, height=4.5)
    widths = sorted({r["width"] for r in data["rows"]})
    for ax, key, title in ((drift_ax, "drift", "‖K(w_T) − K(w₀)‖_F / ‖K(w₀)‖_F"),
                           (hessian_ax, "hessian", "‖H_F‖ at w₀")):  # fmt: skip
        for index, (name, label) in enumerate((("outer", "f = φ(f̃)"),
                                               ("inner", "f̃ (linear output)"))):  # fmt: skip
            slope, color = data["slopes"][f"{key}_{name}"], f"C{index}"
            values = [[r[f"{key}_{name}"] for r in data["rows"] if r["width"] == w] for w in widths]
            for width, seeds in zip(widths, values, strict=True):
                ax.loglog([width] * len(seeds), seeds, ".", color=color, alpha=0.4)
            ax.loglog(widths, [float(np.mean(v)) for v in values], "o-", color=color,
                      label=f"{label}: mean over seeds, fitted slope {slope:.2f}")  # fmt: skip
        ax.set(title=title, xlabel="width m")
        ax.set_xticks(widths, labels=[str(w) for w in widths])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize="small")
    return {"path": along, "width": trend}
