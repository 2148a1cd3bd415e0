"""``plstar train``: GD/SGD with the theory's step size under the Monitor."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

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
    Scaling,
    app,
    build_model,
    console,
    errors,
    load_problem,
    parse_bytes,
    versions,
)  # fmt: skip
from plstar.errors import PlstarInputError
from plstar.models import describe_model
from plstar.train import check_arguments


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
        "hessian_outputs": hessian_outputs, "versions": versions(),
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
