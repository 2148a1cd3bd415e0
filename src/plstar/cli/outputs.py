"""``--output``: which of a model's returned values is F, written without running any text as code.

    --output logits            the ``logits`` entry (dict, Hugging Face ModelOutput) or attribute
    --output logits:last       ... at the last position (F = out.logits[:, -1])
    --output 0:first           the first element of a returned tuple, at the first position
    --output :mean             the default F (logits, else the first tensor), averaged over dim 1
    --output FILE.py:NAME      the function NAME of a Python file, called on what the model returns

A key path is names or integers joined by dots (``hidden_states.2``), each read as a mapping key,
an attribute or a sequence index, in that order; a position (``first``, ``last``, ``mean``) then
picks along dim 1, the sequence of a (batch, sequence, ...) output. Without --output, plstar's
default applies: the tensor itself, else ``logits``, else the first tensor returned.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from plstar.errors import PlstarInputError
from plstar.functional import default_output
from plstar.models import import_user_file

POSITIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "first": lambda t: t[:, 0],
    "last": lambda t: t[:, -1],
    "mean": lambda t: t.mean(dim=1),
}
_KEY = r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)"
_PATH = re.compile(rf"(?P<path>(?:{_KEY}(?:\.{_KEY})*)?)(?::(?P<position>[a-z]+))?")
_FILE = re.compile(r"(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class KeyPath:
    """F = the value at ``keys`` of what the model returns, then ``position`` along dim 1."""

    spec: str
    keys: tuple[str, ...]
    position: str | None

    def __call__(self, raw: Any) -> Any:
        value = raw
        for depth, key in enumerate(self.keys):
            value = _step(value, key, self.spec, ".".join(self.keys[:depth]) or "the output")
        if not self.keys:
            value = default_output(value)
        if self.position is None:
            return value
        if not isinstance(value, Tensor) or value.ndim < 2:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise PlstarInputError(
                f"--output {self.spec}: ':{self.position}' picks along dim 1 of a (batch, "
                f"sequence, ...) tensor, but the value is {shape}"
            )
        return POSITIONS[self.position](value)


def _step(value: Any, key: str, spec: str, where: str) -> Any:
    """value[key] for a mapping, else its attribute, else value[int(key)] for a sequence."""
    if isinstance(value, Mapping) and key in value:
        return value[key]
    if not key.isdigit() and hasattr(value, key) and not isinstance(value, Tensor):
        return getattr(value, key)
    if key.isdigit() and isinstance(value, tuple | list) and int(key) < len(value):
        return value[int(key)]
    if isinstance(value, Mapping):
        has = ", ".join(str(k) for k in value) or "nothing"
        what = f"{where} ({type(value).__name__}) has no {key!r}; it has {has}"
    else:
        what = f"{where} is a {type(value).__name__}, which has no {key!r}"
    raise PlstarInputError(f"--output {spec}: {what}")


@dataclass(frozen=True)
class OutputSpec:
    """A parsed --output: a key path (checked when parsed) or a function in a file (loaded
    with the model)."""

    text: str
    path: KeyPath | None = None
    file: Path | None = None
    name: str = ""

    def selector(self) -> Callable[[Any], Any]:
        """The callable to pass as ``output=``; imports the file for FILE.py:NAME."""
        if self.path is not None:
            return self.path
        assert self.file is not None
        return _load_function(self.file, self.name, self.text)


def output_spec(text: str) -> OutputSpec:
    """An option type: --output as described in the module docstring."""
    found = _FILE.fullmatch(text)
    if found:
        return OutputSpec(text, file=Path(found["file"]), name=found["name"])
    found = _PATH.fullmatch(text)
    if text and found and (found["position"] is None or found["position"] in POSITIONS):
        keys = tuple(found["path"].split(".")) if found["path"] else ()
        return OutputSpec(text, path=KeyPath(text, keys, found["position"]))
    raise argparse.ArgumentTypeError(
        f"cannot read {text!r}: write a key path such as logits or logits:last (positions: "
        f"{', '.join(POSITIONS)}), or FILE.py:function"
    )


def _load_function(path: Path, name: str, spec: str) -> Callable[[Any], Any]:
    if not path.is_file():
        raise PlstarInputError(f"--output {spec}: file not found: {path}")
    module = import_user_file(path, "output", f"--output {spec}: ")
    function = getattr(module, name, None)
    if not callable(function):
        what = "is missing" if function is None else f"is a {type(function).__name__}"
        raise PlstarInputError(f"--output {spec}: {name} in {path} {what}, not a function")
    return function
