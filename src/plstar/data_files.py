"""Readers of user data files (.npz, .csv, .pt) for :func:`plstar.data.load_file`.

Each reader returns the raw inputs and targets as dense CPU tensors of real numbers: float64, or
int64 for integer inputs (token ids). Anything else is refused with a one-line
:class:`~plstar.errors.DataError`: no reader executes code from a file (numpy's
``allow_pickle=False``, torch's ``weights_only=True``), and none passes on a loader's own multi-line
message (torch's suggests ``weights_only=False``, which would run the file's pickled code).
"""

from __future__ import annotations

import csv
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from plstar.errors import DataError

SAVE_NPZ = "numpy.savez(path, x=inputs, y=targets)"
SAVE_PT = "torch.save({'x': inputs, 'y': targets}, path)"
_INT64_MAX = 2**63 - 1


def _reason(error: BaseException) -> str:
    """The first sentence of a loader's message, on one line, never advising to unpickle."""
    text = " ".join(str(error).split())
    first = text.split(". ")[0][:160]
    if not first or "weights_only" in first:
        return type(error).__name__
    return f"{type(error).__name__}: {first}"


def read_npz(path: Path) -> tuple[Tensor, Tensor]:
    """Arrays "x" and "y" of an archive written by numpy.savez."""
    try:
        # allow_pickle=False: a data file must never execute code on load.
        archive = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(
            f"cannot read {path.name} as .npz ({_reason(exc)}); expected an archive written by "
            f"{SAVE_NPZ}."
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path.name} holds a single array, not an archive; save with {SAVE_NPZ}.")
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataError(
                f"{path.name}: missing array(s) {missing}; found {archive.files}. Save with "
                f"{SAVE_NPZ}."
            )
        arrays = []
        for key in ("x", "y"):
            try:
                arrays.append(archive[key])
            except ValueError as exc:
                if "allow_pickle" in str(exc):
                    raise DataError(
                        f"{path.name}: {key} is an array of Python objects, refused (loading it "
                        "could run code); store numbers."
                    ) from exc
                raise DataError(f"cannot read array {key} of {path.name} ({_reason(exc)})") from exc
            except Exception as exc:
                raise DataError(f"cannot read array {key} of {path.name} ({_reason(exc)})") from exc
    return numeric(arrays[0], "x", path.name), numeric(arrays[1], "y", path.name)


def read_pt(path: Path) -> tuple[Tensor, Tensor]:
    """Tensors "x" and "y" of a dict written by torch.save."""
    try:
        # Torch's notes on its own formats (deprecations, pickle protocols) are not the user's
        # concern here; what the file holds is checked below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # weights_only=True: refuses pickled code, accepts plain dicts of tensors.
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = (
            "holds objects other than tensors"
            if zipfile.is_zipfile(path)
            else "is not a file written by torch.save, or holds objects other than tensors"
        )
        raise DataError(
            f"{path.name} {what} (pickled code is refused); save with {SAVE_PT}."
        ) from exc
    except Exception as exc:
        raise DataError(
            f"cannot read {path.name} as a .pt dict of tensors ({_reason(exc)}); save with "
            f"{SAVE_PT}."
        ) from exc
    if not isinstance(content, dict):
        raise DataError(
            f"{path.name} holds a {type(content).__name__}, expected a dict with tensors 'x' and "
            f"'y'; save with {SAVE_PT}."
        )
    missing = [key for key in ("x", "y") if not isinstance(content.get(key), Tensor)]
    if missing:
        raise DataError(
            f"{path.name}: entries {missing} are missing or not tensors; found keys "
            f"{sorted(map(str, content))}. Save with {SAVE_PT}."
        )
    return numeric(content["x"], "x", path.name), numeric(content["y"], "y", path.name)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv(path: Path, target: str | None) -> tuple[Tensor, Tensor]:
    """Comma-separated numbers, an optional header row; the target is the last column or the
    column named ``target``."""
    try:
        # utf-8-sig drops the byte-order mark that spreadsheet exports often start with.
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [(line, row) for line, row in enumerate(csv.reader(handle), start=1) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {path.name} as .csv ({_reason(exc)})") from exc
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
            f"target {target!r} names a column, but {path.name} has no header row; add a header "
            "line of column names or omit the target to use the last column."
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
                    f"{path.name}, row {line}, {column}: {cell[:40]!r} is not a number; every "
                    "cell below the header must be numeric."
                ) from None
    inputs = np.delete(values, target_col, axis=1)
    return numeric(inputs, "x", path.name), numeric(values[:, target_col], "y", path.name)


_NUMPY_KINDS = {
    "b": "booleans", "c": "complex numbers", "U": "text", "S": "bytes", "O": "Python objects",
    "V": "structured records", "M": "dates", "m": "time spans",
}  # fmt: skip


def numeric(value: np.ndarray | Tensor, role: str, name: str) -> Tensor:
    """``value`` as a dense, contiguous CPU tensor of its own: float64, or int64 for integers.

    Refused (DataError): booleans, complex numbers, text, objects, records, dates; sparse, nested,
    meta (shape only) and quantized tensors; unsigned integers beyond int64.
    """
    if isinstance(value, Tensor):
        return _from_tensor(value, role, name)
    array = np.asarray(value)
    kind = _NUMPY_KINDS.get(array.dtype.kind)
    if kind is not None:
        raise DataError(f"{name}: {role} holds {kind} ({array.dtype}); expected real numbers.")
    if array.dtype.kind == "f":  # float16/32/64/longdouble, either byte order: float64 is exact
        return torch.from_numpy(np.array(array, dtype=np.float64, order="C"))
    if array.dtype.kind == "u" and array.size and int(array.max()) > _INT64_MAX:
        raise DataError(f"{name}: {role} holds integers beyond int64; expected int64 token ids.")
    return torch.from_numpy(np.array(array, dtype=np.int64, order="C"))


def _from_tensor(tensor: Tensor, role: str, name: str) -> Tensor:
    problem = None
    if tensor.is_nested:
        problem = "is a nested tensor (rows of different lengths); store one dense tensor"
    elif tensor.layout != torch.strided:
        problem = f"is a sparse tensor ({tensor.layout}); store it dense ({role}.to_dense())"
    elif tensor.device.type == "meta":
        problem = "is a meta tensor (a shape without values); store the tensor itself"
    elif tensor.is_quantized:
        problem = f"is quantized ({tensor.dtype}); store {role}.dequantize()"
    elif tensor.is_complex() or tensor.dtype == torch.bool:
        problem = f"has dtype {tensor.dtype}; expected real numbers"
    if problem is not None:
        raise DataError(f"{name}: {role} {problem}.")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():  # float16, bfloat16, float8...: float64 holds them exactly
        return tensor.to(torch.float64, memory_format=torch.contiguous_format, copy=True)
    if tensor.dtype == torch.uint64 and tensor.numel() and tensor.double().max() > _INT64_MAX:
        raise DataError(f"{name}: {role} holds integers beyond int64; expected int64 token ids.")
    return tensor.to(torch.int64, memory_format=torch.contiguous_format, copy=True)
