"""Benchmark workloads and the implementations timed on them, one measurement per process.

Run one measurement:  python benchmarks/workloads.py WORKLOAD IMPLEMENTATION DTYPE [--repeats 5]
It prints one JSON line: times, median, peak resident memory, and the kernel's checksum rows used
by the harness (kernel_benchmark.py) to check agreement between implementations.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import plstar
from plstar.data import load_digits
from plstar.models import NTKLinear, cnn, mlp

KERNEL_DIR = Path("/tmp/plstar-bench")


class ResidualLayerNormMLP(nn.Module):
    """x -> NTKLinear -> [LayerNorm -> NTKLinear -> tanh] x 2 with skips -> NTKLinear."""

    def __init__(self, d: int, width: int, k: int, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = NTKLinear(d, width, generator=g, dtype=dtype)
        self.norms = nn.ModuleList([nn.LayerNorm(width, dtype=dtype) for _ in range(2)])
        self.hidden = nn.ModuleList(
            [NTKLinear(width, width, generator=g, dtype=dtype) for _ in range(2)]
        )
        self.out = NTKLinear(width, k, generator=g, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for norm, layer in zip(self.norms, self.hidden, strict=True):
            h = h + torch.tanh(layer(norm(h)))
        return self.out(h)


def build(workload: str, dtype: torch.dtype) -> tuple[nn.Module, Tensor, dict]:
    """(model, inputs, description) for a workload name like 'mlp-w512-n1024-k1'."""
    kind, *fields = workload.split("-")
    spec = {f[0]: int(f[1:]) for f in fields}
    n, k = spec["n"], spec.get("k", 1)
    data = load_digits(n, outputs=10 if k == 10 else 1, dtype=dtype)
    x = data.x
    if kind == "mlp":
        model = mlp(64, spec["w"], 3, k, generator_seed=0, dtype=dtype)
    elif kind == "resmlp":
        model = ResidualLayerNormMLP(64, spec["w"], k, 0, dtype)
    elif kind == "cnn":
        model = cnn(1, 8, spec["c"], 3, k, generator_seed=0, dtype=dtype)
        x = x.reshape(n, 1, 8, 8)
    else:
        raise ValueError(workload)
    m = sum(p.numel() for p in model.parameters())
    return model.eval(), x, {"n": n, "k": k, "m": m}


def _single(model: nn.Module) -> Callable[[dict, Tensor], Tensor]:
    return lambda params, xi: functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)


def recipe_jacobian_contraction(model: nn.Module, x1: Tensor, x2: Tensor) -> Tensor:
    """The PyTorch NTK tutorial's 'Jacobian contraction' recipe, verbatim up to the layout."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    fnet_single = _single(model)
    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    result = torch.stack(
        [torch.einsum("Naf,Mbf->NMab", j1, j2) for j1, j2 in zip(jac1, jac2, strict=True)]
    )
    result = result.sum(0)  # (N, M, k, k)
    n, m_, k, _ = result.shape
    return result.permute(0, 2, 1, 3).reshape(n * k, m_ * k)


def recipe_ntk_vps(model: nn.Module, x1: Tensor, x2: Tensor, block: int = 16) -> Tensor:
    """The tutorial's 'NTK-vector products' recipe; applied to blocks of block×block sample pairs,
    since the verbatim form vmaps over all n² pairs and needs n²·m memory."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    fnet_single = _single(model)

    def get_ntk(xa: Tensor, xb: Tensor) -> Tensor:
        output, vjp_fn = vjp(lambda p: fnet_single(p, xa), params)

        def get_ntk_slice(vec: Tensor) -> Tensor:
            vjps = vjp_fn(vec)
            return jvp(lambda p: fnet_single(p, xb), (params,), vjps)[1]

        basis = torch.eye(output.numel(), dtype=output.dtype).view(output.numel(), -1)
        return vmap(get_ntk_slice)(basis)

    pairs = vmap(vmap(get_ntk, (None, 0)), (0, None))
    rows = []
    for i in range(0, x1.shape[0], block):
        cols = [pairs(x1[i : i + block], x2[j : j + block]) for j in range(0, x2.shape[0], block)]
        rows.append(torch.cat(cols, dim=1))
    result = torch.cat(rows, dim=0)  # (N, M, k_a, k_b)
    n, m_, k, _ = result.shape
    return result.permute(0, 2, 1, 3).reshape(n * k, m_ * k)


IMPLEMENTATIONS: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "plstar-structured": lambda model, x: plstar.tangent_kernel(
        model, x, implementation="structured", dtype=x.dtype
    ),
    "plstar-auto": lambda model, x: plstar.tangent_kernel(model, x, dtype=x.dtype),
    "plstar-jacobian": lambda model, x: plstar.tangent_kernel(
        model, x, implementation="jacobian", dtype=x.dtype
    ),
    "plstar-ntvp": lambda model, x: plstar.tangent_kernel(
        model, x, implementation="ntvp", dtype=x.dtype
    ),
    "recipe-jacobian": lambda model, x: recipe_jacobian_contraction(model, x, x),
    "recipe-ntvp": lambda model, x: recipe_ntk_vps(model, x, x),
}


def measure(workload: str, implementation: str, dtype_name: str, repeats: int) -> dict:
    dtype = getattr(torch, dtype_name)
    model, x, info = build(workload, dtype)
    fn = IMPLEMENTATIONS[implementation]
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    kernel = None
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad() if implementation.startswith("plstar") else torch.enable_grad():
            kernel = fn(model, x)
        times.append(time.perf_counter() - start)
        kernel = kernel.detach()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    KERNEL_DIR.mkdir(exist_ok=True)
    path = KERNEL_DIR / f"{workload}-{dtype_name}-{implementation}.npy"
    np.save(path, kernel.double().numpy())
    return {
        "workload": workload, "implementation": implementation, "dtype": dtype_name, **info,
        "times_s": times, "median_s": statistics.median(times), "peak_rss_mb": peak / 1024,
        "setup_rss_mb": baseline_rss / 1024, "kernel_path": str(path), "status": "ok",
        "kernel_mb": kernel.numel() * kernel.element_size() / 2**20,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("implementation", choices=sorted(IMPLEMENTATIONS))
    parser.add_argument("dtype", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        result = measure(args.workload, args.implementation, args.dtype, args.repeats)
    except (RuntimeError, MemoryError) as error:
        result = {"workload": args.workload, "implementation": args.implementation, "dtype": args.dtype,
                  "status": "error", "message": str(error)[:300]}  # fmt: skip
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
