"""``plstar reproduce``: every claim of the paper, measured, checked and drawn.

Thin wiring of :func:`plstar.experiments.runner.reproduce` (runs, store, resume, pool) and
:mod:`plstar.experiments.report_files` (report.html, report.md, results.json, PNGs) to a terminal.
Exit codes: 0 every check passed; 1 a check failed or a run raised (after the report is written);
2 bad input; 130 Ctrl-C (after the report of what finished is written, unless Ctrl-C came again).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import time
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from plstar import report
from plstar.cli.common import Interrupted, console, say_error, versions
from plstar.cli.options import DEVICE_HELP, add_command, integer
from plstar.devices import resolve_device
from plstar.errors import PlstarInputError
from plstar.experiments import runner
from plstar.experiments.base import ExperimentResult
from plstar.experiments.report_files import write_report
from plstar.experiments.runner import OVERALL, RUN_PREFIX, check_request, worker_threads

REPORT_FILES = ("report.html", "report.md", "results.json")
SUMMARY = "Reproduce the paper's claims: run, check, draw and report every experiment."


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``plstar reproduce`` and its options."""
    parser = add_command(commands, "reproduce", SUMMARY, run)
    parser.add_argument("--quick", action="store_true",
                        help="The CPU-minutes configurations (the test suite's).")  # fmt: skip
    parser.add_argument("--only", metavar="1,3,5",
                        help="Experiment numbers, e.g. 1,3,5 (default: all).")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=Path("plstar-reproduce"), metavar="DIR",
        help="Folder for report.html, report.md, results.json, figures/ and runs/.",
    )  # fmt: skip
    parser.add_argument("--seeds", type=integer(1), metavar="COUNT",
                        help="Seeds per configuration (default 1 with --quick, else 3).")  # fmt: skip
    parser.add_argument("--resume", action="store_true",
                        help="Reuse the finished runs stored in --out.")  # fmt: skip
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    parser.add_argument("--jobs", type=integer(1), default=1, metavar="COUNT",
                        help="Configurations run side by side in this many processes.")  # fmt: skip


def parse_numbers(text: str | None) -> list[int] | None:
    """'1,3,5' (spaces allowed) -> [1, 3, 5]; None -> None; PlstarInputError otherwise."""
    if text is None:
        return None
    try:
        numbers = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise PlstarInputError(
            f"--only takes experiment numbers like 1,3,5; got {text!r}"
        ) from None
    if not numbers:
        raise PlstarInputError(f"--only takes experiment numbers like 1,3,5; got {text!r}")
    return numbers


class _Bars:
    """Progress phases of the runner -> rich bars: overall, one per experiment, the current run."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: float, total: float) -> None:
        if phase.startswith(RUN_PREFIX):
            key, description = "current run", f"  {phase[len(RUN_PREFIX) :]}"
        else:
            key, description = phase, ("all experiments" if phase == OVERALL else phase)
        if key not in self.tasks:
            self.tasks[key] = self.bars.add_task(description, total=total)
        self.bars.update(self.tasks[key], completed=done, total=total, description=description)


def _announce(result: ExperimentResult) -> None:
    evidence = result.evidence
    controls = [c for c in result.checks if c.control]
    passed = sum(c.passed for c in evidence)
    mark = "[green]✓[/]" if result.passed else "[bold red]✗[/]"
    also = (f" + {sum(c.passed for c in controls)}/{len(controls)} controls" if controls
            else "")  # fmt: skip
    console.print(
        f"{mark} {result.number}. {result.title}: {passed}/{len(evidence)} checks passed{also} "
        f"({result.seconds:.1f} s of compute)"
    )
    for check in result.checks:
        if not check.passed:
            console.print(
                f"    [red]FAILED[/] {check.name}: {check.measured} (expected {check.expected})"
            )


def _command(args: argparse.Namespace, seeds: int) -> str:
    """The command line that reproduces this report (options spelled out, defaults included)."""
    words = ["plstar", "reproduce"] + (["--quick"] if args.quick else [])
    words += ["--only", args.only] if args.only else []
    words += ["--out", str(args.out), "--seeds", str(seeds), "--jobs", str(args.jobs)]
    words += ["--device", args.device] if args.device != "auto" else []
    return shlex.join(words + (["--resume"] if args.resume else []))


def run(args: argparse.Namespace) -> None:
    """Check the options and --out, run, write the report; Ctrl-C keeps every finished run."""
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    numbers = check_request(parse_numbers(args.only), seeds, args.jobs)
    device = resolve_device(args.device)
    out = report.check_output_folder(args.out, "--out", REPORT_FILES)
    for name in ("runs", "figures"):
        if (out / name).exists() and not (out / name).is_dir():
            raise PlstarInputError(f"--out {out}: {out / name} is a file where a folder goes")
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "command": _command(args, seeds),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "seeds": seeds, "jobs": args.jobs, "resume": args.resume,
        "threads": worker_threads(args.jobs), "experiments": numbers, "versions": versions(),
        "device": str(device),
    }  # fmt: skip
    console.print(
        f"[bold]plstar reproduce[/] experiments {', '.join(map(str, numbers))}; "
        f"{'quick' if args.quick else 'full'}, {seeds} seed(s), {args.jobs} job(s) → {out}"
    )
    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )  # fmt: skip
    unreported = (
        f"the report was not written; finished runs are in {out / 'runs'} (--resume reuses them)"
    )
    try:
        with Progress(*columns, console=console, transient=True) as bars:
            outcome = runner.reproduce(
                numbers, out=out, quick=args.quick, seeds=seeds, resume=args.resume,
                jobs=args.jobs, progress=_Bars(bars), on_result=_announce, device=str(device),
            )  # fmt: skip
        meta["wall_seconds"] = time.perf_counter() - started
        written = write_report(out, outcome, meta)
    except KeyboardInterrupt:
        raise Interrupted(unreported) from None
    try:
        _finish(out, outcome, written)
    except KeyboardInterrupt:
        raise Interrupted(f"the report is in {out / 'report.html'}") from None


def _finish(out: Path, outcome: runner.Reproduction, written: dict[str, Path]) -> None:
    figures = sum(1 for name in written if name.startswith("figures/"))
    console.print(
        f"wrote {out}/report.html, report.md, results.json and {figures} figure(s) "
        f"({outcome.computed} runs computed, {outcome.reused} reused, {outcome.seconds:.1f} s)"
    )
    for number, (done, total) in sorted(outcome.incomplete.items()):
        console.print(
            f"[yellow]experiment {number} not finished:[/] {done} of {total} runs on disk"
        )
    if outcome.interrupted:
        raise Interrupted(
            f"finished runs are in {out / 'runs'} and reported in {out / 'report.html'}; "
            "run again with --resume to continue"
        )
    for text in outcome.failures:
        say_error(f"error: {text}")
    if not outcome.passed:
        for result, check in outcome.failed_checks:
            say_error(
                f"FAILED {result.number}. {result.title} — {check.name}: "
                f"measured {check.measured}, expected {check.expected}"
            )
        raise SystemExit(1)
    total = sum(len(r.checks) for r in outcome.results)
    evidence = sum(len(r.evidence) for r in outcome.results)
    console.print(
        f"[green]all {total} checks passed ({evidence} evidence for the claims, "
        f"{total - evidence} controls)[/]"
    )
