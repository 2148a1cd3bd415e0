"""Datasets: the embedded sklearn digits and user files (.npz, .csv, .pt).

Every loader returns a :class:`Dataset` whose targets are 2-D ``(n, k)`` and whose ``description``
says which input scaling was applied, because under NTK parameterization the scaling decides the
conditioning of the tangent kernel (THEORY.md, "Input scaling matters").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

from plstar import data_files
from plstar.devices import HOST
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
    x = scale_inputs(torch.as_tensor(images, dtype=torch.float64, device=HOST), scaling).to(dtype)
    labels_t = torch.as_tensor(labels, dtype=torch.int64, device=HOST)
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

    Shapes: x (n, d) or (n, ...) (1-D x becomes (n, 1)); y (n, k) (1-D y becomes (n, 1)); n ≥ 1,
    d ≥ 1, k ≥ 1. A .csv may start with a header row (detected by a non-numeric field); its target
    is the last column, or the column named ``target`` (requires the header). Integer x is kept as
    int64 token ids (then only scaling="none" is allowed); floating x is converted to ``dtype``, as
    is y; both are finite in ``dtype``. Nothing in a file is executed (see
    :mod:`plstar.data_files`). Raises DataError for a missing/unreadable/malformed file, missing
    arrays, values that are not real numbers (text, objects, booleans, complex; sparse, meta or
    quantized tensors), n == 0, no features or targets, mismatched lengths, NaN/Inf (also after
    conversion to ``dtype`` or scaling), or non-numeric csv cells; PlstarInputError for a bad
    scaling or dtype.
    """
    _check_scaling(scaling)
    _check_dtype(dtype)
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}; check the path.")
    readers = {
        ".npz": data_files.read_npz,
        ".pt": data_files.read_pt,
        ".csv": lambda p: data_files.read_csv(p, target),
    }
    suffix = path.suffix.lower()
    if suffix not in readers:
        raise DataError(
            f"unsupported data file extension {path.suffix!r} ({path.name}); use one of "
            f"{', '.join(readers)}."
        )
    if target is not None and suffix != ".csv":
        raise PlstarInputError(
            f"target {target!r} only applies to .csv files; {suffix} files store y separately."
        )
    x, y = readers[suffix](path)
    name = path.name
    if x.ndim == 0 or y.ndim == 0 or y.ndim > 2:
        raise DataError(
            f"{name}: x must be (n, d) and y (n,) or (n, k); got x {tuple(x.shape)}, "
            f"y {tuple(y.shape)}."
        )
    x = x.reshape(-1, 1) if x.ndim == 1 else x
    y = y.reshape(-1, 1) if y.ndim == 1 else y
    if x.shape[0] == 0:
        raise DataError(f"{name} contains no samples (n = 0).")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{name}: x has {x.shape[0]} rows but y has {y.shape[0]}; they must pair one "
            "target row with each input row."
        )
    if x[0].numel() == 0 or y.shape[1] == 0:
        raise DataError(
            f"{name}: x {tuple(x.shape)} and y {tuple(y.shape)} must have at least one feature "
            "and one target per sample."
        )
    for role, tensor in (("x", x), ("y", y)):
        row = _first_bad_row(tensor)
        if row is not None:
            raise DataError(
                f"{name}: {role} contains NaN or Inf (first at sample {row}); remove or "
                "impute those values."
            )
    if x.is_floating_point():
        x = scale_inputs(x, scaling).to(dtype)
        kind = _describe_scaling(scaling, math.prod(x.shape[1:]))
    elif scaling != "none":
        raise PlstarInputError(
            f"{name}: x holds integers (token ids); scaling {scaling!r} would destroy them. "
            "Use scaling='none', or store x as floating point."
        )
    else:
        kind = "integer token ids (int64)"
    y = y.to(dtype)
    # Finite in float64 is not finite in float32 (1e39), nor after scaling (overflowing sums).
    for role, tensor in (("x", x), ("y", y)):
        row = _first_bad_row(tensor)
        if row is not None:
            raise DataError(
                f"{name}: {role} overflows in {dtype} or under {scaling!r} scaling (first at "
                f"sample {row}); rescale the values or use float64."
            )
    description = f"{name}, n={x.shape[0]}, x {tuple(x.shape[1:])}, {kind}; targets: k={y.shape[1]}"
    return Dataset(x=x, y=y, name=name, scaling=scaling, description=description)
