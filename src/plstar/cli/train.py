"""``plstar train``: GD/SGD with the theory's step size under the Monitor.

The results folder (--out) is touched only once the run starts for real, at its first step:
every refusal (options, data, model, the theory's own refusals at w₀) and a Ctrl-C during w₀'s
measurements leave it exactly as it was. Then the earlier run's files are removed before anything
is written, so the folder never mixes two runs. ``--tensorboard DIR`` adds an event file of the
monitor's records to DIR (TensorBoard keeps one file per run, so earlier runs stay beside it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import IO, Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

import plstar
from plstar import report
from plstar.cli.common import (
    Interrupted,
    build_model,
    check_problem_options,
    console,
    hessian_outputs,
    interrupts_deferred,
    load_problem,
    output_selector,
    versions,
)
from plstar.cli.options import (
    add_command,
    add_problem_options,
    integer,
    learning_rate,
    positive_number,
)
from plstar.data import Dataset
from plstar.errors import PlstarInputError
from plstar.models import describe_model
from plstar.tensorboard_log import summary_writer_class
from plstar.train import check_arguments

RESULT_FILES = ("metrics.jsonl", "config.json", "summary.json", "training.png")
SUMMARY = "Train with the theory's step size, watching L, ρ, λ_min(K), drift and distance."


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plstar train`` and its options."""
    parser = add_command(commands, "train", SUMMARY, run)
    add_problem_options(
        parser, seed_use="the data subset, weights, batches and solvers", hessian_outputs=4,
        hessian_help="Outputs examined for ‖H_F‖ (SGD's per-sample β; 0 = all).",
    )  # fmt: skip
    group = parser.add_argument_group("training")
    group.add_argument("--method", choices=("gd", "sgd"), default="gd",
                       help="gd (full batch) or sgd (mini-batches).")  # fmt: skip
    group.add_argument("--steps", type=integer(1), default=500, help="Optimizer steps.")
    group.add_argument("--lr", type=learning_rate, default="theory", metavar="theory|ETA",
                       help="'theory' (GD 1/β, SGD η*(b)) or a step size > 0.")  # fmt: skip
    group.add_argument("--batch-size", type=integer(1), metavar="B",
                       help="SGD batch size (default min(n, 32)).")  # fmt: skip
    group.add_argument("--every", type=integer(1), default=100, metavar="STEPS",
                       help="Steps between kernel and sharpness measurements.")  # fmt: skip
    group.add_argument("--kernel-samples", type=integer(1), default=256, metavar="COUNT",
                       help="Fixed subsample for the monitored kernel.")  # fmt: skip
    group.add_argument("--eps", type=positive_number, metavar="LOSS",
                       help="PL*_ε target loss (default 1e-6·L₀).")  # fmt: skip
    group.add_argument(
        "--out", type=Path, default=Path("plstar-train"), metavar="DIR",
        help="Folder for metrics.jsonl, config.json, summary.json, training.png; an earlier "
        "run's files there are replaced once training starts.",
    )  # fmt: skip
    group.add_argument(
        "--tensorboard", type=Path, metavar="DIR",
        help="Also write the monitor's records as TensorBoard scalars (plstar/loss, ...) and the "
        "figure to an event file in DIR (needs the tensorboard package).",
    )  # fmt: skip


class _RunFolder:
    """The results folder of one run, prepared at its first step (module docstring).

    Monitor records arrive through :meth:`record`: buffered until the first step, then each is
    one JSON line, flushed at once, so an interrupted or killed run leaves every line complete.
    """

    def __init__(self, out: Path, config: dict[str, Any], tensorboard: Path | None = None) -> None:
        self.out, self.config, self.tensorboard = out, config, tensorboard
        self.monitor: plstar.Monitor | None = None  # closed with the folder (its TensorBoard log)
        self.pending: list[str] = []
        self.handle: IO[str] | None = None
        self.cleared = False
        self.lines = 0
        self.written: list[str] = []

    def record(self, record: plstar.Record) -> None:
        self.pending.append(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        if record.step >= 1:
            self.start()

    def start(self) -> None:
        """Clear the earlier run's files, write config.json, flush the records so far."""
        if not self.cleared:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in RESULT_FILES:
                (self.out / name).unlink(missing_ok=True)
            self.cleared = True
        if self.handle is None:
            report.write_json(self.out / "config.json", self.config)
            self.written.append("config.json")
            self.handle = (self.out / "metrics.jsonl").open("w", encoding="utf-8")
        while self.pending:
            with interrupts_deferred():  # a line cut between write and pop would be written twice
                self.handle.write(self.pending[0])
                self.handle.flush()
                self.pending.pop(0)
                self.lines += 1

    def finish(self, summary: dict[str, Any], monitor: plstar.Monitor, title: str) -> None:
        """Close metrics.jsonl; write summary.json, then training.png."""
        self.start()
        assert self.handle is not None
        self.handle.close()
        report.write_json(self.out / "summary.json", summary)
        self.written.append("summary.json")
        monitor.plot(self.out / "training.png", title=title)
        self.written.append("training.png")
        monitor.close(title=title)

    def close(self) -> None:
        """Close metrics.jsonl and the monitor's TensorBoard log (flushed, whatever ended the run)."""
        if self.handle is not None:
            self.handle.close()
        if self.monitor is not None:
            self.monitor.close()

    def kept(self) -> str:
        """What is in the folder now, for the line that ends an interrupted run."""
        if not self.cleared:
            return f"nothing was written ({self.out} untouched)"
        if self.lines == 0:
            return f"nothing was written (the earlier run's files in {self.out} were removed)"
        text = f"steps 0–{self.lines - 1} kept in {self.out / 'metrics.jsonl'}"
        if self.tensorboard is not None:
            text += f" and as TensorBoard events in {self.tensorboard}"
        final = [name for name in ("summary.json", "training.png") if name in self.written]
        return f"{text}; {' and '.join(final)} written" if final else f"{text}; no summary written"


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


def run(args: argparse.Namespace) -> None:
    """Check everything that can be checked, train, then write the summary and the figure."""
    check_problem_options(args)
    if args.batch_size is not None and args.method != "sgd":
        raise PlstarInputError("--batch-size applies to --method sgd; GD uses all samples")
    report.check_output_folder(args.out, "--out", RESULT_FILES)
    if args.tensorboard is not None:
        report.check_output_folder(args.tensorboard, "--tensorboard")
        summary_writer_class()  # the package is there, before any computation
    started = time.perf_counter()
    dataset = load_problem(args)
    if args.batch_size is not None and args.batch_size > dataset.n:
        raise PlstarInputError(
            f"--batch-size {args.batch_size} exceeds the n = {dataset.n} samples; give at most "
            f"{dataset.n}"
        )
    net = build_model(args, dataset)
    # Every option was checked above under its own name; this only guards against drift.
    check_arguments(args.method, args.steps, args.lr, args.batch_size, dataset.n, args.eps,
                    args.every)  # fmt: skip
    console.print(f"[bold]data[/]  {dataset.description}")
    console.print(
        f"[bold]model[/] {describe_model(net)} ({args.model or args.parameterization + ' MLP'})"
    )
    config = {
        "command": "train", "data": dataset.description, "scaling": dataset.scaling,
        "model": describe_model(net), "model_source": args.model or "mlp", "width": args.width,
        "depth": args.depth, "activation": args.activation,
        "parameterization": args.parameterization, "outputs": dataset.k, "n": dataset.n,
        "seed": args.seed, "dtype": args.dtype, "device": str(dataset.x.device),
        "method": args.method, "steps": args.steps,
        "lr": args.lr, "batch_size": args.batch_size, "every": args.every,
        "kernel_samples": args.kernel_samples, "eps": args.eps,
        "hessian_outputs": args.hessian_outputs,
        "output": "default" if args.output is None else args.output.text,
        "tensorboard": None if args.tensorboard is None else str(args.tensorboard),
        "versions": versions(),
    }  # fmt: skip
    folder = _RunFolder(args.out, config, args.tensorboard)
    try:
        _train_and_report(args, dataset, net, folder, started)
    except KeyboardInterrupt:
        raise Interrupted(folder.kept()) from None
    finally:
        folder.close()


def _train_and_report(
    args: argparse.Namespace, dataset: Dataset, net: nn.Module, folder: _RunFolder, started: float
) -> None:
    """Monitor and train (Ctrl-C ends the steps, not the command), then write and print."""
    result, monitor, interrupted = None, None, False
    output = output_selector(args)
    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TextColumn("{task.fields[live]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    try:
        with Progress(*columns, console=console, transient=True) as bars:
            setup = bars.add_task("w₀: μ = λ_min(K), β", total=1, live="")
            monitor = plstar.Monitor(
                net, dataset.x, dataset.y, every=args.every, kernel_samples=args.kernel_samples,
                seed=args.seed, memory_budget=args.memory_budget, on_record=folder.record,
                output=output, tensorboard=args.tensorboard,
            )  # fmt: skip
            folder.monitor = monitor
            bars.update(setup, visible=False)
            task = bars.add_task("train", total=args.steps, live="")

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
                net, dataset.x, dataset.y, method=args.method, steps=args.steps, lr=args.lr,
                batch_size=args.batch_size, monitor=monitor, eps=args.eps,
                hessian_outputs=hessian_outputs(args), seed=args.seed,
                memory_budget=args.memory_budget, progress=live, output=output,
            )  # fmt: skip
    except plstar.TrainingInterrupted as stop:
        result, interrupted = stop.result, True
    except KeyboardInterrupt:
        interrupted = True
    if result is None or monitor is None or (interrupted and result.steps == 0):
        raise Interrupted(folder.kept())  # stopped before the first step: no run to summarize
    summary: dict[str, Any] = {
        "interrupted": interrupted,
        "result": result.to_dict(),
        "monitor": {k: v for k, v in monitor.to_dict().items() if k != "history"},
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    title = f"plstar train: {dataset.name}, {describe_model(net)}"
    folder.finish(summary, monitor, title)
    console.print(_train_table(result, monitor))
    for line in result.verdict + result.events:
        console.print(f"• {line}")
    if interrupted:
        raise Interrupted(folder.kept())
    files = ", ".join(["metrics.jsonl", *folder.written])  # what is on disk, nothing more
    console.print(f"wrote {args.out}/{files} ({time.perf_counter() - started:.1f} s)")
    if args.tensorboard is not None:
        console.print(
            f"TensorBoard: the records and the figure are in {args.tensorboard} "
            f"(view with tensorboard --logdir {args.tensorboard})"
        )
