"""Write and read the ``workload.npz`` files that the peer adapters consume.

Format (all arrays float64, whatever the compute dtype):
  x                  (n, d) inputs
  depth              int L
  W0..W{L-1}         (out, in) weights
  b0..b{L-1}         (out,) biases
  activation         str, one of tanh/relu/gelu/sigmoid/softplus/erf/identity
  dtype              str, "float32" or "float64" (dtype the peer computes in)
  residual_layernorm int 0/1 (peers report "unsupported" for 1)
  cnn                int 0/1 (peers report "unsupported" for 1)

Model (NTK parameterization): h = x; for li in 0..L-1: h = h @ W_l.T / sqrt(in_l) + b_l,
with activation(h) between layers (not after the last). Kernel: K = J J^T over all
W_l and b_l, full over outputs, sample-major (n*k, n*k) with row index i*k + a.

This file only needs numpy, so it can be imported both from the system python and
from the neural-tangents venv.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ACTIVATIONS = ("tanh", "relu", "gelu", "sigmoid", "softplus", "erf", "identity")
DTYPES = ("float32", "float64")


def write_workload(
    path,
    x: np.ndarray,
    weights: Sequence[tuple[np.ndarray, np.ndarray]],
    activation: str,
    dtype: str,
    residual_layernorm: bool = False,
    cnn: bool = False,
) -> None:
    """Save a workload to ``path`` (an .npz file).

    ``weights`` is a list of (W, b) with W of shape (out, in) and b of shape (out,);
    consecutive layers must chain (W_{l+1}.shape[1] == W_l.shape[0]) unless ``cnn``.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    x = np.asarray(x, dtype=np.float64)
    if not cnn:
        if x.ndim != 2:
            raise ValueError(f"x must be (n, d), got shape {x.shape}")
        fan_in = x.shape[1]
        for li, (W, b) in enumerate(weights):
            W = np.asarray(W)
            b = np.asarray(b)
            if W.ndim != 2 or W.shape[1] != fan_in or b.shape != (W.shape[0],):
                raise ValueError(
                    f"layer {li}: W {W.shape} / b {b.shape} do not chain from fan-in {fan_in}"
                )
            fan_in = W.shape[0]
    arrays: dict[str, np.ndarray] = {
        "x": x,
        "depth": np.asarray(len(weights), dtype=np.int64),
        "activation": np.asarray(activation),
        "dtype": np.asarray(dtype),
        "residual_layernorm": np.asarray(int(bool(residual_layernorm)), dtype=np.int64),
        "cnn": np.asarray(int(bool(cnn)), dtype=np.int64),
    }
    for li, (W, b) in enumerate(weights):
        arrays[f"W{li}"] = np.asarray(W, dtype=np.float64)
        arrays[f"b{li}"] = np.asarray(b, dtype=np.float64)
    with open(path, "wb") as fh:  # np.savez would append .npz to a str path lacking it
        np.savez(fh, **arrays)


def read_workload(path) -> dict:
    """Load a workload into a plain dict (python scalars/str for the metadata fields)."""
    with np.load(path, allow_pickle=False) as z:
        depth = int(z["depth"])
        out = {
            "x": np.asarray(z["x"], dtype=np.float64),
            "depth": depth,
            "activation": str(z["activation"]),
            "dtype": str(z["dtype"]),
            "residual_layernorm": int(z["residual_layernorm"]) if "residual_layernorm" in z else 0,
            "cnn": int(z["cnn"]) if "cnn" in z else 0,
            "weights": [
                (
                    np.asarray(z[f"W{li}"], dtype=np.float64),
                    np.asarray(z[f"b{li}"], dtype=np.float64),
                )
                for li in range(depth)
            ],
        }
    return out


def random_mlp_workload(
    path,
    n: int,
    d: int,
    width: int,
    depth: int,
    k: int,
    activation: str = "tanh",
    dtype: str = "float64",
    seed: int = 0,
) -> None:
    """Convenience: Gaussian inputs, N(0,1) weights and small Gaussian biases."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    dims = [d] + [width] * (depth - 1) + [k]
    weights = [
        (rng.standard_normal((dims[li + 1], dims[li])), 0.1 * rng.standard_normal(dims[li + 1]))
        for li in range(depth)
    ]
    write_workload(path, x, weights, activation, dtype)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="write a random MLP workload")
    p.add_argument("path")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--activation", default="tanh")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    random_mlp_workload(a.path, a.n, a.d, a.width, a.depth, a.k, a.activation, a.dtype, a.seed)
