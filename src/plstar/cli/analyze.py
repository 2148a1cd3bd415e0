"""``plstar analyze``: K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's figures.

With ``--distributed`` (under torchrun) K and its spectrum are computed across the ranks
(:mod:`plstar.distributed`); L₀, ρ, β and ‖H_F‖ are then computed on rank 0 alone, which prints
and writes. Other ranks print nothing but their own error, if any.
"""

from __future__ import annotations

import argparse
import os
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

import plstar
from plstar import report
from plstar.cli.common import (
    Incomplete,
    Interrupted,
    ProgressBars,
    build_model,
    check_problem_options,
    console,
    hessian_outputs,
    load_problem,
    output_selector,
    say_error,
    versions,
)
from plstar.cli.options import (
    add_command,
    add_problem_options,
    non_negative_number,
    positive_number,
)
from plstar.errors import PlstarInputError
from plstar.models import describe_model
from plstar.planning import IMPLEMENTATIONS

_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SUMMARY = "Measure K(w₀), its spectrum, β, ρ, ‖H_F‖ and the GD theorem's R, step and rate."


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plstar analyze`` and its options."""
    parser = add_command(commands, "analyze", SUMMARY, run)
    add_problem_options(
        parser, seed_use="the data subset, weights and solvers", hessian_outputs=16,
        hessian_help="Outputs examined for ‖H_F‖ (0 = all).",
    )  # fmt: skip
    group = parser.add_argument_group("measurement")
    group.add_argument("--implementation", choices=IMPLEMENTATIONS, default="auto",
                       help="Kernel implementation.")  # fmt: skip
    group.add_argument("--target-loss", type=positive_number, metavar="LOSS",
                       help="Target loss for the step count (default 1e-6·L₀).")  # fmt: skip
    group.add_argument(
        "--hessian-time-share", type=non_negative_number, default=0.35, metavar="FRACTION",
        help="‖H_F‖ may take this fraction of the time of the other figures (at least 0.2 s; "
        "0 = no bound: it runs to its tolerance, reproducibly).",
    )  # fmt: skip
    group.add_argument("--json", type=Path, dest="json_path", metavar="FILE",
                       help="Also write every figure to this JSON file.")  # fmt: skip
    group = parser.add_argument_group("distributed (under torchrun)")
    group.add_argument(
        "--distributed", action="store_true",
        help="Under torchrun: K and its spectrum across the ranks; rank 0 prints. Launch with "
        "torchrun --nproc-per-node N -m plstar analyze --distributed --samples N ...",
    )  # fmt: skip
    group.add_argument("--backend", choices=("auto", "gloo", "nccl"), default="auto",
                       help="With --distributed: auto (nccl if CUDA, else gloo), gloo or nccl.")  # fmt: skip
    group.add_argument("--timeout", type=positive_number, default=1800.0, metavar="SECONDS",
                       help="With --distributed: seconds before a silent rank fails the others.")  # fmt: skip
    group.add_argument(
        "--store", choices=("rows", "features"), default="rows",
        help="With --distributed: rows (each rank keeps its rows of K) or features (only its "
        "samples' features; no K).",
    )  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Check every option, then measure; Ctrl-C ends with what was written."""
    check_problem_options(args)
    # Only rank 0 writes; another node's file system need not have the folder.
    writes = args.json_path is not None and os.environ.get("RANK", "0") == "0"
    if writes:
        report.check_output_file(args.json_path, "--json")
    written: list[Path] = []
    try:
        if args.distributed:
            _run_distributed(args, written)
        else:
            _analyze(args, written)
    except KeyboardInterrupt:
        raise Interrupted(
            f"{written[0]} was written" if written else "nothing was written"
        ) from None


def _join_process_group(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(rank, world size, device) after joining the group torchrun's environment describes."""
    from plstar import distributed

    missing = [name for name in _TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise PlstarInputError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} unset): launch with "
            "torchrun --nproc-per-node N -m plstar analyze --distributed ..."
        )
    device = distributed.init(
        args.backend,
        timeout=args.timeout,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),  # type: ignore[arg-type]
    )
    return distributed.dist.get_rank(), distributed.dist.get_world_size(), device


def _run_distributed(args: argparse.Namespace, written: list[Path]) -> None:
    import torch.distributed as dist

    from plstar.distributed import DistributedError

    rank, world, device = _join_process_group(args)
    try:
        _analyze(args, written, rank=rank, world=world, device=device)
    except DistributedError as error:
        say_error(f"error (rank {rank} of {world}): {error}")
        raise SystemExit(2 if error.input_error else 1) from None
    finally:
        dist.destroy_process_group()


def _analyze(
    args: argparse.Namespace, written: list[Path], *, rank: int = 0, world: int = 1,
    device: torch.device | None = None,
) -> None:  # fmt: skip
    """The command's body; with --distributed every rank runs it and rank 0 speaks."""
    say = console if rank == 0 else Console(quiet=True)
    started = time.perf_counter()
    dataset = load_problem(args)
    net = build_model(args, dataset)
    x, y = dataset.x, dataset.y
    if args.distributed:
        from plstar.distributed import broadcast_parameters

        net, x, y = net.to(device), x.to(device), y.to(device)
        broadcast_parameters(net)  # a user's factory may draw on other ranks' devices: rank 0 rules
    say.print(f"[bold]data[/]  {dataset.description}")
    output = output_selector(args)
    say.print(
        f"[bold]model[/] {describe_model(net)}; {args.parameterization} parameterization"
        if args.model is None
        else f"[bold]model[/] {describe_model(net)} (from {args.model})"
    )
    if args.output is not None:
        say.print(f"[bold]F[/]     --output {args.output.text} of what the model returns")
    say.print(
        f"[bold]dtype[/] model runs in {args.dtype} on {x.device}; kernels and spectra accumulate "
        "in float64"
    )
    if args.distributed:
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
        "implementation": args.implementation, "target_loss": args.target_loss,
        "hessian_outputs": hessian_outputs(args), "seed": args.seed,
        "memory_budget": args.memory_budget, "output": output,
        "hessian_time_share": args.hessian_time_share or None,
    }  # fmt: skip
    with bars_or_nothing as bars:
        progress = None if bars is None else ProgressBars(bars)
        if args.distributed:
            from plstar import distributed

            result = distributed.analyze(net, x, y, progress=progress, store=args.store, **options)
        else:
            result = plstar.analyze(net, x, y, progress=progress, **options)
    if result is None:  # not rank 0
        return
    say.print(report.analysis_table(result))
    for line in result.verdict:
        say.print(f"• {line}")
    elapsed = time.perf_counter() - started
    say.print(f"[dim]done in {elapsed:.1f} s[/]")
    if args.json_path is not None:
        payload = {
            "analysis": result.to_dict(),
            "config": {
                "data": dataset.description, "scaling": dataset.scaling, "model": describe_model(net),
                "model_source": args.model or "mlp", "width": args.width, "depth": args.depth,
                "activation": args.activation, "parameterization": args.parameterization,
                "outputs": dataset.k, "seed": args.seed, "dtype": args.dtype,
                "device": str(x.device),
                "implementation": args.implementation, "hessian_outputs": args.hessian_outputs,
                "hessian_time_share": args.hessian_time_share,
                "output": "default" if args.output is None else args.output.text,
                **({"distributed": {"ranks": world, "backend": torch.distributed.get_backend(),
                                    "store": args.store}} if args.distributed else {}),
            },
            "versions": versions(),
            "seconds": elapsed,
        }  # fmt: skip
        written.append(report.write_json(args.json_path, payload))
        say.print(f"wrote {args.json_path}")
    if not result.complete:  # what was measured is printed and written; the exit code says more
        stages = "; ".join(f"{stage}: {error}" for stage, error in result.failed.items())
        raise Incomplete(f"not every figure could be measured ({stages})")
