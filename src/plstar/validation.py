"""Validation of scalar arguments shared by the formula modules: a clear PlstarInputError or a float."""

from __future__ import annotations

import math
import numbers

from plstar.errors import PlstarInputError


def real_number(
    name: str, x: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """x as a finite float, at least (``strict``: above) ``minimum``; else PlstarInputError."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise PlstarInputError(f"{name} must be a real number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v):
        raise PlstarInputError(f"{name} must be finite, got {v}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        op = ">" if strict else ">="
        raise PlstarInputError(f"{name} must be {op} {minimum}, got {v}")
    return v


def whole_number(name: str, x: object, *, minimum: int) -> int:
    """x as an int (bools refused), at least ``minimum``; else PlstarInputError."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise PlstarInputError(f"{name} must be an integer, got {type(x).__name__}")
    if int(x) < minimum:
        raise PlstarInputError(f"{name} must be >= {minimum}, got {int(x)}")
    return int(x)


def clip01(x: float) -> float:
    """x clipped to [0, 1]."""
    return min(1.0, max(0.0, x))
