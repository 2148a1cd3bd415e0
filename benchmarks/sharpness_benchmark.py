"""β = λ_max(H_L): plstar's warm-started Lanczos against PyHessian's power iteration.

    python benchmarks/sharpness_benchmark.py [--n 1024] [--width 512] [--seeds 5]

Counts Hessian-vector products and measures the relative error against a reference computed by
plstar's Lanczos run to a 1e-12 residual. PyHessian (pip install --no-deps pyhessian==0.1) stops
when two successive power-iteration estimates differ by less than 1e-3 relatively.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from report_sections import write_section

import plstar
from plstar.data import load_digits
from plstar.lanczos import lanczos
from plstar.models import mlp


def plstar_beta(model, x, y, warm: bool, seed: int) -> tuple[float, float, int, float]:
    start = time.perf_counter()
    v0 = None
    if warm:
        K = plstar.tangent_kernel(model, x)
        top = lanczos(lambda v: (K @ v.T).T, K.shape[0], tol=1e-10, converge="max", seed=seed)
        v0 = plstar.kernel_operator(model, x).transpose_product(top.vector_max[0])
    estimate = plstar.loss_sharpness(model, x, y, v0=v0, seed=seed)
    return estimate.value, estimate.error_bound, estimate.products, time.perf_counter() - start


def pyhessian_beta(model, x, y, seed: int) -> tuple[float, int, float]:
    pyhessian_module = importlib.import_module("pyhessian.hessian")  # the module, not the class

    count = 0
    original = pyhessian_module.hessian_vector_product

    def counted(*args, **kwargs):
        nonlocal count
        count += 1
        return original(*args, **kwargs)

    pyhessian_module.hessian_vector_product = counted
    torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        criterion = lambda out, target: 0.5 * ((out - target) ** 2).sum()  # noqa: E731
        h = pyhessian_module.hessian(model, criterion, data=(x, y), cuda=False)
        values, _ = h.eigenvalues(top_n=1)
    finally:
        pyhessian_module.hessian_vector_product = original
    return float(values[0]), count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)  # PyHessian draws its start vectors in the default dtype
    data = load_digits(args.n, dtype=torch.float64)
    model = mlp(64, args.width, 3, 1, generator_seed=0, dtype=torch.float64)
    x, y = data.x, data.y
    reference = plstar.loss_sharpness(model, x, y, tol=1e-12, max_iter=200)
    rows = []
    for label, fn in [
        ("plstar, Gauss–Newton warm start", lambda s: plstar_beta(model, x, y, True, s)),
        ("plstar, random start", lambda s: plstar_beta(model, x, y, False, s)),
    ]:
        runs = [fn(seed) for seed in range(args.seeds)]
        errors = [abs(r[0] - reference.value) / reference.value for r in runs]
        rows.append((label, statistics.median(r[2] for r in runs), max(errors),
                     max(r[1] for r in runs) / reference.value, statistics.median(r[3] for r in runs)))  # fmt: skip
    try:
        runs = [pyhessian_beta(model, x, y, seed) for seed in range(args.seeds)]
        errors = [abs(r[0] - reference.value) / reference.value for r in runs]
        rows.append(("PyHessian 0.1 power iteration (tol 1e-3)", statistics.median(r[1] for r in runs),
                     max(errors), float("nan"), statistics.median(r[2] for r in runs)))  # fmt: skip
    except ImportError:
        rows.append(
            ("PyHessian: not installed", float("nan"), float("nan"), float("nan"), float("nan"))
        )
    lines = [
        "## Loss sharpness β",
        "",
        f"`python benchmarks/sharpness_benchmark.py --n {args.n} --width {args.width} --seeds {args.seeds}`: "
        f"NTK MLP width {args.width}, depth 3, digits n = {args.n}, float64. Reference β = "
        f"{reference.value:.10g} (Lanczos to residual {reference.error_bound:.1e}). Medians over {args.seeds} "
        "seeds; the warm-start time includes forming K and its top eigenvector.",
        "",
        "| method | HVPs (median) | worst relative error | residual bound / β | time |",
        "|---|---|---|---|---|",
    ]
    for label, hvps, error, bound, seconds in rows:
        lines.append(f"| {label} | {hvps:.0f} | {error:.1e} | {bound:.1e} | {seconds:.2f} s |")
    text = "\n".join(lines)
    print(text)
    write_section("sharpness", text)


if __name__ == "__main__":
    main()
