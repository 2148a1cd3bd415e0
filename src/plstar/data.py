"""Datasets: the embedded sklearn digits and user files (.npz, .csv, .pt).

Every loader returns a :class:`Dataset` whose targets are 2-D ``(n, k)`` and whose ``description``
says which input scaling was applied, because under NTK parameterization the scaling decides the
conditioning of the tangent kernel (THEORY.md, "Input scaling matters").
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from plstar.errors import DataError, PlstarInputError

Scaling = Literal["sphere", "standardize", "none"]
SCALINGS: tuple[str, ...] = get_args(Scaling)

DIGITS_SIZE = 1797


@dataclass(frozen=True)
class Dataset:
    """Inputs and targets of one regression problem.

    Shapes: ``x`` is ``(n, d)`` floating (or ``(n, ...)``), or an integer tensor of token ids;
    ``y`` is ``(n, k)`` floating, always 2-D.
    """

    x: Tensor
    y: Tensor
    name: str
    scaling: str
    description: str

    def __post_init__(self) -> None:
        # Other modules build Datasets too; the k = y.shape[1] convention must hold for all of them.
        if self.y.ndim != 2:
            raise DataError(
                f"Dataset targets must be 2-D (n, k), got shape {tuple(self.y.shape)}; "
                "reshape 1-D targets with y.reshape(-1, 1)."
            )
        if self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise DataError(
                f"Dataset inputs {tuple(self.x.shape)} and targets {tuple(self.y.shape)} must have "
                "the same number of rows (one per sample)."
            )

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])

    @property
    def k(self) -> int:
        """Number of outputs per sample."""
        return int(self.y.shape[1])

    @property
    def d(self) -> int:
        """Features per sample: ``x.shape[1]`` for 2-D inputs, the product of ``x.shape[1:]``
        otherwise."""
        return math.prod(self.x.shape[1:])


def _check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise PlstarInputError(
            f"unknown input scaling {scaling!r}; choose one of {', '.join(SCALINGS)}."
        )


def _describe_scaling(scaling: str, d: int) -> str:
    return {
        "sphere": f"centred, rows scaled to norm sqrt({d})",
        "standardize": "features standardized (zero mean, unit variance)",
        "none": "inputs unscaled",
    }[scaling]


def scale_inputs(x: Tensor, scaling: Scaling) -> Tensor:
    """Return ``x`` scaled for NTK-parameterized models, with the shape and dtype of ``x``.

    Shapes: ``x`` (n, d); higher-rank ``(n, ...)`` inputs are treated as ``(n, prod(...))``.
    "sphere": subtract each feature's mean over the samples, then scale every row to Euclidean norm
    sqrt(d), so that the first NTK pre-activation Wx/sqrt(d) has unit variance.
    "standardize": per-feature z-score; features with zero spread are only centred.
    "none": ``x`` unchanged.
    Raises PlstarInputError for an unknown scaling or integer (token) inputs with a scaling other
    than "none"; DataError when a row is zero after centring ("sphere").
    """
    _check_scaling(scaling)
    if scaling == "none":
        return x
    if not x.is_floating_point():
        raise PlstarInputError(
            f"cannot apply {scaling!r} scaling to integer inputs ({x.dtype}, e.g. token ids); "
            "use scaling='none' for them, or convert x to floating point first."
        )
    if x.ndim < 2 or x.shape[0] == 0:
        raise DataError(f"scaling needs inputs of shape (n, d) with n >= 1, got {tuple(x.shape)}.")
    # float64 keeps the centring accurate even for float32 inputs with a large common offset.
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    d = flat.shape[1]
    centred = flat - flat.mean(dim=0, keepdim=True)
    # Differences below this are rounding noise of the input dtype, not signal.
    noise = 16 * torch.finfo(x.dtype).eps * flat.abs().amax(dim=0)
    if scaling == "standardize":
        std = centred.std(dim=0, unbiased=False)
        std = torch.where(std > noise, std, torch.ones_like(std))
        out = centred / std
    else:
        norms = centred.norm(dim=1, keepdim=True)
        floor = float(noise.norm()) + torch.finfo(torch.float64).tiny
        zero_rows = (norms.squeeze(1) <= floor).nonzero().flatten().tolist()
        if zero_rows:
            raise DataError(
                f"'sphere' scaling: row(s) {zero_rows[:10]} equal the feature mean, so they are "
                "zero after centring and cannot be scaled to norm sqrt(d); remove those rows or "
                "use scaling='standardize'."
            )
        out = centred * (math.sqrt(d) / norms)
    return out.reshape(x.shape).to(x.dtype)


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise PlstarInputError(f"dtype must be a floating type such as torch.float64, got {dtype}.")


def load_digits(
    n: int | None = None,
    *,
    outputs: int = 1,
    seed: int = 0,
    scaling: Scaling = "sphere",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """The sklearn digits (8x8 images, shipped with scikit-learn; no download), as a regression.

    Shapes: x (n, 64); y (n, 1) for ``outputs=1`` (+1 for even digits, -1 for odd) or (n, 10) for
    ``outputs=10`` (centred one-hot, onehot(label) - 0.1).
    ``n=None`` takes all 1797 samples in their stored order; otherwise the first ``n`` of a
    permutation drawn from ``numpy.random.default_rng(seed)``. Scaling uses the subset's own mean.
    Raises PlstarInputError for n outside 1..1797, outputs other than 1 or 10, or a bad scaling.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_scaling(scaling)
    _check_dtype(dtype)
    if outputs not in (1, 10):
        raise PlstarInputError(
            f"digits outputs must be 1 (±1 parity) or 10 (centred one-hot), got {outputs!r}."
        )
    if n is not None and (
        isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= DIGITS_SIZE
    ):
        raise PlstarInputError(f"digits n must be an integer in 1..{DIGITS_SIZE}, got {n!r}.")
    images, labels = sklearn_digits(return_X_y=True)
    if n is not None:
        chosen = np.random.default_rng(seed).permutation(DIGITS_SIZE)[:n]
        images, labels = images[chosen], labels[chosen]
    x = scale_inputs(torch.as_tensor(images, dtype=torch.float64), scaling).to(dtype)
    labels_t = torch.as_tensor(labels, dtype=torch.int64)
    if outputs == 1:
        y = torch.where(labels_t % 2 == 0, 1.0, -1.0).to(dtype).unsqueeze(1)
        targets = "±1 parity (k=1)"
    else:
        y = torch.nn.functional.one_hot(labels_t, 10).to(dtype) - 0.1
        targets = "centred one-hot, onehot - 0.1 (k=10)"
    size = len(labels)
    subset = f"n={size} of {DIGITS_SIZE}" + ("" if n is None else f" (seed {seed})")
    description = f"sklearn digits, {subset}, {_describe_scaling(scaling, 64)}; targets: {targets}"
    return Dataset(x=x, y=y, name="digits", scaling=scaling, description=description)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: a data file must never execute code on load.
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"cannot read {path.name} as .npz: {exc}. Expected an archive written by "
            "numpy.savez(path, x=inputs, y=targets)."
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path.name} holds a single array, not an archive; save with "
            "numpy.savez(path, x=inputs, y=targets)."
        )
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataError(
                f"{path.name}: missing array(s) {missing}; found {archive.files}. Save with "
                "numpy.savez(path, x=inputs, y=targets)."
            )
        try:
            return archive["x"], archive["y"]
        except Exception as exc:
            raise DataError(f"cannot read arrays x, y from {path.name}: {exc}") from exc


def _read_pt(path: Path) -> tuple[Tensor, Tensor]:
    try:
        # weights_only=True: refuses pickled code, accepts plain dicts of tensors.
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"cannot read {path.name} as a .pt dict of tensors: {exc}. Save with "
            "torch.save({'x': inputs, 'y': targets}, path)."
        ) from exc
    if not isinstance(content, dict):
        raise DataError(
            f"{path.name} holds a {type(content).__name__}, expected a dict with tensors 'x' and "
            "'y'; save with torch.save({'x': inputs, 'y': targets}, path)."
        )
    missing = [key for key in ("x", "y") if not isinstance(content.get(key), Tensor)]
    if missing:
        raise DataError(
            f"{path.name}: entries {missing} are missing or not tensors; found keys "
            f"{sorted(map(str, content))}. Save with "
            "torch.save({'x': inputs, 'y': targets}, path)."
        )
    return content["x"], content["y"]


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports often start with.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [(line, row) for line, row in enumerate(csv.reader(handle), start=1) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path.name} as .csv: {exc}") from exc
    if not rows:
        raise DataError(f"{path.name} is empty; expected comma-separated rows of numbers.")
    first = [cell.strip() for cell in rows[0][1]]
    # An empty first-row cell is a missing number, not a column name.
    header = first if any(cell and not _is_number(cell) for cell in first) else None
    body = rows[1:] if header is not None else rows
    width = len(first)
    if width < 2:
        raise DataError(
            f"{path.name} has {width} column; need at least one input column and one target column."
        )
    if target is None:
        target_col = width - 1
    elif header is None:
        raise DataError(
            f"target={target!r} names a column, but {path.name} has no header row; add a header "
            "line of column names or omit target to use the last column."
        )
    elif target not in header:
        raise DataError(f"{path.name} has no column {target!r}; available columns: {header}.")
    else:
        target_col = header.index(target)
    values = np.empty((len(body), width), dtype=np.float64)
    for i, (line, row) in enumerate(body):
        if len(row) != width:
            raise DataError(f"{path.name}, row {line}: {len(row)} fields, expected {width}.")
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                column = f"column {j + 1}" + (f" ({header[j]!r})" if header else "")
                raise DataError(
                    f"{path.name}, row {line}, {column}: {cell!r} is not a number; every cell "
                    "below the header must be numeric."
                ) from None
    inputs = np.delete(values, target_col, axis=1)
    return inputs, values[:, target_col]


def _as_tensor(array: np.ndarray | Tensor, role: str, name: str) -> Tensor:
    try:
        tensor = torch.as_tensor(array).detach()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"{name}: {role} is not a numeric array: {exc}") from exc
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise DataError(f"{name}: {role} has dtype {tensor.dtype}; expected real numbers.")
    return tensor


def _first_bad_row(t: Tensor) -> int | None:
    if not t.is_floating_point():
        return None
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0]) if bad.any() else None


def load_file(
    path: str | Path,
    *,
    target: str | None = None,
    scaling: Scaling = "none",
    dtype: torch.dtype = torch.float32,
) -> Dataset:
    """Load inputs and targets from .npz (arrays "x", "y"), .csv, or .pt (dict of tensors).

    Shapes: x (n, d) (1-D x becomes (n, 1)); y (n, k) (1-D y becomes (n, 1)).
    A .csv may start with a header row (detected by a non-numeric field); its target is the last
    column, or the column named ``target`` (requires the header). Integer x is kept as token ids
    (then only scaling="none" is allowed); floating x is converted to ``dtype``, as is y.
    Raises DataError for a missing/unreadable/malformed file, missing arrays, n == 0, mismatched
    lengths, NaN/Inf, or non-numeric csv cells; PlstarInputError for a bad scaling or dtype.
    """
    _check_scaling(scaling)
    _check_dtype(dtype)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path.")
    readers = {
        ".npz": _read_npz,
        ".pt": _read_pt,
        ".csv": lambda p: _read_csv(p, target),
    }
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(
            f"unsupported data file extension {path.suffix!r} ({path.name}); use one of "
            f"{', '.join(readers)}."
        )
    if target is not None and suffix != ".csv":
        raise PlstarInputError(
            f"target={target!r} only applies to .csv files; {suffix} files store y separately."
        )
    raw_x, raw_y = readers[suffix](path)
    x, y = _as_tensor(raw_x, "x", path.name), _as_tensor(raw_y, "y", path.name)
    if x.ndim == 0 or y.ndim == 0 or y.ndim > 2:
        raise DataError(
            f"{path.name}: x must be (n, d) and y (n,) or (n, k); got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}."
        )
    x = x.reshape(-1, 1) if x.ndim == 1 else x
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if x.shape[0] == 0:
        raise DataError(f"{path.name} contains no samples (n = 0).")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{path.name}: x has {x.shape[0]} rows but y has {y.shape[0]}; they must pair one "
            "target row with each input row."
        )
    for role, tensor in (("x", x), ("y", y)):
        row = _first_bad_row(tensor)
        if row is not None:
            raise DataError(
                f"{path.name}: {role} contains NaN or Inf (first at sample {row}); remove or "
                "impute those values."
            )
    if x.is_floating_point():
        x = scale_inputs(x.to(torch.float64), scaling).to(dtype)
        kind = _describe_scaling(scaling, math.prod(x.shape[1:]))
    elif scaling != "none":
        raise PlstarInputError(
            f"{path.name}: x holds integers (token ids, {x.dtype}); scaling {scaling!r} would "
            "destroy them. Use scaling='none', or store x as floating point."
        )
    else:
        kind = f"integer token ids ({x.dtype})"
    y = y.to(dtype)
    description = (
        f"{path.name}, n={x.shape[0]}, x {tuple(x.shape[1:])}, {kind}; targets: k={y.shape[1]}"
    )
    return Dataset(x=x, y=y, name=path.name, scaling=scaling, description=description)
