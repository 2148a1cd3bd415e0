"""Side-by-side timings of tangent-kernel implementations, written to docs/benchmarks.md.

    python benchmarks/kernel_benchmark.py [--quick] [--repeats 5] [--out docs/benchmarks.md]

Each (workload, implementation, dtype) runs in its own process (benchmarks/workloads.py), so peak
resident memory is that implementation's own. Peers: the two torch.func recipes of the PyTorch NTK
tutorial (always), nngeometry and neural-tangents (when installed; see benchmarks/peers/README.md).
Ratios are against the fastest peer measured in the same run; agreement is the max relative
difference from plstar's structured kernel on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from report_sections import write_section

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
NT_PYTHON = Path("/work/bench-venv-nt/bin/python")
MEMORY_CAP = 8 * 2**30  # a Jacobian method predicted to need more is recorded as not run

WORKLOADS = [
    "mlp-w512-n256-k1",
    "mlp-w512-n1024-k1",
    "mlp-w512-n1024-k10",
    "mlp-w2048-n1024-k1",
    "mlp-w2048-n1024-k10",
    "mlp-w4096-n1024-k1",
    "mlp-w4096-n1024-k10",
    "cnn-c32-n512-k1",
    "resmlp-w512-n1024-k1",
]
QUICK = ["mlp-w512-n256-k1", "mlp-w512-n1024-k1", "cnn-c32-n512-k1"]
LOCAL = ["plstar-structured", "plstar-jacobian", "plstar-ntvp", "recipe-jacobian", "recipe-ntvp"]


def predicted_jacobian_bytes(workload: str, dtype: str) -> int:
    sys.path.insert(0, str(HERE))
    from workloads import build

    _, _, info = build(workload, getattr(torch, dtype))
    itemsize = 4 if dtype == "float32" else 8
    return 2 * info["n"] * info["k"] * info["m"] * itemsize


def run_local(workload: str, implementation: str, dtype: str, repeats: int) -> dict:
    needs_jacobian = implementation in (
        "recipe-jacobian",
        "plstar-jacobian",
        "recipe-ntvp",
        "plstar-ntvp",
    )
    predicted = predicted_jacobian_bytes(workload, dtype)
    if implementation == "recipe-jacobian" and predicted > MEMORY_CAP:
        return {
            "status": "not run",
            "message": f"needs ≥ {predicted / 2**30:.0f} GiB for the Jacobians",
        }
    if needs_jacobian and implementation != "recipe-jacobian" and predicted > MEMORY_CAP:
        return {
            "status": "not run",
            "message": f"Jacobian of {predicted / 2**30:.0f} GiB recomputed in blocks: minutes per run",
        }
    if implementation == "recipe-ntvp" and "n256" not in workload:
        return {
            "status": "not run",
            "message": "n²·k per-pair products: 2 min at n = 256, ×16 at n = 1,024",
        }
    if implementation == "recipe-ntvp":
        repeats = 1  # minutes per run: reported as one run
    command = [
        sys.executable,
        str(HERE / "workloads.py"),
        workload,
        implementation,
        dtype,
        "--repeats",
        str(repeats),
    ]
    return _run(command)


def run_peer(workload: str, peer: str, dtype: str, repeats: int) -> dict:
    if not workload.startswith("mlp"):
        return {"status": "unsupported", "message": "adapter covers plain MLPs only"}
    sys.path.insert(0, str(PEERS))
    sys.path.insert(0, str(HERE))
    from workloads import build
    from write_workload import write_workload

    model, x, _ = build(workload, getattr(torch, dtype))  # the same weights as the torch runs
    layers = [
        (m.weight.detach().double().numpy(), m.bias.detach().double().numpy())
        for m in model
        if hasattr(m, "weight")
    ]
    path = Path("/tmp/plstar-bench") / f"{workload}.npz"
    path.parent.mkdir(exist_ok=True)
    write_workload(path, x.double().numpy(), layers, "tanh", dtype)
    out = path.with_suffix(f".{peer}.{dtype}.json")
    kernel = path.with_suffix(f".{peer}.{dtype}.npy")
    if peer == "neural-tangents":
        if not NT_PYTHON.exists():
            return {"status": "not installed", "message": "see benchmarks/peers/README.md"}
        command = [str(NT_PYTHON), str(PEERS / "nt_kernel.py")]
    else:
        command = [sys.executable, str(PEERS / "nngeometry_kernel.py")]
    command += [str(path), str(out), "--repeats", str(repeats), "--save-kernel", str(kernel)]
    try:
        subprocess.run(command, check=False, timeout=3600, capture_output=True)
        result = json.loads(out.read_text())
    except (subprocess.TimeoutExpired, FileNotFoundError, json.JSONDecodeError) as error:
        return {"status": "error", "message": str(error)[:200]}
    if result.get("status") == "ok":
        result["kernel_path"] = str(kernel)
    return result


def _run(command: list[str]) -> dict:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=3600, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": "timed out after 1 h"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"status": "error", "message": (done.stderr or "no output")[-300:]}
    return json.loads(lines[-1])


def agreement(reference: dict, other: dict) -> float | None:
    if reference.get("status") != "ok" or other.get("status") != "ok":
        return None
    a, b = np.load(reference["kernel_path"]), np.load(other["kernel_path"])
    if a.shape != b.shape:
        return float("nan")
    return float(np.abs(a - b).max() / np.abs(a).max())


def gemm_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """Best measured GEMM throughput (flop/s) over square products of a few sizes, after warm-up."""
    best = 0.0
    for n in (size // 2, size, 2 * size):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


def gram_phase(workload: str, dtype: str) -> dict:
    """Time plstar's structured Gram contraction alone and count its flops."""
    sys.path.insert(0, str(HERE))
    from workloads import build

    from plstar import structured
    from plstar.functional import make_functional

    model, x, info = build(workload, getattr(torch, dtype))
    fmodel = make_functional(model, x)
    modules, fallback = structured.split_parameters(fmodel)
    features = structured.block_features(fmodel, x, modules, fallback, x.dtype)
    flops = 0
    n, k = info["n"], info["k"]
    for kind, first, second in features.factors:
        if kind == "gram" and first.shape[1] == 1:
            flops += 2 * n * n * first.shape[2] + 2 * (n * k) ** 2 * second.shape[2]
        elif kind == "rows":
            flops += 2 * (n * k) ** 2 * first.shape[1]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        structured.contract_blocks(features, features, k)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"seconds": seconds, "flops": flops, "rate": flops / seconds}


def fmt_time(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('message', '')}"
    extra = f" (+{result['compile_s']:.2f} s compile)" if "compile_s" in result else ""
    single = " (1 run)" if len(result.get("times_s", [0, 0])) == 1 else ""
    return f"{result['median_s']:.3f} s{extra}{single}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--workloads", default=None, help="comma-separated subset")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default="/tmp/plstar-bench/results.json")
    parser.add_argument("--reuse-json", default=None, help="rows measured earlier: re-render them")
    parser.add_argument("--note", default="", help="a sentence printed under the table")
    args = parser.parse_args()
    workloads = (
        args.workloads.split(",") if args.workloads else (QUICK if args.quick else WORKLOADS)
    )
    rows = json.loads(Path(args.reuse_json).read_text())["rows"] if args.reuse_json else []
    for dtype in [] if args.reuse_json else args.dtypes.split(","):
        for workload in workloads:
            if dtype == "float64" and workload not in ("mlp-w512-n256-k1", "mlp-w512-n1024-k1"):
                continue  # float64: agreement and cost on the small workloads
            results = {impl: run_local(workload, impl, dtype, args.repeats) for impl in LOCAL}
            for peer in ("nngeometry", "neural-tangents"):
                results[peer] = run_peer(workload, peer, dtype, args.repeats)
            rows.append((workload, dtype, results))
            print(workload, dtype, {k: fmt_time(v) for k, v in results.items()}, flush=True)
    peaks = {d: gemm_peak(getattr(torch, d)) for d in args.dtypes.split(",")}
    gram = gram_phase("mlp-w4096-n1024-k10", "float32") if not args.quick else None
    write_report(Path(args.out), rows, peaks, gram, " ".join(sys.argv), args.note)
    if not args.reuse_json:
        Path(args.json).write_text(
            json.dumps({"rows": rows, "peaks": peaks, "gram": gram}, default=str)
        )


def write_report(
    path: Path, rows: list, peaks: dict, gram: dict | None, command: str, note: str = ""
) -> None:
    lines = [
        "## Tangent kernel",
        "",
        f"Produced by `python {command.replace(str(HERE.parent) + '/', '')}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        "Median of the runs of each measurement, each in its own process (peak RSS is that process's "
        "maximum resident set, including ~300 MB of torch itself). Ratio = plstar structured time / "
        "fastest peer's time in the same run (< 1 means plstar is faster). Agreement = max |K − K_plstar| / "
        "max |K_plstar| on the same weights.",
        "",
        "Measured GEMM throughput: "
        + ", ".join(f"{d} {r / 1e9:.1f} GFLOP/s" for d, r in peaks.items())
        + ".",
        "",
        "| workload | dtype | implementation | time | peak RSS | agreement |",
        "|---|---|---|---|---|---|",
    ]
    for workload, dtype, results in rows:
        reference = results["plstar-structured"]
        peer_times = [
            r["median_s"] for name, r in results.items()
            if not name.startswith("plstar") and r.get("status") == "ok"
        ]  # fmt: skip
        for name, result in results.items():
            rss = f"{result['peak_rss_mb']:.0f} MB" if result.get("status") == "ok" else ""
            agree = agreement(reference, result)
            agree_text = "" if agree is None or name == "plstar-structured" else f"{agree:.1e}"
            lines.append(
                f"| {workload} | {dtype} | {name} | {fmt_time(result)} | {rss} | {agree_text} |"
            )
        if reference.get("status") == "ok" and peer_times:
            ratio = reference["median_s"] / min(peer_times)
            lines.append(
                f"| {workload} | {dtype} | **ratio vs fastest peer** | **{ratio:.2f}** | | |"
            )
    if note:
        lines += ["", note]
    if gram is not None:
        rate = gram["rate"]
        lines += [
            "",
            f"Gram phase of the structured kernel on mlp-w4096-n1024-k10 (float32): {gram['flops'] / 1e9:.0f} GFLOP "
            f"in {gram['seconds']:.2f} s = {rate / 1e9:.1f} GFLOP/s, {100 * rate / peaks.get('float32', rate):.0f}% "
            "of the measured GEMM throughput.",
        ]
    write_section("kernel", "\n".join(lines), path)


if __name__ == "__main__":
    main()
