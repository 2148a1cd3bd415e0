"""``plstar certify``: does the GD theorem's hypothesis hold on its own ball, for this model?

PL* with μ = λ₀/2 on B(w₀, R), R = 2√(2βL₀)/μ with β the largest λ_max(H_L) found on the ball
(THEORY items 1, 2, 4). The PL* region around w₀ is bracketed (:mod:`plstar.region`): from below
by Hessian control with the largest ‖H_F‖ found on the ball (:func:`plstar.certify`), from above
by the nearest point found where λ_min(K) < μ. The verdict compares both with R. With
``--widths`` the same runs per width — ``--model FILE.py:factory`` is then called as
``factory(width)`` — and power-law fits of the bracket against width say where the theorem would
start to apply.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from plstar import report
from plstar.cli.common import (
    Interrupted,
    ProgressBars,
    build_model,
    check_problem_options,
    console,
    hessian_outputs,
    load_problem,
    output_selector,
    problem_device,
    versions,
)
from plstar.cli.options import add_command, add_problem_options, integer
from plstar.conditions import json_safe
from plstar.models import describe_model
from plstar.region import certify_region, fit_crossover

SUMMARY = (
    "Bracket the PL* region around w₀ and compare it with the GD theorem's ball (on the digits, "
    "256 samples unless -n is given)."
)
DEFAULT_SAMPLES = 256


def widths_list(text: str) -> list[int]:
    """--widths: comma-separated integers ≥ 1, at least two, increasing."""
    try:
        widths = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected widths such as 64,128,256, got {text!r}"
        ) from None
    if len(widths) < 2 or min(widths) < 1 or widths != sorted(set(widths)):
        raise argparse.ArgumentTypeError(
            f"expected at least two increasing widths ≥ 1 such as 64,128,256, got {text!r}"
        )
    return widths


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plstar certify`` and its options."""
    parser = add_command(commands, "certify", SUMMARY, run)
    add_problem_options(
        parser, seed_use="the data subset, weights and directions", hessian_outputs=4,
        hessian_help="Outputs examined for ‖H_F‖ at each point (0 = all).",
        samples_help=f"default: {DEFAULT_SAMPLES} of the digits, every sample of a --data file",
    )  # fmt: skip
    group = parser.add_argument_group("certificate")
    group.add_argument("--directions", type=integer(0), default=2, metavar="COUNT",
                       help="Random directions sampled (besides the gradient, the λ_min-descent "
                       "path and the segment toward 0).")  # fmt: skip
    group.add_argument("--widths", type=widths_list, metavar="W1,W2,...",
                       help="Certify at each width (the default MLP's width, replacing --width; "
                       "or factory(width) with --model) and fit the bracket against width.")  # fmt: skip
    group.add_argument("--json", type=Path, dest="json_path", metavar="FILE",
                       help="Also write every figure to this JSON file.")  # fmt: skip
    group.add_argument("--figure", type=Path, metavar="FILE.png",
                       help="Also draw λ_min(K(w)) along each direction (and the fit) here.")  # fmt: skip


def run(args: argparse.Namespace) -> None:
    """Check every option, then certify; Ctrl-C ends with what was written."""
    check_problem_options(args)
    for path, option in ((args.json_path, "--json"), (args.figure, "--figure")):
        if path is not None:
            report.check_output_file(path, option)
    if args.samples is None and args.data is None:
        args.samples = DEFAULT_SAMPLES
    started = time.perf_counter()
    dataset = load_problem(args)
    console.print(f"[bold]data[/]  {dataset.description}")
    widths = args.widths or [None]
    results: list[dict[str, Any]] = []
    try:
        with Progress(
            TextColumn("{task.description}"), BarColumn(),
            TextColumn("{task.completed:.0f}/{task.total:.0f}"), TimeElapsedColumn(),
            console=console, transient=True,
        ) as bars:  # fmt: skip
            for width in widths:
                net = build_model(args, dataset, width)
                label = "" if width is None else f"width {width}: "
                console.print(f"[bold]model[/] {label}{describe_model(net)}")
                results.append(_certify_one(args, dataset, net, width, ProgressBars(bars)))
                console.print(_table(results[-1]))
                for line in results[-1]["verdict"]:
                    console.print(f"• {line}")
    except KeyboardInterrupt:
        done = f"{len(results)} of {len(widths)} widths were measured; " if args.widths else ""
        if results and args.json_path is not None:  # the widths finished are kept
            _write_json(args, dataset, results, None, time.perf_counter() - started)
            raise Interrupted(f"{done}they were written to {args.json_path}") from None
        raise Interrupted(f"{done}nothing was written") from None
    fit = _fit(results) if args.widths else None
    if fit is not None:
        for line in fit["verdict"]:
            console.print(f"• {line}")
    elapsed = time.perf_counter() - started
    console.print(f"[dim]done in {elapsed:.1f} s[/]")
    if args.json_path is not None:
        _write_json(args, dataset, results, fit, elapsed)
        console.print(f"wrote {args.json_path}")
    if args.figure is not None:
        from plstar.plots import plot_region

        plot_region(results, fit, args.figure)
        console.print(f"wrote {args.figure}")


def _write_json(
    args: argparse.Namespace, dataset: Any, results: list[dict[str, Any]],
    fit: dict[str, Any] | None, seconds: float,
) -> None:  # fmt: skip
    payload = {"results": results, "fit": fit, "config": _config(args, dataset),
               "versions": versions(), "seconds": seconds}  # fmt: skip
    report.write_json(args.json_path, json_safe(payload))


def _certify_one(
    args: argparse.Namespace, dataset: Any, net: torch.nn.Module, width: int | None,
    progress: ProgressBars,
) -> dict[str, Any]:  # fmt: skip
    """One model's certificate (:func:`plstar.region.certify_region`) as a JSON-ready dict."""
    found = certify_region(
        net, dataset.x, dataset.y, directions=args.directions,
        hessian_outputs=hessian_outputs(args), seed=args.seed, memory_budget=args.memory_budget,
        output=output_selector(args), progress=progress,
    )  # fmt: skip
    return {"width": width, **found.to_dict()}


def _fit(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Both ends of the bracket fitted as power laws of the width (:func:`fit_crossover`), with
    the width where each reaches the median R (β at w₀), in words."""
    widths = [r["width"] for r in results]
    radius = float(np.median([r["radius"] for r in results]))
    fit: dict[str, Any] = {"median_radius": radius, "verdict": []}
    for end, meaning in (("upper", "no point refuting PL* inside R"),
                         ("lower", "Hessian control covering R")):  # fmt: skip
        values = [_number(r[end]) for r in results]
        line = fit_crossover(widths, values, radius)
        fit[end] = None if line is None else asdict(line)
        if line is None:
            text = f"the {end} bound is finite at fewer than 2 widths: no fit"
        elif line.slope <= 0:
            text = (
                f"the {end} bound does not grow with width (slope {line.slope:.2f}): no crossover"
            )
        else:
            error = "" if line.slope_error is None else f" ± {line.slope_error:.2f}"
            span = (" (two widths: no error estimate)" if line.slope_error is None else
                    " (the slope is within 1 s.e. of 0)" if line.width_range is None else
                    f" (range {line.width_range[0]:.3g}–{line.width_range[1]:.3g} from ±1 s.e.)")  # fmt: skip
            text = (f"{meaning}: the {end} bound grows like width^{line.slope:.2f}{error} and "
                    f"reaches the median R (β at w₀) = {radius:.3g} at width ≈ {line.width:.3g}"
                    f"{span}")  # fmt: skip
        fit["verdict"].append(text)
    return fit


def _number(value: Any) -> float:
    """A JSON-safe figure back as a float ("inf" and None are infinite: no crossing found)."""
    return math.inf if value is None or isinstance(value, str) else float(value)


def _table(result: dict[str, Any]) -> Table:
    table = Table(show_header=True, header_style="bold")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("λ₀ = λ_min(K(w₀)); μ = λ₀/2", f"{result['lambda0']:.4g}; {result['mu']:.4g}"),
        ("L₀", f"{result['loss0']:.4g}"),
        ("β at w₀; largest on the ball", f"{result['beta_w0']:.4g}; {result['beta_ball']:.4g}"),
        (
            "GD radius R = 2√(2βL₀)/μ, β at w₀; on the ball",
            f"{result['radius']:.4g}; {result['radius_ball']:.4g}",
        ),
        ("largest ‖H_F‖ found (ε)", f"{result['hessian_norm']:.4g}"),
        ("PL* region ≥ (Hessian control)", f"{result['lower']:.4g}"),
        ("PL* region ≤ (nearest crossing)", f"{result['upper']:.4g}"),
    ]
    for crossing in result["region"]["crossings"]:
        rows.append((f"   crossing along {crossing['name']}", str(crossing["distance"])))
    for name, value in rows:
        table.add_row(name, value)
    return table


def _config(args: argparse.Namespace, dataset: Any) -> dict[str, Any]:
    return {
        "data": dataset.description, "model_source": args.model or "mlp", "width": args.width,
        "widths": args.widths, "depth": args.depth, "activation": args.activation,
        "seed": args.seed, "dtype": args.dtype, "device": str(problem_device(args)),
        "directions": args.directions,
        "hessian_outputs": args.hessian_outputs,
        "output": "default" if args.output is None else args.output.text,
    }  # fmt: skip
