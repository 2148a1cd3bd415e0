"""Peer adapter: empirical NTK of a workload with neural-tangents (STRUCTURED_DERIVATIVES).

Run with the OPTIONAL benchmark venv (see README.md in this folder), never plstar's own env:

    /work/bench-venv-nt/bin/python benchmarks/peers/nt_kernel.py WORKLOAD.npz OUT.json \
        [--repeats 5] [--save-kernel PATH.npy] [--weight-layout in_out|out_in]

Writes JSON with status "ok" (times_s, median_s, compile_s, peak_rss_mb, ...),
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

# Keep TensorFlow (pulled in by tf2jax, imported by neural_tangents) quiet and off any GPU.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from write_workload import read_workload


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def jax_activation(name: str):
    import jax
    import jax.numpy as jnp

    table = {
        "tanh": jnp.tanh,
        "relu": jax.nn.relu,
        # torch.nn.GELU() (plstar) is the exact erf form; jax defaults to the tanh approximation.
        "gelu": lambda h: jax.nn.gelu(h, approximate=False),
        "sigmoid": jax.nn.sigmoid,
        # torch Softplus(beta=1, threshold=20) is linear above 20; differs by < 3e-9 there.
        "softplus": jax.nn.softplus,
        "erf": jax.scipy.special.erf,
        "identity": lambda h: h,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}")
    return table[name]


def run(args) -> dict:
    wl = read_workload(args.workload)
    if wl["cnn"]:
        return {"status": "unsupported", "message": "cnn workloads are not run for peers"}
    if wl["residual_layernorm"]:
        return {
            "status": "unsupported",
            "message": "residual_layernorm workloads are not run for peers",
        }

    dtype_name = wl["dtype"]
    import jax

    if dtype_name == "float64":
        jax.config.update("jax_enable_x64", True)
    elif dtype_name != "float32":
        raise ValueError(f"unsupported dtype {dtype_name!r}")
    import jax.numpy as jnp
    import neural_tangents as nt
    import numpy as np

    dt = jnp.float64 if dtype_name == "float64" else jnp.float32
    act = jax_activation(wl["activation"])
    L = wl["depth"]
    fan_ins = [W.shape[1] for W, _ in wl["weights"]]
    scales = [float(1.0 / np.sqrt(f)) for f in fan_ins]  # python floats: weakly typed, keep dt

    # Weights are handed to NT stored (in, out) and used as ``h @ W``: the kernel is the
    # same (a transpose only permutes parameters), but an explicit ``W.T`` inside f stops
    # STRUCTURED_DERIVATIVES from exploiting the dense-layer structure (measured ~75x
    # slower and ~10x more memory at n=256, width 512). --weight-layout out_in keeps the
    # literal ``h @ W.T`` form for comparison.
    if args.weight_layout == "in_out":

        def f(params, x):
            h = x
            for li, (W, b) in enumerate(params):
                h = (h @ W) * scales[li] + b
                if li < L - 1:
                    h = act(h)
            return h

        params = [(jnp.asarray(W.T, dtype=dt), jnp.asarray(b, dtype=dt)) for W, b in wl["weights"]]
    else:

        def f(params, x):
            h = x
            for li, (W, b) in enumerate(params):
                h = (h @ W.T) * scales[li] + b
                if li < L - 1:
                    h = act(h)
            return h

        params = [(jnp.asarray(W, dtype=dt), jnp.asarray(b, dtype=dt)) for W, b in wl["weights"]]
    x = jnp.asarray(wl["x"], dtype=dt)
    n = x.shape[0]
    k = wl["weights"][-1][0].shape[0]

    ntk_fn = jax.jit(
        nt.empirical_ntk_fn(
            f,
            trace_axes=(),
            vmap_axes=0,
            implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES,
        )
    )

    t0 = time.perf_counter()
    K = ntk_fn(x, None, params)
    K.block_until_ready()
    compile_s = time.perf_counter() - t0

    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        K = ntk_fn(x, None, params)
        K.block_until_ready()
        times.append(time.perf_counter() - t0)

    if args.save_kernel:
        Kn = np.asarray(K, dtype=np.float64)
        if Kn.ndim == 2:  # NT may squeeze a size-1 output axis
            Kn = Kn.reshape(n, n, 1, 1)
        Kn = Kn.reshape(n, n, k, k).transpose(0, 2, 1, 3).reshape(n * k, n * k)
        np.save(args.save_kernel, Kn)

    return {
        "peer": f"neural-tangents {nt_version()} STRUCTURED_DERIVATIVES (jax {jax.__version__}, jit)"
        + ("" if args.weight_layout == "in_out" else " [h @ W.T form]"),
        "weight_layout": args.weight_layout,
        "times_s": times,
        "median_s": statistics.median(times) if times else None,
        "compile_s": compile_s,
        "n": int(n),
        "k": int(k),
        "dtype": dtype_name,
        "raw_shape": list(K.shape),
        "status": "ok",
    }


def nt_version() -> str:
    try:
        from importlib.metadata import version

        return version("neural-tangents")
    except Exception:  # pragma: no cover
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload")
    p.add_argument("out_json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--save-kernel", default=None)
    p.add_argument(
        "--weight-layout",
        choices=("in_out", "out_in"),
        default="in_out",
        help="in_out (default): params stored (in, out), f uses h @ W (fast structured path); "
        "out_in: params (out, in) as in the workload, f uses h @ W.T (slow path)",
    )
    args = p.parse_args()
    try:
        res = run(args)
    except BaseException as e:  # MemoryError / XLA RESOURCE_EXHAUSTED included
        if isinstance(e, KeyboardInterrupt):
            raise
        res = {
            "status": "error",
            "message": f"{type(e).__name__}: {e}"[:4000],
            "traceback": traceback.format_exc()[-4000:],
        }
    res.setdefault("peer", f"neural-tangents {nt_version()} STRUCTURED_DERIVATIVES")
    res["peak_rss_mb"] = peak_rss_mb()
    write_json(args.out_json, res)
    return 0 if res["status"] in ("ok", "unsupported") else 1


if __name__ == "__main__":
    sys.exit(main())
