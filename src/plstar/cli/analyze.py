"""``plstar analyze``: K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's figures.

With ``--distributed`` (under torchrun) K and its spectrum are computed across the ranks
(:mod:`plstar.distributed`); L₀, ρ, β and ‖H_F‖ are then computed on rank 0 alone, which prints
and writes. Other ranks print nothing but their own error, if any.
"""

from __future__ import annotations

import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
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

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _join_process_group(backend: str, timeout: float, store: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the group torchrun's environment describes."""
    from plstar import distributed

    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise PlstarInputError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} unset): launch with "
            "torchrun --nproc-per-node N -m plstar analyze --distributed ..."
        )
    if backend not in ("auto", "gloo", "nccl"):
        raise PlstarInputError(f"--backend must be auto, gloo or nccl, not {backend!r}")
    if store not in ("rows", "features"):
        raise PlstarInputError(f"--store must be rows or features, not {store!r}")
    device = distributed.init(
        backend,
        timeout=timeout,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),  # type: ignore[arg-type]
    )
    return distributed.dist.get_rank(), distributed.dist.get_world_size(), device


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
    distributed: Annotated[bool, typer.Option("--distributed", help="Under torchrun: K and its spectrum across the ranks; rank 0 prints.")] = False,
    backend: Annotated[str, typer.Option(help="With --distributed: auto (nccl if CUDA, else gloo), gloo or nccl.")] = "auto",
    timeout: Annotated[float, typer.Option(help="With --distributed: seconds before a silent rank fails the others.")] = 1800.0,
    store: Annotated[str, typer.Option(help="With --distributed: rows (each rank keeps its rows of K) or features (only its samples' features; no K).")] = "rows",
) -> None:  # fmt: skip
    """Measure K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's R, step and rate."""
    options = dict(locals())
    if not distributed:
        _analyze(**options)
        return
    import torch.distributed as dist

    from plstar.distributed import DistributedError

    rank, world, device = _join_process_group(backend, timeout, store)
    try:
        _analyze(**options, rank=rank, world=world, device=device)
    except DistributedError as error:
        errors.print(f"[bold red]error[/] (rank {rank} of {world}): {error}")
        raise SystemExit(2 if error.input_error else 1) from None
    finally:
        dist.destroy_process_group()


def _analyze(
    *, n: int | None, width: int, depth: int, activation: str, parameterization: Parameterization,
    outputs: int, seed: int, dtype: DType, data: Path | None, target: str | None, scaling: Scaling,
    model: str | None, implementation: str, hessian_outputs: int, target_loss: float | None,
    memory_budget: str | None, json_path: Path | None, distributed: bool, backend: str,
    timeout: float, store: str, rank: int = 0, world: int = 1,
    device: torch.device | None = None,
) -> None:  # fmt: skip
    """The command's body; with ``distributed`` every rank runs it and rank 0 speaks."""
    say = console if rank == 0 else Console(quiet=True)
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
    x, y = dataset.x, dataset.y
    if distributed:
        from plstar.distributed import broadcast_parameters

        net, x, y = net.to(device), x.to(device), y.to(device)
        broadcast_parameters(net)  # a user's factory need not be seeded: rank 0's weights rule
    say.print(f"[bold]data[/]  {dataset.description}")
    say.print(
        f"[bold]model[/] {describe_model(net)}; {parameterization.value} parameterization"
        if model is None
        else f"[bold]model[/] {describe_model(net)} (from {model})"
    )
    say.print(
        f"[bold]dtype[/] model runs in {dtype.value}; kernels and spectra accumulate in float64"
    )
    if distributed:
        say.print(
            f"[bold]ranks[/] {world} ({torch.distributed.get_backend()}): K and its spectrum "
            "distributed; L₀, ρ, β and ‖H_F‖ on rank 0"
        )
    bars_or_nothing: AbstractContextManager[Any] = (
        Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
            console=console, transient=True,
        ) if rank == 0 else nullcontext()
    )  # fmt: skip
    options: dict[str, Any] = {
        "implementation": implementation, "target_loss": target_loss,
        "hessian_outputs": hessian_outputs or None, "seed": seed,
        "memory_budget": parse_bytes(memory_budget) if memory_budget else None,
    }  # fmt: skip
    with bars_or_nothing as bars:
        progress = None if bars is None else ProgressBars(bars)
        if distributed:
            from plstar import distributed as across

            chosen: Any = store  # checked against rows/features at the start
            result = across.analyze(net, x, y, progress=progress, store=chosen, **options)
        else:
            result = plstar.analyze(net, x, y, progress=progress, **options)
    if result is None:  # not rank 0
        return
    say.print(report.analysis_table(result))
    for line in result.verdict:
        say.print(f"• {line}")
    elapsed = time.perf_counter() - started
    say.print(f"[dim]done in {elapsed:.1f} s[/]")
    if json_path is not None:
        payload = {
            "analysis": result.to_dict(),
            "config": {
                "data": dataset.description, "scaling": dataset.scaling, "model": describe_model(net),
                "model_source": model or "mlp", "width": width, "depth": depth,
                "activation": activation, "parameterization": parameterization.value,
                "outputs": dataset.k, "seed": seed, "dtype": dtype.value,
                "implementation": implementation, "hessian_outputs": hessian_outputs,
                **({"distributed": {"ranks": world, "backend": torch.distributed.get_backend(),
                                    "store": store}} if distributed else {}),
            },
            "versions": versions(),
            "seconds": elapsed,
        }  # fmt: skip
        report.write_json(json_path, payload)
        say.print(f"wrote {json_path}")
