"""Check the peer adapters against an independent dense torch.func reference.

    python3 benchmarks/peers/check_peers.py [--nt-python /work/bench-venv-nt/bin/python] [--quick]

For each case it writes a workload (write_workload.py), runs nt_kernel.py (in the NT venv)
and nngeometry_kernel.py (in this python) as subprocesses with --save-kernel, and compares
each saved (n*k, n*k) kernel with K_ref = J J^T, J = jacrev over all parameters
(sample-major rows i*k + a). Prints, per case and peer,
  max_rel = max|K - K_ref| / max|K_ref|      and     fro_rel = ||K - K_ref||_F / ||K_ref||_F.
float64 cases must be below 1e-10; float32 cases below 1e-4. Exit status 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from write_workload import read_workload, write_workload  # noqa: E402

DEFAULT_NT_PYTHON = os.environ.get("NT_PYTHON", "/work/bench-venv-nt/bin/python")


def reference_kernel(path: str) -> np.ndarray:
    """Dense empirical NTK in float64 with torch.func.jacrev (independent of both peers)."""
    import torch
    from torch.func import jacrev

    wl = read_workload(path)
    acts = {
        "tanh": torch.tanh,
        "relu": torch.relu,
        "gelu": torch.nn.functional.gelu,
        "sigmoid": torch.sigmoid,
        "softplus": torch.nn.functional.softplus,
        "erf": torch.erf,
        "identity": lambda h: h,
    }
    act = acts[wl["activation"]]
    L = wl["depth"]
    params = []
    for W, b in wl["weights"]:
        params += [torch.from_numpy(W), torch.from_numpy(b)]
    x = torch.from_numpy(wl["x"])

    def f(ps, x):
        h = x
        for li in range(L):
            W, b = ps[2 * li], ps[2 * li + 1]
            h = h @ W.T / W.shape[1] ** 0.5 + b
            if li < L - 1:
                h = act(h)
        return h  # (n, k)

    n = x.shape[0]
    k = wl["weights"][-1][0].shape[0]
    jac = jacrev(f)(params, x)  # list of (n, k, *p.shape)
    J = torch.cat([j.reshape(n * k, -1) for j in jac], dim=1)
    return (J @ J.T).numpy()


def run_adapter(
    python: str,
    script: str,
    workload: str,
    out_json: str,
    kernel: str,
    timeout: float,
    extra: tuple[str, ...] = (),
):
    cmd = [
        python,
        os.path.join(HERE, script),
        workload,
        out_json,
        "--repeats",
        "1",
        "--save-kernel",
        kernel,
    ]
    cmd += list(extra)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "message": f"timeout after {timeout}s"}
    if not os.path.exists(out_json):
        return {
            "status": "error",
            "message": f"no JSON (rc={proc.returncode}): {proc.stderr[-2000:]}",
        }
    with open(out_json) as fh:
        return json.load(fh)


CASES = [
    # name, n, d, width, depth, k, activation, dtype
    ("tanh k=1 f64", 64, 64, 128, 3, 1, "tanh", "float64"),
    ("tanh k=3 f64", 64, 64, 128, 3, 3, "tanh", "float64"),
    ("gelu k=3 f64", 64, 64, 128, 3, 3, "gelu", "float64"),
    ("erf k=2 f64 depth4", 32, 16, 64, 4, 2, "erf", "float64"),
    ("relu k=2 f64", 32, 16, 64, 3, 2, "relu", "float64"),
    ("tanh k=3 f32", 64, 64, 128, 3, 3, "tanh", "float32"),
]
QUICK = CASES[:2]


def main() -> int:
    p = argparse.ArgumentParser(description="check peer adapters against a torch.func reference")
    p.add_argument("--nt-python", default=DEFAULT_NT_PYTHON)
    p.add_argument("--quick", action="store_true", help="only the two required tanh float64 cases")
    p.add_argument("--timeout", type=float, default=600.0)
    args = p.parse_args()

    peers = [
        ("neural-tangents", args.nt_python, "nt_kernel.py", ()),
        ("nngeometry", sys.executable, "nngeometry_kernel.py", ()),
    ]
    # the literal h @ W.T form of the NT adapter, checked on the first case only
    nt_out_in = ("nt[W.T form]", args.nt_python, "nt_kernel.py", ("--weight-layout", "out_in"))
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        for case_id, (name, n, d, width, depth, k, activation, dtype) in enumerate(
            QUICK if args.quick else CASES
        ):
            rng = np.random.default_rng(1000 + case_id)
            x = rng.standard_normal((n, d))
            dims = [d] + [width] * (depth - 1) + [k]
            weights = [
                (
                    rng.standard_normal((dims[li + 1], dims[li])),
                    0.1 * rng.standard_normal(dims[li + 1]),
                )
                for li in range(depth)
            ]
            wpath = os.path.join(tmp, "workload.npz")
            write_workload(wpath, x, weights, activation, dtype)
            K_ref = reference_kernel(wpath)
            tol = 1e-10 if dtype == "float64" else 1e-4
            for peer, python, script, extra in peers + ([nt_out_in] if case_id == 0 else []):
                kpath = os.path.join(tmp, f"{script}.npy")
                if os.path.exists(kpath):
                    os.remove(kpath)
                res = run_adapter(
                    python,
                    script,
                    wpath,
                    os.path.join(tmp, f"{script}.json"),
                    kpath,
                    args.timeout,
                    extra,
                )
                if res.get("status") != "ok":
                    print(
                        f"{name:22s} {peer:16s} FAIL status={res.get('status')}: {res.get('message')}"
                    )
                    failures += 1
                    continue
                K = np.load(kpath)
                if K.shape != K_ref.shape:
                    print(f"{name:22s} {peer:16s} FAIL shape {K.shape} != {K_ref.shape}")
                    failures += 1
                    continue
                max_rel = float(np.max(np.abs(K - K_ref)) / np.max(np.abs(K_ref)))
                fro_rel = float(np.linalg.norm(K - K_ref) / np.linalg.norm(K_ref))
                ok = max_rel < tol
                failures += not ok
                print(
                    f"{name:22s} {peer:16s} {'ok  ' if ok else 'FAIL'} max_rel={max_rel:.3e} "
                    f"fro_rel={fro_rel:.3e} (tol {tol:.0e}, shape {K.shape})",
                    flush=True,
                )
    print("all peer checks passed" if failures == 0 else f"{failures} peer check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
