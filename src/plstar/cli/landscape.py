"""``plstar landscape``: the loss on a line or plane through w₀, annotated with the PL* map.

L and ρ at every point of a --grid, λ_min(K) and θ_min(H_L) on a coarser --kernel-grid
(:mod:`plstar.landscape`), along --directions (:mod:`plstar.directions`). Everything goes to --out:
``landscape.json`` (every point), ``landscape.png``, and the run's store (``points.json``,
``directions.npz``) that ``--resume`` continues from after an interruption.
"""

from __future__ import annotations

import argparse
import math
import pickle
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plstar import report
from plstar.certify import flat_parameters
from plstar.cli.common import (
    Interrupted,
    ProgressBars,
    build_model,
    check_problem_options,
    console,
    interrupts_deferred,
    load_problem,
    output_selector,
    problem_device,
    versions,
)
from plstar.cli.landscape_store import POINTS, VECTORS, LandscapeStore, digest
from plstar.cli.options import add_command, add_problem_options, integer
from plstar.directions import BIAS_HANDLINGS, DIRECTION_KINDS, Direction, make_directions
from plstar.errors import PlstarInputError
from plstar.landscape import hessian_start_vector, landscape
from plstar.landscape_results import Landscape, LandscapeGrid
from plstar.models import describe_model

SUMMARY = (
    "Draw the loss on a line or plane through w₀ with ρ, λ_min(K) and negative curvature "
    "(on the digits, 256 samples unless -n is given)."
)
DEFAULT_SAMPLES = 256
RESULT, FIGURE = "landscape.json", "landscape.png"
SEGMENT_SPAN, DEFAULT_SPAN = (-0.5, 2.0), (-1.0, 1.0)


def directions_list(text: str) -> list[str]:
    """--directions: one kind (a line) or two, comma-separated (a plane)."""
    kinds = [part.strip() for part in text.split(",")]
    if not 1 <= len(kinds) <= 2 or any(kind not in DIRECTION_KINDS for kind in kinds):
        raise argparse.ArgumentTypeError(
            f"expected one or two of {', '.join(DIRECTION_KINDS)} separated by a comma, e.g. "
            f"random,random; got {text!r}"
        )
    return kinds


def spans_list(text: str) -> list[tuple[float, float]]:
    """--span: S (−S to S) or LOW:HIGH, once for every axis or once per axis (comma-separated)."""
    spans = []
    for part in text.split(","):
        try:
            ends = [float(end) for end in part.split(":")]
        except ValueError:
            ends = []
        if len(ends) == 1 and ends[0] > 0:
            ends = [-ends[0], ends[0]]
        if len(ends) != 2 or not all(map(math.isfinite, ends)) or ends[0] >= ends[1]:
            raise argparse.ArgumentTypeError(
                f"expected S > 0 or LOW:HIGH with LOW < HIGH (e.g. --span 2 or --span=-0.5:2), "
                f"per axis separated by a comma; got {text!r}"
            )
        spans.append((ends[0], ends[1]))
    if len(spans) > 2:
        raise argparse.ArgumentTypeError(f"at most one span per axis (two), got {text!r}")
    return spans


def kernel_grid(text: str) -> int:
    """--kernel-grid: 0 (none) or at least 2 points per axis."""
    value = integer(0)(text)
    if value == 1:
        raise argparse.ArgumentTypeError("expected 0 (no coarse grid) or at least 2, got '1'")
    return value


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plstar landscape`` and its options."""
    parser = add_command(commands, "landscape", SUMMARY, run)
    add_problem_options(parser, seed_use="the data subset, weights and random directions",
                        samples_help="default: 256 of the digits, every sample of a --data file")  # fmt: skip
    group = parser.add_argument_group("slice")
    group.add_argument(
        "--directions", type=directions_list, default=["random", "random"], metavar="KIND[,KIND]",
        help="One direction for a line, two for a plane: random (Gaussian, filter-normalized), "
        "gradient (−∇L), lambda-min (λ_min(K) falls fastest), segment (toward --to). "
        "(default: random,random)",
    )  # fmt: skip
    group.add_argument("--grid", type=integer(2), default=21, metavar="POINTS",
                       help="Points per axis for L and ρ.")  # fmt: skip
    group.add_argument("--kernel-grid", type=kernel_grid, default=11, metavar="POINTS",
                       help="Points per axis for λ_min(K) and H_L (0 = none).")  # fmt: skip
    group.add_argument(
        "--span", type=spans_list, metavar="S|LOW:HIGH",
        help="Range of the coordinates, in units of each direction: S for −S..S or LOW:HIGH "
        "(write --span=-0.5:2), one for all axes or one per axis, comma-separated (default: "
        "-1:1; -0.5:2 along a segment, so that 0 is w₀ and 1 the second point).",
    )  # fmt: skip
    group.add_argument("--to", type=Path, dest="second_point", metavar="FILE.pt",
                       help="The second point of a segment: torch.save(model.state_dict(), "
                       "FILE.pt) of the same model, or a flat tensor of its m parameters.")  # fmt: skip
    group.add_argument("--biases", choices=BIAS_HANDLINGS, default="zero",
                       help="Random directions in 1-d parameters (biases, norm layers): zero, or "
                       "scaled to the parameter's norm.")  # fmt: skip
    group.add_argument("--hessian-steps", type=integer(0), default=4, metavar="STEPS",
                       help="Lanczos steps on H_L per coarse point (0 = no Hessian).")  # fmt: skip
    group.add_argument("--out", type=Path, default=Path("plstar-landscape"), metavar="DIR",
                       help=f"Folder for {RESULT}, {FIGURE} and the store --resume reads.")  # fmt: skip
    group.add_argument("--resume", action="store_true",
                       help="Reuse the points stored in --out by an interrupted run.")  # fmt: skip


def _check(args: argparse.Namespace) -> list[tuple[float, float]]:
    """Every option and their combinations, before any work; the spans per axis."""
    check_problem_options(args)
    report.check_output_folder(args.out, "--out", (RESULT, FIGURE, POINTS, VECTORS))
    if ("segment" in args.directions) != (args.second_point is not None):
        raise PlstarInputError(
            "--directions segment needs --to FILE.pt (the second point), and --to needs "
            "segment among --directions"
        )
    if args.second_point is not None and not args.second_point.is_file():
        raise PlstarInputError(f"--to {args.second_point}: no such file")
    count = len(args.directions)
    spans = args.span or [SEGMENT_SPAN if kind == "segment" else DEFAULT_SPAN
                          for kind in args.directions]  # fmt: skip
    if len(spans) == 1:
        spans = spans * count
    if len(spans) != count:
        raise PlstarInputError(f"--span gives {len(spans)} ranges for {count} direction(s)")
    return spans


def read_point(path: Path) -> Any:
    """The second point of --to: a state dict or a flat tensor, read without running pickled
    code (torch's weights_only); PlstarInputError on anything else."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as error:
        reason = " ".join(str(error).split())[:120]
        raise PlstarInputError(
            f"--to {path.name}: not a file of tensors written by torch.save ({type(error).__name__}"
            f": {reason.split('. ')[0]}); save torch.save(model.state_dict(), path)"
        ) from None
    if isinstance(content, torch.Tensor) or (
        isinstance(content, dict) and all(isinstance(v, torch.Tensor) for v in content.values())
    ):
        return content
    raise PlstarInputError(
        f"--to {path.name} holds a {type(content).__name__}; expected a state dict or a tensor"
    )


def run(args: argparse.Namespace) -> None:
    """Check every option, then compute (or go on with) the slice; Ctrl-C keeps the points."""
    spans = _check(args)
    if args.samples is None and args.data is None:
        args.samples = DEFAULT_SAMPLES
    started = time.perf_counter()
    dataset = load_problem(args)
    net = build_model(args, dataset)
    console.print(f"[bold]data[/]  {dataset.description}")
    console.print(f"[bold]model[/] {describe_model(net)}")
    output = output_selector(args)
    target = None if args.second_point is None else read_point(args.second_point)
    grid = LandscapeGrid.regular(spans, args.grid, args.kernel_grid)
    config = _config(args, dataset, net, spans, target)
    store = LandscapeStore(args.out, config)
    common: dict[str, Any] = {"memory_budget": args.memory_budget, "output": output}
    resumed = store.resume(problem_device(args)) if args.resume else None
    if resumed is None:
        if args.resume:
            console.print(f"[dim]nothing stored in {args.out}: starting afresh[/]")
        directions = make_directions(net, dataset.x, dataset.y, args.directions, seed=args.seed,
                                     target=target, biases=args.biases, **common)  # fmt: skip
        start = None
        if args.hessian_steps and args.kernel_grid:
            start = hessian_start_vector(net, dataset.x, dataset.y, 4 * args.hessian_steps,
                                         seed=args.seed, **common)  # fmt: skip
        with interrupts_deferred():
            store.start(directions, start)
    else:
        directions, start = resumed
        done = store.counts
        console.print(f"resuming: {done['loss']} loss and {done['kernel']} kernel points stored")
    for d in directions:
        console.print(f"[bold]direction[/] {d.label}: {d.description}; ‖d‖ = {d.norm:.4g}")
    try:
        found = _compute(args, dataset, net, directions, grid, start, store, common)
    except KeyboardInterrupt:
        done = store.counts
        raise Interrupted(
            f"{done['loss']} loss and {done['kernel']} kernel points are kept in "
            f"{args.out / POINTS}; run again with --resume to continue"
        ) from None
    elapsed = time.perf_counter() - started
    console.print(_table(found))
    console.print(f"[dim]done in {elapsed:.1f} s ({found.computed['loss']} loss and "
                  f"{found.computed['kernel']} kernel points computed)[/]")  # fmt: skip
    payload = {"landscape": found.to_dict(), "config": config, "versions": versions(),
               "seconds": elapsed}  # fmt: skip
    with interrupts_deferred():
        report.write_json(args.out / RESULT, payload)
        from plstar.landscape_figures import plot_landscape

        plot_landscape(found, args.out / FIGURE, title=f"plstar landscape: {dataset.name}")
    console.print(f"wrote {args.out / RESULT} and {args.out / FIGURE}")


def _compute(
    args: argparse.Namespace, dataset: Any, net: torch.nn.Module, directions: list[Direction],
    grid: LandscapeGrid, start: torch.Tensor | None, store: LandscapeStore,
    common: dict[str, Any],
) -> Landscape:  # fmt: skip
    def keep(kind: str, points: list[Any]) -> None:
        with interrupts_deferred():  # a batch is stored whole or not at all
            store.add(kind, points)

    with Progress(
        TextColumn("{task.description}"), BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
        console=console, transient=True,
    ) as bars:  # fmt: skip
        return landscape(
            net, dataset.x, dataset.y, directions, grid, hessian_steps=args.hessian_steps,
            hessian_start=start, seed=args.seed, known=store.points, on_points=keep,
            progress=ProgressBars(bars), **common,
        )  # fmt: skip


def _table(found: Landscape) -> Table:
    """The slice in figures: at w, over the grid, and the checks."""
    table = Table(show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    loss, ratio = found.values("loss"), found.values("pl_ratio")
    rows = [("n, k, m", f"{found.n}, {found.k}, {found.m:,}"),
            ("L on the grid: min, max", f"{np.nanmin(loss):.4g}, {np.nanmax(loss):.4g}"),
            ("ρ on the grid: min, max", f"{np.nanmin(ratio):.4g}, {np.nanmax(ratio):.4g}")]  # fmt: skip
    if found.cosine is not None:
        rows.append(("cos ∠(u, v)", f"{found.cosine:.3g}"))
    if found.origin is not None:
        origin = found.origin
        low = found.values("lambda_min")
        lambda0 = origin.lambda_min
        held, outside = found.kernel_held(0.5), found.bracket_violations()
        rows += [
            ("L(w₀), ρ(w₀)", f"{origin.loss:.4g}, {origin.pl_ratio:.4g}"),
            ("λ₀ = λ_min(K(w₀))", f"{lambda0:.4g}"),
            ("λ_min(K) on the coarse grid: min, max", f"{np.nanmin(low):.4g}, {np.nanmax(low):.4g}"),
            ("coarse points with λ_min(K) ≥ λ₀/2", f"{held} of {low.size}"),
            ("points where λ_min ≤ ρ ≤ λ_max fails", str(outside)),
        ]  # fmt: skip
        if found.hessian_steps:
            negative = int(np.nansum(found.values("negative_curvature")))
            rows += [("θ_min(H_L) at w₀", f"{origin.hessian_min:.4g}"),
                     ("coarse points with θ_min(H_L) < 0 (not convex)",
                      f"{negative} of {low.size}")]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    return table


def _config(
    args: argparse.Namespace, dataset: Any, net: torch.nn.Module, spans: list[tuple[float, float]],
    target: Any,
) -> dict[str, Any]:  # fmt: skip
    """Everything the numbers depend on; the digests catch a changed --model, --data or --to."""
    return {
        "data": dataset.description, "model": describe_model(net),
        "model_source": args.model or "mlp", "width": args.width, "depth": args.depth,
        "activation": args.activation, "parameterization": args.parameterization,
        "seed": args.seed, "dtype": args.dtype,
        "output": "default" if args.output is None else args.output.text,
        "directions": args.directions, "biases": args.biases, "grid": args.grid,
        "kernel_grid": args.kernel_grid, "spans": [list(s) for s in spans],
        "hessian_steps": args.hessian_steps,
        "digests": {"w0": digest(flat_parameters(net)), "x": digest(dataset.x),
                    "y": digest(dataset.y),
                    "to": None if target is None else digest(*_tensors(target))},
    }  # fmt: skip


def _tensors(content: Any) -> list[torch.Tensor]:
    return [content] if isinstance(content, torch.Tensor) else [content[k] for k in sorted(content)]
