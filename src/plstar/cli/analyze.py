"""``plstar analyze``: K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import plstar
from plstar import report
from plstar.cli.common import (
    DType,
    OptActivation,
    OptData,
    OptDepth,
    OptDtype,
    OptModel,
    OptN,
    OptOutputs,
    OptParameterization,
    OptScaling,
    OptTarget,
    OptWidth,
    Parameterization,
    ProgressBars,
    Scaling,
    _versions,
    app,
    build_model,
    console,
    load_problem,
    parse_bytes,
)  # fmt: skip
from plstar.models import describe_model


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
