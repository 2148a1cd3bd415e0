"""Experiment 9: over-parameterization improves the conditioning of random linear systems.

For A ∈ ℝ^{n×m} with i.i.d. N(0, 1) entries, the paper bounds E log κ(AAᵀ) <
2 log(m/(m − n + 1)) + 5 (:func:`plstar.theory.random_system_log_condition_bound`; docs/theory.md
item 9 derives it from Chen & Dongarra with the constant 4.516). We draw ``draws`` matrices per
aspect ratio m/n, compute κ(AAᵀ) = λ_max/λ_min with :func:`plstar.spectrum` in float64 (a λ_min
zero within precision gives κ = ∞ and fails the check), and compare the Monte-Carlo mean with the
bound: its upper 3-standard-error limit must lie below the bound at every ratio, and the mean must
fall as m/n grows.

Two independent references are drawn in the figure: for m = n, Edelman's E log κ₂(A) ≈ log n +
1.537, i.e. 2 log n + 3.074 for AAᵀ; for m/n = c⁻¹ > 1, the Marchenko–Pastur limit of the
singular values of A/√m, (1 ± √c), gives log κ(AAᵀ) → 2 log((1 + √c)/(1 − √c)) as n → ∞.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from plstar.devices import HOST
from plstar.experiments.base import Check, ExperimentResult, Run, check_true
from plstar.experiments.common import figure, placed, seeds_of
from plstar.functional import ProgressCallback
from plstar.spectrum import spectrum
from plstar.theory import random_system_log_condition_bound

if TYPE_CHECKING:
    from matplotlib.figure import Figure

NUMBER = 9
TITLE = "Random systems"
CLAIM = (
    "For Gaussian A ∈ ℝ^{n×m}, E log κ(AAᵀ) < 2 log(m/(m − n + 1)) + 5, and it falls as m/n grows: "
    "over-parameterization improves conditioning."
)

QUICK = {"n": 40, "ratios": [1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0], "draws": 500}
FULL = {"n": 100, "ratios": [1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0, 32.0],
        "draws": 2000}  # fmt: skip
EDELMAN_CONSTANT = 1.537
"""E log κ₂(A) − log n → 1.537 for square Gaussian A (Edelman 1988)."""


def configurations(quick: bool, seeds: int) -> list[dict[str, Any]]:
    """One unit per (aspect ratio, seed): ``draws`` matrices of size n × round(ratio·n)."""
    size = QUICK if quick else FULL
    return [
        {"n": size["n"], "m": round(ratio * size["n"]), "draws": size["draws"], "seed": s}
        for s in seeds_of(seeds) for ratio in size["ratios"]
    ]  # fmt: skip


def run_configuration(config: dict[str, Any], progress: ProgressCallback | None) -> dict[str, Any]:
    """log κ(AAᵀ) of ``draws`` Gaussian matrices. Cost per draw: n²·m flops for AAᵀ, n³ for the
    eigenvalues."""
    n, m, draws = config["n"], config["m"], config["draws"]
    key = np.random.SeedSequence([config["seed"], n, m]).generate_state(1)[0]
    generator = torch.Generator(device=HOST).manual_seed(int(key))
    values: list[float | None] = []
    for draw in range(draws):
        a = placed(torch.randn(n, m, generator=generator, dtype=torch.float64, device=HOST))
        kappa = spectrum(a @ a.T).condition_number
        values.append(math.log(kappa) if math.isfinite(kappa) else None)  # None: singular
        if progress is not None and (draw + 1) % 50 == 0:
            progress(f"m/n = {m / n:.3g}", draw + 1, draws)
    return {"log_condition": values}  # JSON-safe: None where λ_min is zero within precision


def marchenko_pastur_limit(n: int, m: int) -> float:
    """n, m → ∞ limit of log κ(AAᵀ) at fixed n/m < 1: 2 log((1 + √(n/m))/(1 − √(n/m)))."""
    root = math.sqrt(n / m)
    return 2 * math.log((1 + root) / (1 - root)) if m > n else math.inf


def summarize(runs: list[Run]) -> tuple[dict[str, Any], list[Check]]:
    """Mean, standard error and the bound per m; checks: below the bound, falling with m/n."""
    n = runs[0].config["n"]
    ms = sorted({r.config["m"] for r in runs})
    rows = []
    for m in ms:
        values = np.array([math.inf if v is None else v
                           for r in runs if r.config["m"] == m for v in r.data["log_condition"]])  # fmt: skip
        finite = bool(np.isfinite(values).all())
        mean = float(values.mean()) if finite else math.inf
        error = float(values.std(ddof=1) / math.sqrt(len(values))) if finite else math.inf
        rows.append({
            "m": m, "ratio": m / n, "draws": len(values), "mean": mean, "standard_error": error,
            "bound": random_system_log_condition_bound(n, m),
            "marchenko_pastur": marchenko_pastur_limit(n, m) if m > n else None,
            "quantiles": [float(q) for q in np.quantile(values, [0.05, 0.5, 0.95])],
        })  # fmt: skip
    margins = [row["bound"] - (row["mean"] + 3 * row["standard_error"]) for row in rows]
    worst = int(np.argmin(margins))
    drops = [a["mean"] - b["mean"] for a, b in itertools.pairwise(rows)]
    checks = [
        check_true(
            f"E log κ(AAᵀ) + 3 s.e. < 2 log(m/(m − n + 1)) + 5 at all {len(rows)} ratios m/n "
            f"(n = {n})",
            min(margins) > 0,
            f"smallest margin {margins[worst]:.3g} at m/n = {rows[worst]['ratio']:.3g} "
            f"(mean {rows[worst]['mean']:.3g} ± {rows[worst]['standard_error']:.2g}, "
            f"bound {rows[worst]['bound']:.3g})",
            "margin > 0 at every ratio",
        ),
        check_true(
            "E log κ(AAᵀ) falls at every step of m/n (over-parameterization improves conditioning)",
            bool(drops) and min(drops) > 0,
            f"smallest drop {min(drops):.3g}, from {rows[0]['mean']:.3g} at m/n = 1 to "
            f"{rows[-1]['mean']:.3g} at m/n = {rows[-1]['ratio']:.3g}" if drops else "one ratio",
            "every drop > 0",
        ),
    ]  # fmt: skip
    edelman = 2 * (math.log(n) + EDELMAN_CONSTANT)
    return {"n": n, "rows": rows, "edelman_square": edelman}, checks


def figures(result: ExperimentResult) -> dict[str, Figure]:
    """``condition``: mean log κ against m/n with the bound and the two references;
    ``distribution``: the 5–95 % range of log κ per ratio."""
    rows, n = result.data["rows"], result.data["n"]
    ratios = [row["ratio"] for row in rows]
    condition, (ax,) = figure(width=7.5, height=4.8)
    ax.errorbar(ratios, [row["mean"] for row in rows],
                yerr=[2 * row["standard_error"] for row in rows], fmt="o-",
                label="Monte-Carlo mean of log κ(AAᵀ) (± 2 s.e.)")  # fmt: skip
    ax.plot(ratios, [row["bound"] for row in rows], "s--", label="bound 2 log(m/(m−n+1)) + 5")
    over = [row for row in rows if row["m"] > n]
    ax.plot([row["ratio"] for row in over], [row["marchenko_pastur"] for row in over], ":",
            label="Marchenko–Pastur limit (n → ∞)")  # fmt: skip
    ax.plot([1.0], [result.data["edelman_square"]], "k*", markersize=10,
            label="Edelman, square: 2 log n + 3.07")  # fmt: skip
    ax.set_xscale("log")
    ax.set(title=f"Conditioning of Gaussian systems, n = {n}", xlabel="m / n (log scale)",
           ylabel="log κ(AAᵀ) (natural log)")  # fmt: skip
    ax.legend(fontsize="small")

    spread, (ax,) = figure(width=7.5, height=4.8)
    low, mid, high = zip(*(row["quantiles"] for row in rows), strict=True)
    ax.fill_between(ratios, low, high, alpha=0.3, label="5–95 % of draws")
    ax.plot(ratios, mid, "o-", label="median")
    ax.set_xscale("log")
    ax.set(title=f"Spread of log κ(AAᵀ) over draws, n = {n}", xlabel="m / n (log scale)",
           ylabel="log κ(AAᵀ)")  # fmt: skip
    ax.legend(fontsize="small")
    return {"condition": condition, "distribution": spread}
