"""What every ``plstar`` command shares: the typer app, consoles, option types, data and model set-up."""

from __future__ import annotations

import re
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import Progress

import plstar
from plstar.data import Dataset, load_digits, load_file
from plstar.errors import PlstarInputError
from plstar.models import load_model_factory, mlp

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Measure and certify the PL* landscape of over-parameterized models (Liu, Zhu & Belkin).",
)
console = Console(soft_wrap=True)
errors = Console(stderr=True)


class DType(str, Enum):
    float32 = "float32"
    float64 = "float64"


class Parameterization(str, Enum):
    ntk = "ntk"
    standard = "standard"


class Scaling(str, Enum):
    auto = "auto"
    sphere = "sphere"
    standardize = "standardize"
    none = "none"


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_bytes(text: str) -> int:
    """'2GiB', '500MB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise PlstarInputError(f"cannot read memory size {text!r}; write e.g. 2GiB, 500MB or 1e9")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def load_problem(
    *, data: Path | None, target: str | None, n: int | None, outputs: int, seed: int,
    scaling: Scaling, dtype: torch.dtype,
) -> Dataset:  # fmt: skip
    """The embedded digits by default, else the user's file (a random subset of n if asked)."""
    if data is None:
        chosen = "sphere" if scaling == Scaling.auto else scaling.value
        return load_digits(n, outputs=outputs, seed=seed, scaling=chosen, dtype=dtype)
    chosen = "none" if scaling == Scaling.auto else scaling.value
    dataset = load_file(data, target=target, scaling=chosen, dtype=dtype)
    if n is not None and n < dataset.n:
        index = torch.randperm(dataset.n, generator=torch.Generator().manual_seed(seed))[:n]
        return Dataset(
            dataset.x[index], dataset.y[index], dataset.name, dataset.scaling,
            f"{dataset.description} (random subset of {n}, seed {seed})",
        )  # fmt: skip
    return dataset


def build_model(
    *, model_spec: str | None, d: int, k: int, width: int, depth: int, activation: str,
    parameterization: Parameterization, seed: int, dtype: torch.dtype,
) -> torch.nn.Module:  # fmt: skip
    """The user's factory (cast to dtype) or an MLP with the given architecture."""
    if model_spec is not None:
        return load_model_factory(model_spec).to(dtype)
    return mlp(
        d, width, depth, k, activation=activation, parameterization=parameterization.value,
        generator_seed=seed, dtype=dtype,
    )  # fmt: skip


class ProgressBars:
    """Adapts core progress callbacks ``(phase, done, total)`` to rich progress bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: float, total: float) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


def versions() -> dict[str, str]:
    """Versions of plstar, torch, numpy, scipy and python, for reports and JSON outputs."""
    import numpy
    import scipy

    return {
        "plstar": plstar.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "python": sys.version.split()[0],
    }  # fmt: skip


# Options shared by every command that builds a model and loads data.
OptN = Annotated[int | None, typer.Option(help="Number of samples (default: all).")]
OptWidth = Annotated[int, typer.Option(help="Hidden width of the default MLP.")]
OptDepth = Annotated[int, typer.Option(help="Linear layers of the default MLP.")]
OptActivation = Annotated[
    str, typer.Option(help="tanh, relu, gelu, sigmoid, softplus, erf, identity.")
]
OptParameterization = Annotated[
    Parameterization, typer.Option(help="Weight parameterization of the MLP.")
]
OptOutputs = Annotated[
    int, typer.Option(help="Digits targets: 1 = ±1 parity, 10 = centred one-hot.")
]
OptDtype = Annotated[DType, typer.Option(help="Dtype the model runs in (spectra are float64).")]
OptData = Annotated[
    Path | None, typer.Option(help=".npz (x, y), .csv (target = last column) or .pt file.")
]
OptTarget = Annotated[str | None, typer.Option(help="CSV column to use as target.")]
OptScaling = Annotated[
    Scaling, typer.Option(help="Input scaling; auto = sphere for digits, none for files.")
]
OptModel = Annotated[
    str | None, typer.Option("--model", help="FILE.py:factory returning an nn.Module.")
]
