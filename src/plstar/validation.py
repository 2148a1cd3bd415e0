"""Checks of the arguments of public functions: a clear PlstarInputError or the checked value.

Every public entry point checks its scalar arguments here before any computation, so a string
where a number belongs, an integer dtype or an unknown option name is refused at the door with
a message naming the argument, never as a TypeError or AttributeError from deep inside.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from plstar.errors import PlstarInputError


def describe(x: object) -> str:
    """A value for a one-line message: its repr on one line, shortened, and its type."""
    text = " ".join(repr(x).split())
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(x).__name__})"


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


def choice(name: str, x: object, options: Sequence[str]) -> str:
    """x if it is one of ``options`` (strings); else PlstarInputError listing them."""
    if not isinstance(x, str) or x not in options:
        raise PlstarInputError(f"{name} must be one of {', '.join(options)}; got {describe(x)}")
    return x


def floating_dtype(name: str, x: object) -> torch.dtype:
    """x if it is torch.float32 or torch.float64, the dtypes plstar accumulates in."""
    if not isinstance(x, torch.dtype) or x not in (torch.float32, torch.float64):
        hint = f"; write torch.{x}" if isinstance(x, str) and x in ("float32", "float64") else ""
        raise PlstarInputError(
            f"{name} must be torch.float32 or torch.float64, got {describe(x)}{hint}"
        )
    return x  # type: ignore[return-value]


def memory_budget(x: object) -> int | None:
    """None (plstar's default budget) or a positive number of bytes."""
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or int(x) < 1:
        raise PlstarInputError(
            f"memory_budget must be a number of bytes ≥ 1 (e.g. 2 * 1024**3) or None, got {describe(x)}"
        )
    return int(x)


def seed(x: object) -> int:
    """A seed for torch and numpy generators: an integer in [0, 2**63)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Integral) or not 0 <= int(x) < 2**63:
        raise PlstarInputError(f"seed must be an integer in [0, 2**63), got {describe(x)}")
    return int(x)


def positive_tolerance(name: str, x: object) -> float:
    """A finite tolerance in (0, 1)."""
    v = real_number(name, x, minimum=0.0, strict=True)
    if v >= 1:
        raise PlstarInputError(f"{name} must be < 1, got {v}")
    return v


def callback(name: str, x: object) -> None:
    """Refuse a progress or record callback that cannot be called (None means none)."""
    if x is not None and not callable(x):
        raise PlstarInputError(f"{name} must be callable or None, got {describe(x)}")
