"""Strong and weak scaling of plstar.distributed on p gloo processes, and the memory model table.

    python benchmarks/distributed_scaling.py [--ranks 1 2] [--n 600] [--width 1024] [--write]
    python benchmarks/distributed_scaling.py --table [--write]

Every configuration runs in fresh processes (one thread each, joined through a FileStore); the
1-process baseline is measured in the same run, and the ratios are against it. Strong scaling
keeps n; weak scaling keeps the row block per rank (n·k · n·k / p entries), so n grows as √p.
Times are the slowest rank's, between barriers, the better of two. ``--write`` replaces this benchmark's sections of
docs/scaling.md. ``--table`` prints the bytes-per-rank and messages model from formulas, with the
per-sample feature size measured by plstar's probe on the model it describes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report_sections import write_section

SCALING_DOC = Path(__file__).resolve().parent.parent / "docs" / "scaling.md"


def worker(rank: int, world: int, store: str, out: str, n: int, width: int, k: int) -> None:
    """One rank: the distributed kernel, then products K·v; times between barriers."""
    import torch
    import torch.distributed as dist

    import plstar
    from plstar import distributed
    from plstar.data import load_digits
    from plstar.models import mlp

    torch.set_num_threads(1)
    distributed.init("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    data = load_digits(n, outputs=k, dtype=torch.float64)
    model = mlp(64, width, 3, k, generator_seed=0, dtype=torch.float64)
    times: dict[str, float] = {}
    distributed.tangent_kernel(model, data.x[:8])  # warm-up: first-call costs are not scaling
    if world == 1:  # the single-process kernel, for the distributed machinery's overhead
        plstar.tangent_kernel(model, data.x[:8])
        times["single-process kernel"] = math.inf
        for _ in range(2):
            start = time.perf_counter()
            plstar.tangent_kernel(model, data.x)
            times["single-process kernel"] = min(
                times["single-process kernel"], time.perf_counter() - start
            )
    times["kernel"] = math.inf
    for _ in range(2):  # the better of two: other jobs on the machine only ever add time
        dist.barrier()
        start = time.perf_counter()
        kernel = distributed.tangent_kernel(model, data.x)
        dist.barrier()
        times["kernel"] = min(times["kernel"], time.perf_counter() - start)
    v = torch.randn(kernel.shape[0], 1, dtype=torch.float64)
    kernel @ v
    times["product"], products = math.inf, 20
    for _ in range(2):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(products):
            v = kernel @ v
            v /= v.norm()
        dist.barrier()
        times["product"] = min(times["product"], (time.perf_counter() - start) / products)
    Path(out, f"rank{rank}.json").write_text(json.dumps(times))
    dist.destroy_process_group()


def run(world: int, n: int, width: int, k: int) -> dict[str, float]:
    """The slowest rank's times for one configuration."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    str(r),
                    str(world),
                    f"{tmp}/store",
                    tmp,
                    str(n),
                    str(width),
                    str(k),
                ],
                env=env,
            )
            for r in range(world)
        ]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"a rank failed ({world} ranks, n = {n})")
        per_rank = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return {key: max(t.get(key, 0.0) for t in per_rank) for key in per_rank[0]}


def _pairs(n: int, p: int) -> float:
    """Sample pairs the busiest rank contracts: half its diagonal block, all its other blocks."""
    mine = math.ceil(n / p)
    return mine * mine / 2 + mine * (n - mine)


def scaling(ranks: list[int], n: int, width: int, k: int) -> str:
    """Markdown: strong and weak scaling against the 1-process baseline of this run."""
    lines = [
        f"Command: `python benchmarks/distributed_scaling.py {shlex.join(sys.argv[1:])}`  ",
        f"Workload: digits, NTK MLP 64 → {width} → {width} → {k} (tanh), float64, "
        "structured features, gloo on one machine, one thread per rank.  ",
        f"Load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores.",
        "",
        "| scaling | ranks | n | kernel s | ratio | ideal | product ms | ratio | ideal |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = run(1, n, width, k)
    single = base.pop("single-process kernel")
    for mode in ("strong", "weak"):
        for p in ranks:
            size = n if mode == "strong" else round(n * math.sqrt(p))
            t = base if p == 1 and size == n else run(p, size, width, k)
            # ideal: the work of the busiest rank (contraction pairs; row-block entries)
            kernel_ideal = _pairs(n, 1) / _pairs(size, p)
            product_ideal = n * n / (math.ceil(size / p) * size)
            lines.append(
                f"| {mode} | {p} | {size} | {t['kernel']:.2f} | {base['kernel'] / t['kernel']:.2f} "
                f"| {kernel_ideal:.2f} | {1e3 * t['product']:.2f} | "
                f"{base['product'] / t['product']:.2f} | {product_ideal:.2f} |"
            )
    lines += [
        "",
        "Ratio: baseline time / time, the speed-up (strong) or efficiency (weak). Ideal: the same "
        "ratio of the busiest rank's work — sample pairs contracted (half of its diagonal block, "
        "all of its off-diagonal blocks, which its partner rank contracts too) and row-block "
        "entries read per product. The single-process `plstar.tangent_kernel` took "
        f"{single:.2f} s on n = {n} in the same run (distributed, 1 rank: {base['kernel']:.2f} s). "
        f"Load average after: {os.getloadavg()[0]:.2f}.",
    ]
    return "\n".join(lines)


def table(width: int = 4096, depth: int = 3, k: int = 10, d: int = 784) -> str:
    """Markdown: bytes per rank and messages, from formulas, for n up to 10⁶."""
    import torch

    from plstar import structured
    from plstar.functional import make_functional
    from plstar.models import mlp

    widths = [d] + [width] * (depth - 1) + [k]
    # per sample, per dense layer p → q with bias: inputs p + 1 and k cotangents of width q
    formula = 8 * sum((p + 1) + k * q for p, q in itertools.pairwise(widths))
    model = mlp(d, width, depth, k, generator_seed=0, dtype=torch.float32)
    fmodel = make_functional(model, torch.randn(2, d))
    probe = structured.probe(fmodel, torch.randn(2, d))
    assert probe is not None
    measured = probe.bytes(torch.float64, k)[0]
    m = fmodel.m
    lines = [
        f"Model: MLP {' → '.join(map(str, widths))}, k = {k}, m = {m:,} parameters. Features "
        f"f = {formula:,} bytes per sample in float64 (formula Σ_layers 8·(p + 1 + k·q); "
        f"plstar's probe measures {measured:,}); Jacobian rows would be 8·k·m = "
        f"{8 * k * m / 2**20:,.0f} MiB per sample. Per rank, with n_r = ⌈n/p⌉:",
        "",
        "| n | N = n·k | all of K | p | rows: K[shard, :] | rows: features held (3 n_r f; p = 1: n f) "
        "| rows: ring, bytes sent | features: held (n_r f) | all-reduced per product, rows "
        "| all-reduced per product, features | Lanczos basis, 300 its |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, p in [(10**3, 1), (10**4, 8), (10**5, 64), (10**5, 512), (10**6, 512), (10**6, 4096)]:
        big_n, shard = n * k, math.ceil(n / p)
        cells = [
            f"{n:,}", f"{big_n:,}", _size(8 * big_n**2), str(p), _size(8 * shard * k * big_n),
            _size((3 if p > 1 else 1) * shard * formula), _size((p - 1) * shard * formula),
            _size(shard * formula),
            _size(8 * (big_n + 1)), _size(8 * (m + big_n + 2)), _size(2 * 300 * 8 * big_n),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _size(nbytes: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} B"


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        rank, world, store, out, n, width, k = sys.argv[2:9]
        worker(int(rank), int(world), store, out, int(n), int(width), int(k))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--outputs", type=int, default=10)
    parser.add_argument("--table", action="store_true", help="print the memory model instead")
    parser.add_argument("--write", action="store_true", help="write into docs/scaling.md")
    args = parser.parse_args()
    if args.table:
        text, section = table(), "distributed-memory-model"
    else:
        text = scaling(sorted(set(args.ranks) | {1}), args.n, args.width, args.outputs)
        section = "distributed-scaling"
    print(text)
    if args.write:
        write_section(section, text, SCALING_DOC)


if __name__ == "__main__":
    main()
