"""Human- and machine-readable renderings of results: rich tables and JSON files.

Nothing here computes: it formats what the core returned, writes files atomically, and checks
output paths before a command starts its work.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from rich.table import Table

from plstar.conditions import Analysis
from plstar.curvature import EigenEstimate
from plstar.errors import PlstarInputError


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, 'inf' and '—' spelled out."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}g}"


def with_error(value: float | None, error: float | None) -> str:
    """'value ± error' (the error with 2 significant digits)."""
    if value is None:
        return "—"
    return fmt(value) if error is None else f"{fmt(value)} ± {error:.2g}"


def estimate(found: EigenEstimate | None, failed: str | None) -> str:
    """An eigenvalue estimate for a table: 'value ± error', marked when it stopped before its
    tolerance, 'failed' when its stage raised."""
    if found is None:
        return "failed" if failed is not None else "—"
    text = with_error(found.value, found.error_bound)
    return text if found.converged else f"{text} (not converged)"


def analysis_table(a: Analysis, *, title: str = "plstar analyze") -> Table:
    """The summary table of ``plstar analyze``: problem, kernel, landscape, GD theorem."""
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("meaning", style="dim")
    nk = a.n * a.k
    regime = "over-parameterized" if a.overparameterized else "UNDER-parameterized"
    kernel = a.kernel
    hess = a.hessian_norm
    if hess is None:
        hess_scope = "max_j ‖H_{F_j}‖₂; see the verdict"
    elif hess.outputs_examined == hess.outputs_total:
        hess_scope = "max over all outputs"
    else:
        hess_scope = f"max over {hess.outputs_examined} random outputs of {hess.outputs_total}"
    if hess is not None and not hess.converged:
        hess_scope += f"; a lower estimate, stopped after {hess.products} products"
    lambda_min = (
        f"0 (≤ floor {kernel.precision_floor:.2g})"
        if kernel.is_singular
        else with_error(kernel.lambda_min, kernel.lambda_min_error)
    )
    rows: list[tuple[str, str, str]] = [
        ("n, k", f"{a.n}, {a.k}", "samples, outputs per sample"),
        ("m", f"{a.m:,}", f"trainable parameters; m/(n·k) = {a.m / nk:.3g}: {regime}"),
        ("L(w₀)", fmt(a.loss0), "½‖F(w₀) − y‖², summed"),
        ("λ_min(K)", lambda_min, f"tangent kernel K = DF DFᵀ ({nk}×{nk}, {a.implementation})"),
        ("λ_max(K)", with_error(kernel.lambda_max, kernel.lambda_max_error), kernel.method),
        ("κ(K)", fmt(kernel.condition_number), "λ_max/λ_min of K"),
        ("ρ(w₀)", fmt(a.pl_ratio), "PL ratio ‖∇L‖²/(2L); λ_min ≤ ρ ≤ λ_max"),
        ("β", estimate(a.beta, a.failed.get("sharpness")), "λ_max of the loss Hessian at w₀"),
        ("‖H_F‖", estimate(hess, a.failed.get("model hessian")), hess_scope),
        ("μ", fmt(a.mu), "PL* constant at w₀ = λ_min(K(w₀))"),
        ("κ = β/μ", fmt(a.kappa), "condition number of the landscape"),
        ("R", fmt(a.radius), "GD theorem radius 2√(2βL₀)/μ"),
        ("η", fmt(a.gd_step), "certified GD step 1/β"),
        ("rate", fmt(a.gd_rate, 8), "L_t ≤ rate^t · L₀, rate = 1 − μ/β"),
        ("steps", fmt(a.steps_to_target), f"GD steps to L ≤ {fmt(a.target_loss, 3)}"),
    ]
    for row in rows:
        table.add_row(*row)
    return table


def write_bytes(path: str | Path, content: bytes) -> Path:
    """Write bytes atomically (temp file + rename), so a crash never leaves half a file; the file
    gets the permissions of any file the user creates (mkstemp alone makes it 0600). Whatever
    stops the write, Ctrl-C included, the temporary file is removed and the old file kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write JSON atomically (:func:`write_bytes`)."""
    text = json.dumps(payload, indent=2, sort_keys=False) + "\n"
    return write_bytes(path, text.encode("utf-8"))


def _probe(folder: Path, option: str, path: Path) -> None:
    """Create and delete a file in ``folder``: the one honest test that a write will succeed
    (permission bits say nothing for root, read-only mounts, ACLs or quotas)."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".plstar-probe-")
    except OSError as error:
        raise PlstarInputError(
            f"{option} {path}: cannot create files in {folder} ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output file that could not be written: a folder, a path in a
    missing folder, a folder without write access. PlstarInputError names ``option``."""
    path = Path(path)
    if path.is_dir():
        raise PlstarInputError(
            f"{option} {path} is a folder; give a file name, e.g. {path / 'analysis.json'}"
        )
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise PlstarInputError(f"{option} {path}: {folder} {what}; create the folder first")
    _probe(folder, option, path)
    return path


def check_output_folder(path: str | Path, option: str, files: tuple[str, ...] = ()) -> Path:
    """Refuse, before any work, an output folder that could not be filled: an existing file, a
    path through a file, no write access, or one of ``files`` (the names the command writes)
    existing there as a folder. A missing folder is fine (it is created when results come)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlstarInputError(f"{option} {path} is a file, not a folder; choose a folder name")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise PlstarInputError(f"{option} {path}: {existing} is a file, not a folder")
    _probe(existing, option, path)
    for name in files:
        if (path / name).is_dir():
            raise PlstarInputError(
                f"{option} {path}: {path / name} is a folder, where a result file goes; "
                f"choose another {option} or move it"
            )
    return path
