"""The torch.func recipe and plstar side by side on the architectures people train.

    python benchmarks/architecture_benchmark.py [--repeats 3] [--dtypes float32,float64]
        [--workloads resnet18,hf-gpt2,...] [--no-analyze] [--out docs/benchmarks.md]

Models come from the test zoo (tests/architectures.py) at realistic sizes, random init, eval mode:
a ResNet-18 in plain PyTorch (torchvision's layout, in-place ReLU) on CIFAR-sized images, Hugging
Face GPT-2 (last-token logits), BERT and a ViT, an MLP-Mixer and a 1-D CNN. Each (workload,
method, dtype) runs in its own process (this file with --measure), so a peak resident set is
that method's own. The recipe is vmap(jacrev) over samples, then J·Jᵀ summed over parameter
blocks (no concatenated copy of J); "plstar" is tangent_kernel with implementation="auto",
reporting what it chose. Agreement = max |K_plstar − K_recipe| / max |K_recipe|. With
--analyze (the default) ``plstar.analyze`` (hessian_outputs=16, float64 accumulation, model in
float32) also runs once per workload, with the share of its time spent on ‖H_F‖.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from report_sections import write_section
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from architectures import ARCHITECTURES, Selected, build, parameter_count  # noqa: E402

KERNEL_DIR = Path("/tmp/plstar-bench")
RECIPE_CAP = 10 * 2**30  # the recipe holds J (n·k·m numbers); larger is recorded as not run
SLOW_S = 30.0  # a run longer than this is not repeated
SHORT_S = 2.0  # runs after the first are repeated until they took this long (≤ MAX_REPEATS)
MAX_REPEATS = 25

RESNET18 = dict(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_kernel=7, stem_stride=2)
WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet18": ("resnet", dict(n=16, size=32, pool=True, **RESNET18)),
    "hf-gpt2": ("hf-gpt2", dict(n=8, t=16, vocab=100, d=64, layers=2, heads=4)),
    "hf-bert": ("hf-bert", dict(n=32, t=16, vocab=1000, d=32, intermediate=128, max_positions=512)),
    "vit": ("vit", dict(n=16, size=32, patch=4, d=64)),
    "vit-mha": ("vit-mha", dict(n=16, size=32, patch=4, d=64)),
    "mixer": ("mixer", dict(n=16, size=32, patch=4, d=64)),
    "cnn1d": ("cnn1d", dict(n=32, length=128, c=32)),
}
METHODS = ("recipe", "plstar", "analyze")


def recipe_kernel(model: nn.Module, x: Tensor, output: Any, block: int | None = None) -> Tensor:
    """K = J·Jᵀ with J from vmap(jacrev) over samples, summed over parameter blocks (no
    concatenated copy of J). ``block`` None: J of all n samples at once (n·k·m numbers, the
    recipe as written); a count: J of ``block`` samples at a time, each block's J computed once
    per row block and reused on its diagonal (what fits a GPU when all of J does not)."""
    selected = Selected(model, output)
    params = {name: p.detach() for name, p in selected.named_parameters()}

    def single(p: dict[str, Tensor], xi: Tensor) -> Tensor:
        return functional_call(selected, p, (xi.unsqueeze(0),)).squeeze(0)

    def rows(xs: Tensor) -> list[Tensor]:
        jacobian = vmap(jacrev(single), (None, 0))(params, xs)  # {name: (c, k, *shape)}
        return [j.reshape(xs.shape[0] * j.shape[1], -1) for j in jacobian.values()]

    size = x.shape[0] if block is None else block
    blocks = [slice(s, min(x.shape[0], s + size)) for s in range(0, x.shape[0], size)]
    out_rows = []
    for a in blocks:
        left = rows(x[a])
        right = [left if b == a else rows(x[b]) for b in blocks]
        out_rows.append(torch.cat([sum(u @ v.T for u, v in zip(left, r, strict=True))
                                   for r in right], 1))  # fmt: skip
    return torch.cat(out_rows, 0)


def _selecting(output: Any) -> dict[str, Any]:
    return {} if output is None else {"output": output}


def run_method(
    method: str, model: nn.Module, x: Tensor, output: Any, dtype: torch.dtype
) -> tuple[Any, str]:
    """(the kernel, or the Analysis, and what plstar chose)."""
    if method == "recipe":
        return recipe_kernel(model, x, output).detach(), "recipe"
    if method == "plstar":
        from plstar.kernel import planned_tangent_kernel

        kernel, plan = planned_tangent_kernel(model, x, dtype=dtype, **_selecting(output))
        return kernel, plan.implementation
    import plstar

    k = Selected(model, output)(x[:1]).shape[-1]
    y = torch.randn(x.shape[0], k, generator=torch.Generator().manual_seed(0), dtype=dtype)
    analysis = plstar.analyze(model, x, y, hessian_outputs=16, **_selecting(output))
    return analysis, analysis.implementation


def measure(workload: str, method: str, dtype_name: str, repeats: int) -> dict[str, Any]:
    """One (workload, method, dtype) in this process: times, peak RSS, the kernel saved to disk."""
    name, sizes = WORKLOADS[workload]
    dtype = getattr(torch, dtype_name)
    model, x, output = build(name, dtype, **sizes)
    with torch.no_grad():
        k = Selected(model, output)(x[:1]).shape[-1]
    # torch.func imports torch._dynamo on its first transform (1–2 s, once per process, recipe
    # and plstar alike): imported here so "first call" is the method's own first-call cost
    importlib.import_module("torch._dynamo")
    info = {"n": x.shape[0], "k": k, "m": parameter_count(model)}
    needed = info["n"] * k * info["m"] * torch.empty((), dtype=dtype).element_size()
    if method == "recipe" and needed > RECIPE_CAP:
        return {**info, "status": "not run", "message": f"J alone is {needed / 2**30:.1f} GiB"}
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, result, chosen = [], None, ""
    while len(times) < (1 if method == "analyze" else MAX_REPEATS):
        start = time.perf_counter()
        result, chosen = run_method(method, model, x, output, dtype)
        times.append(time.perf_counter() - start)
        if times[-1] > SLOW_S or (len(times) >= repeats and sum(times[1:]) >= SHORT_S):
            break
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {**info, "status": "ok", "chosen": chosen, "times_s": times,
           "median_s": statistics.median(times[1:] or times), "peak_rss_mb": peak / 1024,
           "setup_rss_mb": setup / 1024}  # fmt: skip
    if method != "analyze":  # the work done: matmul-class flops, counted by torch (untimed run)
        with FlopCounterMode(display=False) as counter:
            run_method(method, model, x, output, dtype)
        out["gflop"] = counter.get_total_flops() / 1e9
    if method == "analyze":
        seconds = result.seconds
        out["hessian_share"] = seconds.get("model hessian", 0.0) / sum(seconds.values())
        out["hessian_converged"] = result.hessian_norm is not None and result.hessian_norm.converged
        out["failed"] = list(result.failed)
    else:
        KERNEL_DIR.mkdir(exist_ok=True)
        path = KERNEL_DIR / f"arch-{workload}-{dtype_name}-{method}.npy"
        np.save(path, result.double().numpy())
        out["kernel_path"] = str(path)
    return out


def run_child(workload: str, method: str, dtype: str, repeats: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", workload, method, dtype, "--repeats"]
    try:
        done = subprocess.run(
            [*command, str(repeats)], capture_output=True, text=True, timeout=3600, check=False
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": "timed out after 1 h"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        last = [line for line in (done.stderr or "no output").splitlines() if line.strip()]
        return {"status": "error", "message": (last[-1] if last else "no output")[:200]}
    return json.loads(lines[-1])


def agreement(results: dict[str, dict]) -> float | None:
    paths = [results[m].get("kernel_path") for m in ("recipe", "plstar")]
    if None in paths:
        return None
    a, b = np.load(paths[0]), np.load(paths[1])
    return float(np.abs(a - b).max() / np.abs(a).max())


def _time(result: dict) -> str:
    if result.get("status") != "ok":
        return f"{result.get('status')}: {result.get('message', '')}"
    runs = len(result["times_s"])
    return f"{result['median_s']:.3f} s" + (" (1 run)" if runs == 1 else "")


def _rss(result: dict) -> str:
    if result.get("status") != "ok":
        return ""
    return f"{result['peak_rss_mb']:.0f} MB (+{result['peak_rss_mb'] - result['setup_rss_mb']:.0f})"


def table(rows: list[tuple[str, str, dict[str, dict]]]) -> list[str]:
    lines = [
        "| model (n, k, m) | dtype | recipe | plstar auto → choice | speed-up | GFLOP recipe / "
        "plstar (ratio) | plstar first call | peak RSS recipe | peak RSS plstar | agreement "
        "| analyze (‖H_F‖ share) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, dtype, results in rows:
        recipe, ours, whole = (results.get(m, {}) for m in METHODS)
        shape = next((r for r in (ours, recipe) if "m" in r), {})
        label = f"{workload} ({shape.get('n')}, {shape.get('k')}, {shape.get('m', 0):,})"
        both = recipe.get("status") == ours.get("status") == "ok"
        speedup = f"{recipe['median_s'] / ours['median_s']:.2f}×" if both else ""
        choice = f"{_time(ours)} → {ours['chosen']}" if ours.get("status") == "ok" else _time(ours)
        first = f"{ours['times_s'][0]:.3f} s" if ours.get("status") == "ok" else ""
        flops = ""
        if "gflop" in recipe and "gflop" in ours:
            ratio = recipe["gflop"] / max(ours["gflop"], 1e-12)
            flops = f"{recipe['gflop']:.2f} / {ours['gflop']:.2f} ({ratio:.2f}×)"
        agree = agreement(results)
        analyzed = ""
        if whole.get("status") == "ok":
            unconverged = "" if whole["hessian_converged"] else ", ‖H_F‖ unconverged"
            analyzed = (
                f"{whole['median_s']:.1f} s ({100 * whole['hessian_share']:.0f} %{unconverged})"
            )
        elif whole:
            analyzed = _time(whole)
        lines.append(
            f"| {label} | {dtype} | {_time(recipe)} | {choice} | {speedup} | {flops} | {first} "
            f"| {_rss(recipe)} | {_rss(ours)} | {'' if agree is None else f'{agree:.1e}'} "
            f"| {analyzed} |"
        )
    return lines


def write_report(
    path: Path, rows: list, command: str, repeats: int, load: tuple[float, float]
) -> None:
    lines = [
        "## Architectures",
        "",
        f"Produced by `python {command}` on {time.strftime('%Y-%m-%d')}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}. Models from tests/architectures.py at the sizes of "
        "benchmarks/architecture_benchmark.py's WORKLOADS (random init, eval mode; the ResNet-18 is "
        "torchvision's layout in plain PyTorch, in-place ReLU included). Recipe = vmap(jacrev) + "
        'J·Jᵀ; plstar = `tangent_kernel` with `implementation="auto"`, accumulating in the '
        f"row's dtype. Median of the runs after the first (at least {repeats}, and until they "
        f"took {SHORT_S:.0f} s, at most {MAX_REPEATS}; one run when it exceeds {SLOW_S:.0f} s), "
        "each method in its own process. GFLOP = the matmul, convolution and attention flops "
        "of one call, counted by torch.utils.flop_counter.FlopCounterMode (elementwise work not "
        "counted); their ratio is the speed-up that running at the recipe's flop rate would "
        "give. Peak RSS is that process's maximum resident set "
        "(+ the growth over the model and inputs alone). Speed-up = recipe / plstar. First call = "
        "plstar's first call in its process (model checks, sizing and entry check included; "
        "torch._dynamo, which torch.func imports once per process, imported before). Analyze = one "
        "`plstar.analyze` run (hessian_outputs = 16), with the share of its time spent on ‖H_F‖. "
        f"Load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end"
        + (
            ": above the core count, other processes shared the CPUs and the times are inflated "
            "unevenly."
            if max(load) > (os.cpu_count() or 1)
            else " (the machine was otherwise idle). Rows under 0.2 s differed by up to 1.5× "
            "between two runs of this command here."
        ),
        "",
        *table(rows),
    ]
    write_section("architectures", "\n".join(lines), path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", nargs=3, metavar=("WORKLOAD", "METHOD", "DTYPE"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,float64")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--no-analyze", action="store_true")
    parser.add_argument("--out", default=str(HERE.parent / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    if args.measure:
        workload, method, dtype = args.measure
        try:
            result = measure(workload, method, dtype, args.repeats)
        except Exception as error:  # any failure is a row of the table, not a crash of the run
            message = str(error).strip().splitlines()
            result = {"status": "error", "message": f"{type(error).__name__}: {message[0][:100]}"}
        print(json.dumps(result), flush=True)
        return
    rows, load = [], os.getloadavg()[0]
    for dtype in args.dtypes.split(","):
        for workload in args.workloads.split(","):
            if not ARCHITECTURES[WORKLOADS[workload][0]].available():
                rows.append((workload, dtype, {"plstar": {"status": "not installed"}}))
                continue
            analyze = dtype == "float32" and not args.no_analyze  # once per workload
            methods = [m for m in METHODS if m != "analyze" or analyze]
            results = {m: run_child(workload, m, dtype, args.repeats) for m in methods}
            rows.append((workload, dtype, results))
            print("\n".join(table([rows[-1]])[2:]), flush=True)
    print("\n".join(table(rows)))
    command = " ".join([os.path.relpath(sys.argv[0], HERE.parent), *sys.argv[1:]])
    write_report(Path(args.out), rows, command, args.repeats, (load, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
