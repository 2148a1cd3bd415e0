"""One prepared check of plstar on a GPU: correctness against the CPU, timings against the recipe.

    python benchmarks/gpu_check.py [--device cuda] [--out DIR] [--budget-s 280] [--small]
        [--write-docs]

Made to finish in under 5 minutes on one H200 (``--budget-s`` stops starting new steps once it is
spent; every step records its own status, so one failure never hides the others). Steps:

1. **environment** — torch, CUDA, the device's name and memory.
2. **gemm** — the device's best measured square GEMM throughput, float32 and float64.
3. **correctness** (float64) — K (every implementation), λ_min and λ_max of K, β = λ_max(H_L) and
   ρ = ‖∇L‖²/(2L) on the device against the same computation on the CPU; a small ResNet and a
   small transformer's K likewise. Target: relative differences ≤ 1e-10. Random draws are made on
   the host (plstar.devices), so both sides start Lanczos from the same vectors.
4. **timings** — plstar ``tangent_kernel`` (auto) against the torch.func recipe (vmap(jacrev) per
   sample block, then J·Jᵀ per parameter, blocked so that J fits) on the device, float32 and
   float64: depth-3 MLP width 2048 on n = 1024 digits with k = 1 and k = 10, a ResNet-18 (n 64,
   k 10, CIFAR-sized) and a small transformer. Median of 2 after a warm-up, synchronized; peak
   device memory (``torch.cuda.max_memory_allocated``); agreement with the recipe.
   Targets: ≥ 20× on the MLPs, ≥ 5× on the ResNet.
5. **gram** — the structured Gram contraction alone (features of the k = 10 MLP, float32): its
   flop rate against the GEMM peak of step 2. Target ≥ 50 %.
6. **analyze** — the default ``plstar analyze --device <device>`` end to end (a subprocess; its own
   "done in"). Target ≤ 3 s.
7. **distributed** — ``torchrun --nproc-per-node 1 -m plstar analyze --distributed`` (NCCL on one
   GPU) against the single-process command: the same λ_min.

Writes ``gpu_check.json`` and ``gpu_section.md`` into --out (default: $OUT when set, else
/tmp/plstar-gpu-check); with --write-docs also the "gpu" section of docs/benchmarks.md. ``--small``
shrinks every workload (a dry run that works on the CPU: ``--device cpu --small``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from architecture_benchmark import recipe_kernel  # noqa: E402
from architectures import build  # noqa: E402
from report_sections import write_section  # noqa: E402

import plstar  # noqa: E402
from plstar.data import load_digits  # noqa: E402
from plstar.models import mlp  # noqa: E402

RESNET18 = dict(blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512), stem_kernel=7, stem_stride=2)
TARGETS = {"agreement": 1e-10, "mlp": 20.0, "resnet": 5.0, "gram": 0.5, "analyze_s": 3.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, call: Callable[[], Any], repeats: int) -> tuple[Any, list[float]]:
    """(last result, wall times) of ``repeats`` synchronized calls after one warm-up call."""
    result = call()
    times = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        result = call()
        sync(device)
        times.append(time.perf_counter() - started)
    return result, times


def relative(found: Tensor | float, expected: Tensor | float) -> float:
    """max |found − expected| / max |expected| (on the host, in float64)."""
    a = torch.as_tensor(found, dtype=torch.float64, device="cpu")
    b = torch.as_tensor(expected, dtype=torch.float64, device="cpu")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def mlp_problem(
    n: int, width: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Tensor, Tensor]:
    data = load_digits(n, outputs=k, dtype=dtype)
    model = mlp(64, width, 3, k, generator_seed=0, dtype=dtype).eval()
    return model.to(device), data.x.to(device), data.y.to(device)


def zoo_problem(
    name: str, sizes: dict[str, Any], dtype: torch.dtype, device: torch.device
) -> tuple[nn.Module, Tensor, Any]:
    model, x, output = build(name, dtype, **sizes)
    return model.to(device), x.to(device), output


def step_environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": str(device), "plstar": plstar.__version__,
    }  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"name": props.name, "memory_gib": props.total_memory / 2**30,
                 "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}",
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}  # fmt: skip
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def step_gemm(device: torch.device, small: bool) -> dict[str, Any]:
    sizes = (256, 512) if small else (4096, 8192)
    found = {}
    for dtype in (torch.float32, torch.float64):
        best = 0.0
        for size in sizes:
            a = torch.randn(size, size, dtype=dtype, device=device)
            b = torch.randn(size, size, dtype=dtype, device=device)
            _, times = timed(device, lambda a=a, b=b: a @ b, 5)
            best = max(best, 2 * size**3 / min(times))
        found[str(dtype).removeprefix("torch.")] = best
    return {"flops_per_s": found}


def step_correctness(device: torch.device, small: bool) -> dict[str, Any]:
    """Everything in float64 on the device against the CPU."""
    n, width = (32, 32) if small else (128, 256)
    host = torch.device("cpu")
    results: dict[str, Any] = {}
    sides = {}
    for where in (host, device):
        model, x, y = mlp_problem(n, width, 10, torch.float64, where)
        side: dict[str, Any] = {
            impl: plstar.tangent_kernel(model, x, implementation=impl)
            for impl in ("structured", "jacobian", "ntvp")
        }
        spectrum = plstar.spectrum(side["structured"])
        side["lambda_min"], side["lambda_max"] = spectrum.lambda_min, spectrum.lambda_max
        side["beta"] = plstar.loss_sharpness(model, x, y, tol=1e-13, max_iter=300).value
        side["rho"] = plstar.pl_ratio(model, x, y)
        sides[where.type] = side
    for key, value in sides[host.type].items():
        results[f"mlp {key}"] = relative(sides[device.type][key], value)
    zoo = {
        "resnet": ("resnet", dict(n=4, size=16)),
        "transformer": ("gpt2-like", dict(n=4, t=8)),
    }
    for label, (name, sizes) in zoo.items():
        kernels = []
        for where in (host, device):
            model, x, output = zoo_problem(name, sizes, torch.float64, where)
            kernels.append(plstar.tangent_kernel(model, x, **({} if output is None else
                                                               {"output": output})))  # fmt: skip
        results[f"{label} K"] = relative(kernels[1], kernels[0])
    worst = max(results.values())
    return {"relative": results, "worst": worst, "met": worst <= TARGETS["agreement"]}


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def step_timings(device: torch.device, small: bool, deadline: float) -> dict[str, Any]:
    n_mlp, width, n_res = (64, 64, 4) if small else (1024, 2048, 64)
    resnet = dict(n=n_res, size=32, pool=True, **({} if small else RESNET18))
    workloads: dict[str, Callable[[torch.dtype], tuple[nn.Module, Tensor, Any, int]]] = {
        "mlp k=1": lambda dt: (*mlp_problem(n_mlp, width, 1, dt, device)[:2], None, 256),
        "mlp k=10": lambda dt: (*mlp_problem(n_mlp, width, 10, dt, device)[:2], None, 128),
        "resnet18": lambda dt: (*zoo_problem("resnet", resnet, dt, device), 16),
        "transformer": lambda dt: (*zoo_problem("gpt2-like", dict(n=32, t=16), dt, device), 32),
    }
    rows = []
    for label, make in workloads.items():
        for dtype in (torch.float32, torch.float64):
            row: dict[str, Any] = {"workload": label, "dtype": str(dtype).removeprefix("torch.")}
            rows.append(row)
            if time.perf_counter() > deadline:
                row["status"] = "skipped (time budget)"
                continue
            try:
                model, x, output, block = make(dtype)
                selected = {} if output is None else {"output": output}
                row["m"] = sum(p.numel() for p in model.parameters())
                row["n"] = x.shape[0]
                _peak_reset(device)

                def ours(model=model, x=x, dtype=dtype, selected=selected) -> Tensor:
                    return plstar.tangent_kernel(model, x, dtype=dtype, **selected)

                def recipe(model=model, x=x, output=output, block=block) -> Tensor:
                    return recipe_kernel(model, x, output, block).detach()

                kernel, times = timed(device, ours, 2)
                row["plstar_s"], row["plstar_peak_gib"] = statistics.median(times), _peak(device)
                _peak_reset(device)
                with torch.enable_grad():
                    reference, times = timed(device, recipe, 1)
                row["recipe_s"], row["recipe_peak_gib"] = statistics.median(times), _peak(device)
                row["speedup"] = row["recipe_s"] / row["plstar_s"]
                row["agreement"] = relative(kernel, reference)
                row["status"] = "ok"
                del kernel, reference
            except Exception as error:  # recorded, and the next workload runs
                row["status"] = f"error: {type(error).__name__}: {str(error)[:200]}"
            _peak_reset(device)
    return {"rows": rows}


def step_gram(device: torch.device, small: bool, gemm: dict[str, Any] | None) -> dict[str, Any]:
    from plstar import structured
    from plstar.functional import make_functional

    n, width = (64, 64) if small else (1024, 2048)
    model, x, _ = mlp_problem(n, width, 10, torch.float32, device)
    fmodel = make_functional(model, x)
    modules, fallback = structured.split_parameters(fmodel)
    features = structured.block_features(fmodel, x, modules, fallback, torch.float32)
    k, flops = 10, 0
    for kind, first, second in features.factors:
        if kind == "gram" and first.shape[1] == 1:
            flops += 2 * n * n * first.shape[2] + 2 * (n * k) ** 2 * second.shape[2]
        elif kind == "rows":
            flops += 2 * (n * k) ** 2 * first.shape[1]
    _, times = timed(device, lambda: structured.contract_blocks(features, features, k), 5)
    rate = flops / min(times)
    peak = (gemm or {}).get("flops_per_s", {}).get("float32")
    share = rate / peak if peak else None
    return {"flops": flops, "seconds": min(times), "rate": rate, "gemm_share": share,
            "met": share is not None and share >= TARGETS["gram"]}  # fmt: skip


def _plstar_command(args: list[str], launcher: list[str] | None = None) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "analysis.json"
        command = [*(launcher or [sys.executable, "-m"]), "plstar", "analyze", *args,
                   "--json", str(out)]  # fmt: skip
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, timeout=240)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"exit {done.returncode}: {done.stderr.strip()[-400:]}")
        return json.loads(out.read_text()), wall


def step_analyze(device: torch.device, small: bool) -> dict[str, Any]:
    extra = ["-n", "64", "--width", "64"] if small else []
    payload, wall = _plstar_command(["--device", str(device), *extra])
    seconds = payload["seconds"]
    return {"done_in_s": seconds, "wall_s": wall, "met": seconds <= TARGETS["analyze_s"],
            "lambda_min": payload["analysis"]["kernel"]["lambda_min"]}  # fmt: skip


def step_distributed(device: torch.device, small: bool) -> dict[str, Any]:
    if device.type != "cuda":
        return {"status": "not run: NCCL needs a CUDA device"}
    extra = ["-n", "64", "--width", "64"] if small else ["-n", "512"]
    single, _ = _plstar_command(["--device", str(device), *extra])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m"]
    ranked, wall = _plstar_command(["--distributed", *extra], launcher=torchrun)
    a = single["analysis"]["kernel"]["lambda_min"]
    b = ranked["analysis"]["kernel"]["lambda_min"]
    return {"backend": ranked["config"].get("distributed", {}).get("backend"),
            "lambda_min_single": a, "lambda_min_distributed": b,
            "relative": abs(a - b) / abs(a), "wall_s": wall}  # fmt: skip


def markdown(report: dict[str, Any]) -> str:
    env = report["steps"]["environment"].get("result", {})
    lines = [
        "## GPU check",
        "",
        f"`python benchmarks/gpu_check.py --write-docs` on {env.get('name', '?')} "
        f"({env.get('memory_gib', 0):.0f} GiB), torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"{report['date']}; {report['seconds']:.0f} s in all.",
        "",
    ]
    for name, step in report["steps"].items():
        if step.get("status") != "ok":
            lines.append(f"- **{name}**: {step.get('status')}")
    correct = report["steps"].get("correctness", {}).get("result")
    if correct:
        lines += ["", "Float64 on the GPU against the CPU (max relative difference):", "",
                  "| quantity | relative |", "|---|---|"]  # fmt: skip
        lines += [f"| {k} | {v:.1e} |" for k, v in correct["relative"].items()]
    timing = report["steps"].get("timings", {}).get("result")
    if timing:
        lines += ["", "| workload | dtype | m | plstar | recipe | speed-up | peak GiB (plstar / "
                  "recipe) | agreement |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in timing["rows"]:
            if row.get("status") != "ok":
                lines.append(f"| {row['workload']} | {row['dtype']} | | {row.get('status')} "
                             "| | | | |")  # fmt: skip
                continue
            lines.append(
                f"| {row['workload']} | {row['dtype']} | {row['m']:,} | {row['plstar_s']:.3f} s | "
                f"{row['recipe_s']:.3f} s | {row['speedup']:.1f}× | "
                f"{row['plstar_peak_gib'] or 0:.2f} / {row['recipe_peak_gib'] or 0:.2f} | "
                f"{row['agreement']:.1e} |"
            )
    gram = report["steps"].get("gram", {}).get("result")
    if gram and gram.get("gemm_share") is not None:
        lines += ["", f"Gram phase (MLP k = 10, float32): {gram['rate'] / 1e12:.1f} Tflop/s, "
                  f"{100 * gram['gemm_share']:.0f} % of the measured GEMM peak."]  # fmt: skip
    analyze = report["steps"].get("analyze", {}).get("result")
    if analyze:
        lines += ["", f"Default `plstar analyze --device {env.get('device')}`: done in {analyze['done_in_s']:.2f} s "
                  f"({analyze['wall_s']:.1f} s wall with start-up)."]  # fmt: skip
    ranked = report["steps"].get("distributed", {}).get("result")
    if ranked and "relative" in ranked:
        lines += ["", f"`torchrun --nproc-per-node 1 -m plstar analyze --distributed` "
                  f"({ranked['backend']}): λ_min relative difference {ranked['relative']:.1e} "
                  "from the single process."]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", "/tmp/plstar-gpu-check")))  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=280.0)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    started = time.perf_counter()
    deadline = started + args.budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "steps": {}}
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "environment": lambda: step_environment(device),
        "gemm": lambda: step_gemm(device, args.small),
        "correctness": lambda: step_correctness(device, args.small),
        "timings": lambda: step_timings(device, args.small, deadline),
        "gram": lambda: step_gram(device, args.small, report["steps"]["gemm"].get("result")),
        "analyze": lambda: step_analyze(device, args.small),
        "distributed": lambda: step_distributed(device, args.small),
    }
    for name, step in steps.items():
        if time.perf_counter() > deadline:
            report["steps"][name] = {"status": "skipped (time budget)"}
            continue
        begun = time.perf_counter()
        try:
            report["steps"][name] = {"status": "ok", "result": step()}
        except Exception as error:
            report["steps"][name] = {"status": f"error: {type(error).__name__}: {str(error)[:300]}"}
        report["steps"][name]["seconds"] = time.perf_counter() - begun
        print(f"{name}: {json.dumps(report['steps'][name], default=str)[:600]}", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report)
    (args.out / "gpu_section.md").write_text(text + "\n")
    if args.write_docs:
        write_section("gpu", text)
    print(text)


if __name__ == "__main__":
    main()
