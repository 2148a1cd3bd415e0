"""The ``plstar`` command: thin wiring of data, models and the core to a terminal."""

from __future__ import annotations

import re
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import plstar
from plstar import report
from plstar.data import Dataset, load_digits, load_file
from plstar.errors import PlstarInputError
from plstar.models import describe_model, load_model_factory, mlp

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


def _versions() -> dict[str, str]:
    import numpy
    import scipy

    return {
        "plstar": plstar.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "python": sys.version.split()[0],
    }  # fmt: skip


@app.command()
def analyze(
    n: Annotated[int | None, typer.Option(help="Number of samples (default: all).")] = None,
    width: Annotated[int, typer.Option(help="Hidden width of the default MLP.")] = 512,
    depth: Annotated[int, typer.Option(help="Linear layers of the default MLP.")] = 3,
    activation: Annotated[str, typer.Option(help="tanh, relu, gelu, sigmoid, softplus, erf, identity.")] = "tanh",
    parameterization: Annotated[Parameterization, typer.Option(help="Weight parameterization of the MLP.")] = Parameterization.ntk,
    outputs: Annotated[int, typer.Option(help="Digits targets: 1 = ±1 parity, 10 = centred one-hot.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for the data subset, weights and solvers.")] = 0,
    dtype: Annotated[DType, typer.Option(help="Dtype the model runs in (spectra are float64).")] = DType.float64,
    data: Annotated[Path | None, typer.Option(help=".npz (x, y), .csv (target = last column) or .pt file.")] = None,
    target: Annotated[str | None, typer.Option(help="CSV column to use as target.")] = None,
    scaling: Annotated[Scaling, typer.Option(help="Input scaling; auto = sphere for digits, none for files.")] = Scaling.auto,
    model: Annotated[str | None, typer.Option("--model", help="FILE.py:factory returning an nn.Module.")] = None,
    implementation: Annotated[str, typer.Option(help="Kernel implementation: auto, structured, jacobian, ntvp.")] = "auto",
    hessian_outputs: Annotated[int, typer.Option(help="Outputs examined for ‖H_F‖ (0 = all).")] = 16,
    target_loss: Annotated[float | None, typer.Option(help="Target loss for the step count (default 1e-6·L₀).")] = None,
    memory_budget: Annotated[str | None, typer.Option(help="Working memory, e.g. 2GiB (default: ¼ of free RAM, ≤ 2 GiB).")] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write every figure to this JSON file.")] = None,
) -> None:  # fmt: skip
    """Measure K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's R, step and rate."""
    torch_dtype = getattr(torch, dtype.value)
    started = time.perf_counter()
    dataset = load_problem(
        data=data, target=target, n=n, outputs=outputs, seed=seed, scaling=scaling,
        dtype=torch_dtype,
    )  # fmt: skip
    net = build_model(
        model_spec=model, d=dataset.d, k=dataset.k, width=width, depth=depth,
        activation=activation, parameterization=parameterization, seed=seed, dtype=torch_dtype,
    )  # fmt: skip
    console.print(f"[bold]data[/]  {dataset.description}")
    console.print(
        f"[bold]model[/] {describe_model(net)}; {parameterization.value} parameterization"
        if model is None
        else f"[bold]model[/] {describe_model(net)} (from {model})"
    )
    console.print(
        f"[bold]dtype[/] model runs in {dtype.value}; kernels and spectra accumulate in float64"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bars:  # fmt: skip
        result = plstar.analyze(
            net, dataset.x, dataset.y, implementation=implementation,  # type: ignore[arg-type]
            target_loss=target_loss, hessian_outputs=hessian_outputs or None, seed=seed,
            memory_budget=parse_bytes(memory_budget) if memory_budget else None,
            progress=ProgressBars(bars),
        )  # fmt: skip
    console.print(report.analysis_table(result))
    for line in result.verdict:
        console.print(f"• {line}")
    elapsed = time.perf_counter() - started
    console.print(f"[dim]done in {elapsed:.1f} s[/]")
    if json_path is not None:
        payload = {
            "analysis": result.to_dict(),
            "config": {
                "data": dataset.description, "scaling": dataset.scaling, "model": describe_model(net),
                "model_source": model or "mlp", "width": width, "depth": depth,
                "activation": activation, "parameterization": parameterization.value,
                "outputs": dataset.k, "seed": seed, "dtype": dtype.value,
                "implementation": implementation, "hessian_outputs": hessian_outputs,
            },
            "versions": _versions(),
            "seconds": elapsed,
        }  # fmt: skip
        report.write_json(json_path, payload)
        console.print(f"wrote {json_path}")


@app.callback()
def _root() -> None:
    """plstar: tangent kernels, spectra and PL* certificates for PyTorch models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with a one-line message and exit code 2, Ctrl-C with 130."""
    try:
        app(args=argv, standalone_mode=False)
    except PlstarInputError as error:
        errors.print(f"[bold red]error:[/] {error}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except Exception as error:  # click's own usage errors carry their exit code
        import click

        if isinstance(error, click.ClickException):
            error.show()
            raise SystemExit(error.exit_code) from None
        if isinstance(error, click.exceptions.Abort):
            errors.print("[yellow]interrupted[/]")
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
