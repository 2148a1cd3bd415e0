"""Matrix-free kernel products: the structured operator (kept features) against the ntvp operator.

    python benchmarks/operator_benchmark.py [--n 1797] [--width 512] [--outputs 10] [--block 8]

One process, same model, data and vectors for both; prints the set-up time, seconds per block of
``--block`` products, their ratio, the agreement of the products (float64) and the time of the
λ_max Lanczos run that ``plstar.analyze`` does on the operator beyond its dense limit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report_sections import write_section

import plstar
from plstar.data import load_digits
from plstar.models import mlp


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=1797)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = load_digits(args.n, outputs=args.outputs, dtype=torch.float64)
    model = mlp(64, args.width, 3, data.k, generator_seed=0, dtype=torch.float64)
    size = args.n * data.k
    v = torch.randn(
        size, args.block, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    rows, products = [], {}
    for implementation in ("structured", "ntvp"):
        start = time.perf_counter()
        op = plstar.kernel_operator(model, data.x, implementation=implementation)
        setup = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            products[implementation] = op @ v
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        top = plstar.lanczos(lambda u, op=op: (op @ u.T).T, size, max_iter=60, tol=1e-8, seed=0,
                             converge="max")  # fmt: skip
        lanczos_s = time.perf_counter() - start
        rows.append((implementation, setup, statistics.median(times), lanczos_s, top))
    agreement = float(
        (products["structured"] - products["ntvp"]).abs().max() / products["ntvp"].abs().max()
    )
    base = rows[1][2]
    lines = [
        "## Matrix-free kernel products",
        "",
        f"`python benchmarks/operator_benchmark.py --n {args.n} --width {args.width} "
        f"--outputs {args.outputs} --block {args.block}`: NTK MLP depth 3, float64, digits, "
        f"K of {size:,}², blocks of {args.block} products, median of {args.repeats}.",
        "",
        "| operator | set-up | s per block | ratio to ntvp | λ_max Lanczos | λ_max |",
        "|---|---|---|---|---|---|",
    ]
    for name, setup, per_block, lanczos_s, top in rows:
        lines.append(
            f"| {name} | {setup:.2f} s | {per_block:.3f} s | {per_block / base:.3f} | "
            f"{lanczos_s:.1f} s ({top.iterations} it.) | {float(top.theta_max[0]):.10g} |"
        )
    lines += ["", f"Products agree to {agreement:.1e} (max relative)."]
    text = "\n".join(lines)
    print(text)
    write_section("operator", text)


if __name__ == "__main__":
    main()
