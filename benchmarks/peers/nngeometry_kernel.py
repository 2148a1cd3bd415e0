"""Peer adapter: empirical NTK of a workload with nngeometry (hooks-based Gram matrix).

Run with the system python3 (torch CPU + ``pip install --no-deps nngeometry``, see README.md):

    python3 benchmarks/peers/nngeometry_kernel.py WORKLOAD.npz OUT.json \
        [--repeats 5] [--save-kernel PATH.npy] [--batch-size N]

API used: ``nngeometry.GramMatrix(model, loader, representation=FMatDense)``, i.e.
``TorchHooksJacobianBackend.get_gram_matrix``, which for every nn.Linear layer uses
the per-layer Gram trick  K_l = (X_i X_o^T) * (G_i G_o^T) + G_i G_o^T  (inputs X and
output-gradients G captured by hooks; no per-example Jacobian is materialized).
Its result is a (k, n, k, n) tensor, converted here to sample-major (n*k, n*k).

NTK parameterization is reproduced by a parameter-free ``Scale(1/sqrt(in))`` module
placed before each standard nn.Linear holding (W_l, b_l): the hook sees the scaled
input, so dK/dW_l is exactly the NTK-parameterized gradient.

Writes JSON with status "ok" (times_s, median_s, warmup_s, peak_rss_mb, ...),
"unsupported" (cnn / residual_layernorm workloads) or "error" (message).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from write_workload import read_workload


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def nngeometry_version() -> str:
    try:
        from importlib.metadata import version

        return version("nngeometry")
    except Exception:  # pragma: no cover
        return "?"


def build_model(wl: dict, dtype):
    import torch
    from torch import nn

    class Scale(nn.Module):
        """Parameter-free multiplication by a constant (the NTK 1/sqrt(fan_in))."""

        def __init__(self, c: float) -> None:
            super().__init__()
            self.c = float(c)

        def forward(self, h):
            return h * self.c

    from plstar.models import activation_module  # the same activations plstar's models use

    L = wl["depth"]
    mods = []
    for li, (W, b) in enumerate(wl["weights"]):
        out_f, in_f = W.shape
        lin = nn.Linear(in_f, out_f, bias=True, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W).to(dtype))
            lin.bias.copy_(torch.from_numpy(b).to(dtype))
        mods += [Scale(in_f**-0.5), lin]
        if li < L - 1:
            mods.append(activation_module(wl["activation"]))
    return nn.Sequential(*mods)


def run(args) -> dict:
    wl = read_workload(args.workload)
    if wl["cnn"]:
        return {"status": "unsupported", "message": "cnn workloads are not run for peers"}
    if wl["residual_layernorm"]:
        return {
            "status": "unsupported",
            "message": "residual_layernorm workloads are not run for peers",
        }

    import numpy as np
    import torch
    from nngeometry import GramMatrix
    from nngeometry.object import FMatDense
    from torch.utils.data import DataLoader, TensorDataset

    dtype = {"float32": torch.float32, "float64": torch.float64}.get(wl["dtype"])
    if dtype is None:
        raise ValueError(f"unsupported dtype {wl['dtype']!r}")
    model = build_model(wl, dtype)
    model.eval()
    x = torch.from_numpy(wl["x"]).to(dtype)
    n = x.shape[0]
    k = wl["weights"][-1][0].shape[0]
    bs = n if args.batch_size is None else min(args.batch_size, n)
    loader = DataLoader(TensorDataset(x), batch_size=bs, shuffle=False)

    def gram():
        # A fresh backend per call (hooks are added and removed inside get_gram_matrix).
        return GramMatrix(model, loader, representation=FMatDense).to_torch()

    t0 = time.perf_counter()
    G = gram()
    warmup_s = time.perf_counter() - t0

    times = []
    for _ in range(args.repeats):
        del G
        t0 = time.perf_counter()
        G = gram()
        times.append(time.perf_counter() - t0)

    if tuple(G.shape) != (k, n, k, n):
        raise RuntimeError(f"unexpected Gram shape {tuple(G.shape)}, wanted {(k, n, k, n)}")
    if args.save_kernel:
        K = G.detach().permute(1, 0, 3, 2).reshape(n * k, n * k).to(torch.float64).numpy()
        np.save(args.save_kernel, K)

    return {
        "peer": f"nngeometry {nngeometry_version()} GramMatrix/FMatDense "
        f"(torch {torch.__version__}, hooks, batch {bs})",
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "warmup_s": warmup_s,
        "n": int(n),
        "k": int(k),
        "dtype": wl["dtype"],
        "batch_size": int(bs),
        "torch_threads": torch.get_num_threads(),
        "status": "ok",
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload")
    p.add_argument("out_json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--save-kernel", default=None)
    p.add_argument("--batch-size", type=int, default=None, help="DataLoader batch size (default n)")
    args = p.parse_args()
    try:
        res = run(args)
    except BaseException as e:  # MemoryError / RuntimeError (alloc failure) included
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {
            "status": "error",
            "message": f"{type(e).__name__}: {e}"[:4000],
            "traceback": traceback.format_exc()[-4000:],
        }
    res.setdefault("peer", f"nngeometry {nngeometry_version()} GramMatrix/FMatDense")
    res["peak_rss_mb"] = peak_rss_mb()
    write_json(args.out_json, res)
    return 0 if res["status"] in ("ok", "unsupported") else 1


if __name__ == "__main__":
    sys.exit(main())
