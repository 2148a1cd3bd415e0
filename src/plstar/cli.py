"""The ``plstar`` command: thin wiring of data, models and the core to a terminal."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

import plstar
from plstar import report
from plstar.data import Dataset, load_digits, load_file
from plstar.errors import PlstarInputError
from plstar.models import describe_model, load_model_factory, mlp
from plstar.train import check_arguments

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


@app.command()
def analyze(
    n: OptN = None,
    width: OptWidth = 512,
    depth: OptDepth = 3,
    activation: OptActivation = "tanh",
    parameterization: OptParameterization = Parameterization.ntk,
    outputs: OptOutputs = 1,
    seed: Annotated[int, typer.Option(help="Seed for the data subset, weights and solvers.")] = 0,
    dtype: OptDtype = DType.float64,
    data: OptData = None,
    target: OptTarget = None,
    scaling: OptScaling = Scaling.auto,
    model: OptModel = None,
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


class Method(str, Enum):
    gd = "gd"
    sgd = "sgd"


def _metrics_writer(path: Path) -> tuple[Callable[[plstar.Record], None], Callable[[], None]]:
    """(on_record, close): each record becomes one JSON line, flushed at once, so an interrupted or
    killed run leaves every line up to the interruption complete and parseable."""
    handle = path.open("w", encoding="utf-8")

    def on_record(record: plstar.Record) -> None:
        handle.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        handle.flush()

    return on_record, handle.close


def _train_table(result: plstar.TrainResult, monitor: plstar.Monitor) -> Table:
    """The closing summary of ``plstar train``."""
    table = Table(title="plstar train", title_justify="left", header_style="bold")
    for column in ("quantity", "value", "meaning"):
        table.add_column(column, justify="right" if column == "value" else "left")
    fmt = report.fmt
    last = next((r for r in reversed(monitor.history) if r.lambda_min is not None), None)
    first = "—" if result.first_below_eps is None else str(result.first_below_eps)
    rows = [
        ("steps", f"{result.steps}/{result.steps_requested}", f"{result.method}, lr {result.lr_mode}"),
        ("η", fmt(result.step_size), f"step size (final {fmt(result.final_step_size)})"),
        ("β, μ", f"{fmt(result.beta)}, {fmt(result.mu)}", "λ_max(H_L(w₀)), λ_min(K(w₀))"),
        ("rate", fmt(result.rate, 8), "envelope L_t ≤ rate^t·L₀" + (" (in mean)" if result.method == "sgd" else "")),
        ("L₀ → L_T", f"{fmt(result.loss0)} → {fmt(result.final_loss)}", "½‖F − y‖², summed"),
        ("max L/env", fmt(result.max_envelope_ratio), "≤ 1: the run stayed under the envelope"),
        ("first L < ε", first, f"ε = {fmt(result.eps, 3)}; bound {fmt(result.pl_eps_bound)}"),
        ("max ‖w − w₀‖", fmt(result.max_distance), f"theory's radius R = {fmt(result.radius)}"),
        ("λ_min(K_t)", fmt(None if last is None else last.lambda_min), f"last, on {len(monitor.subsample)} samples"),
        ("monitor", f"{monitor.overhead_seconds:.1f} s", "time in the monitor (w₀'s μ and β excluded)"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


@app.command()
def train(
    n: OptN = None,
    width: OptWidth = 512,
    depth: OptDepth = 3,
    activation: OptActivation = "tanh",
    parameterization: OptParameterization = Parameterization.ntk,
    outputs: OptOutputs = 1,
    seed: Annotated[int, typer.Option(help="Seed for the data subset, weights, batches and solvers.")] = 0,
    dtype: OptDtype = DType.float64,
    data: OptData = None,
    target: OptTarget = None,
    scaling: OptScaling = Scaling.auto,
    model: OptModel = None,
    hessian_outputs: Annotated[int, typer.Option(help="Outputs examined for ‖H_F‖ (SGD's per-sample β).")] = 4,
    memory_budget: Annotated[str | None, typer.Option(help="Working memory, e.g. 2GiB (default: ¼ of RAM, ≤ 2 GiB).")] = None,
    method: Annotated[Method, typer.Option(help="gd (full batch) or sgd (mini-batches).")] = Method.gd,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 500,
    lr: Annotated[str, typer.Option(help="'theory' (GD 1/β, SGD η*(b)) or a number.")] = "theory",
    batch_size: Annotated[int | None, typer.Option(help="SGD batch size (default min(n, 32)).")] = None,
    every: Annotated[int, typer.Option(help="Steps between kernel and sharpness measurements.")] = 100,
    kernel_samples: Annotated[int, typer.Option(help="Fixed subsample for the monitored kernel.")] = 256,
    eps: Annotated[float | None, typer.Option(help="PL*_ε target loss (default 1e-6·L₀).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for metrics.jsonl, config.json, summary.json, training.png.")] = Path("plstar-train"),
) -> None:  # fmt: skip
    """Train with the theory's step size, watching L, ρ, λ_min(K), drift and distance."""
    torch_dtype = getattr(torch, dtype.value)
    started = time.perf_counter()
    try:
        step_size: str | float = "theory" if lr == "theory" else float(lr)
    except ValueError:
        raise PlstarInputError(f"--lr must be 'theory' or a number, got {lr!r}") from None
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
        f"[bold]model[/] {describe_model(net)} ({model or parameterization.value + ' MLP'})"
    )
    budget = parse_bytes(memory_budget) if memory_budget else None
    # Refuse bad options now, not after the minutes that w₀'s measurements may take.
    check_arguments(method.value, steps, step_size, batch_size, dataset.n, eps, every)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "command": "train", "data": dataset.description, "scaling": dataset.scaling,
        "model": describe_model(net), "model_source": model or "mlp", "width": width,
        "depth": depth, "activation": activation, "parameterization": parameterization.value,
        "outputs": dataset.k, "n": dataset.n, "seed": seed, "dtype": dtype.value,
        "method": method.value, "steps": steps, "lr": lr, "batch_size": batch_size,
        "every": every, "kernel_samples": kernel_samples, "eps": eps,
        "hessian_outputs": hessian_outputs, "versions": _versions(),
    }  # fmt: skip
    report.write_json(out / "config.json", config)
    on_record, close = _metrics_writer(out / "metrics.jsonl")
    result, monitor, interrupted = None, None, False
    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[live]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=True) as bars:
            setup = bars.add_task("w₀: μ = λ_min(K), β", total=1, live="")
            monitor = plstar.Monitor(
                net, dataset.x, dataset.y, every=every, kernel_samples=kernel_samples, seed=seed,
                memory_budget=budget, on_record=on_record,
            )  # fmt: skip
            bars.update(setup, visible=False)
            task = bars.add_task("train", total=steps, live="")

            def live(phase: str, done: float, total: float) -> None:
                assert monitor is not None
                last = monitor.history[-1]
                lam = next(
                    (r.lambda_min for r in reversed(monitor.history) if r.lambda_min is not None),
                    None,
                )
                text = f"L {report.fmt(last.loss)}  ρ {report.fmt(last.pl_ratio)}  λ_min {report.fmt(lam)}"
                bars.update(task, completed=done, total=total, live=text)

            result = plstar.train(
                net, dataset.x, dataset.y, method=method.value, steps=steps, lr=step_size,
                batch_size=batch_size, monitor=monitor, eps=eps, hessian_outputs=hessian_outputs,
                seed=seed, memory_budget=budget, progress=live,
            )  # fmt: skip
    except plstar.TrainingInterrupted as stop:
        result, interrupted = stop.result, True
    except KeyboardInterrupt:
        interrupted = True
    finally:
        close()
    elapsed = time.perf_counter() - started
    summary: dict[str, Any] = {
        "interrupted": interrupted,
        "result": None if result is None else result.to_dict(),
        "monitor": None if monitor is None else {
            k: v for k, v in monitor.to_dict().items() if k != "history"
        },
        "seconds": elapsed,
    }  # fmt: skip
    report.write_json(out / "summary.json", summary)
    if monitor is not None:
        monitor.plot(
            out / "training.png", title=f"plstar train: {dataset.name}, {describe_model(net)}"
        )
        if result is not None:
            console.print(_train_table(result, monitor))
    for line in [] if result is None else result.verdict + result.events:
        console.print(f"• {line}")
    if interrupted:
        errors.print(
            "[yellow]interrupted:[/] stopped cleanly; everything up to here is in " + str(out)
        )
    console.print(
        f"wrote {out}/metrics.jsonl, config.json, summary.json, training.png ({elapsed:.1f} s)"
    )
    if interrupted:
        raise SystemExit(130)


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
