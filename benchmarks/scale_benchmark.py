"""Memory and scale: the CLI's large workloads and a 20,000 × 20,000 λ_min, timed and measured.

    python benchmarks/scale_benchmark.py

Each measurement runs in its own process under /usr/bin/time -v (peak resident set size).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

from report_sections import write_section

KERNEL_ONLY = """
import sys, time, torch, plstar
from plstar.data import load_digits
from plstar.models import mlp
from plstar.functional import make_functional
from plstar import structured
n, width, k = (int(a) for a in sys.argv[1:4])
data = load_digits(n, outputs=k, dtype=torch.float64)
model = mlp(64, width, 3, k, generator_seed=0, dtype=torch.float64)
fm = make_functional(model, data.x)
features = structured.probe(fm, data.x).bytes(torch.float64, k)[0] * n
start = time.perf_counter()
K = plstar.tangent_kernel(model, data.x)
print(f"RESULT kernel_s={time.perf_counter() - start:.1f} kernel_gb={K.numel() * 8 / 1e9:.2f} features_gb={features / 1e9:.2f}")
"""

LAMBDA_MIN = """
import time, torch, plstar
from plstar.models import mlp
g = torch.Generator().manual_seed(0)
x = torch.randn(2000, 64, generator=g, dtype=torch.float64)
x = x - x.mean(0)
x = x / x.norm(dim=1, keepdim=True) * 8
model = mlp(64, 512, 3, 10, generator_seed=0, dtype=torch.float64)
start = time.perf_counter()
K = plstar.tangent_kernel(model, x)
kernel_s = time.perf_counter() - start
start = time.perf_counter()
s = plstar.spectrum(K)
print(f"RESULT size={K.shape[0]} kernel_s={kernel_s:.1f} spectrum_s={time.perf_counter() - start:.1f} "
      f"lambda_min={s.lambda_min:.6e} error={s.lambda_min_error:.1e} lambda_max={s.lambda_max:.6e} method={s.method}")
"""


def timed(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, the RESULT line or the output tail)."""
    start = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    summary = (
        result[-1][7:] if result else ("exit " + str(done.returncode) + ": " + done.stdout[-200:])
    )
    return wall, (int(peak.group(1)) / 2**20 if peak else float("nan")), summary


def main() -> None:
    rows = []
    for args in (
        ["--samples", "1797", "--width", "1024"],
        ["--samples", "1797", "--width", "4096", "--outputs", "10"],
    ):
        wall, peak, _ = timed([sys.executable, "-m", "plstar", "analyze", *args])
        rows.append((f"`plstar analyze {' '.join(args)}`", wall, peak, "whole analysis"))
    wall, peak, summary = timed([sys.executable, "-c", KERNEL_ONLY, "1797", "4096", "10"])
    rows.append(("`tangent_kernel`, n = 1797, width 4096, k = 10 (float64)", wall, peak, summary))
    wall, peak, summary = timed([sys.executable, "-c", LAMBDA_MIN])
    rows.append(("λ_min and λ_max of a 20,000 × 20,000 kernel", wall, peak, summary))
    lines = [
        "## Memory and scale",
        "",
        "`python benchmarks/scale_benchmark.py` (each row its own process; peak = maximum resident set).",
        "",
        "| what | wall time | peak RSS | details |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {what} | {wall:.0f} s | {peak:.2f} GiB | {details} |"
        for what, wall, peak, details in rows
    ]
    text = "\n".join(lines)
    print(text)
    write_section("scale", text)


if __name__ == "__main__":
    main()
