"""``plstar reproduce``: every claim of the paper, measured, checked and drawn.

Thin wiring of :func:`plstar.experiments.runner.reproduce` (runs, store, resume, pool) and
:mod:`plstar.experiments.report_files` (report.html, report.md, results.json, PNGs) to a terminal.
Exit codes: 0 every check passed; 1 a check failed or a run raised (after the report is written);
2 bad input; 130 Ctrl-C (after the report of what finished is written).
"""

from __future__ import annotations

import datetime
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from plstar.cli.common import app, console, errors, versions
from plstar.errors import PlstarInputError
from plstar.experiments import runner
from plstar.experiments.base import ExperimentResult
from plstar.experiments.report_files import write_report
from plstar.experiments.runner import OVERALL, RUN_PREFIX, check_request, worker_threads


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
    passed = sum(c.passed for c in result.checks)
    mark = "[green]✓[/]" if result.passed else "[bold red]✗[/]"
    console.print(
        f"{mark} {result.number}. {result.title}: {passed}/{len(result.checks)} checks passed "
        f"({result.seconds:.1f} s of compute)"
    )
    for check in result.checks:
        if not check.passed:
            console.print(
                f"    [red]FAILED[/] {check.name}: {check.measured} (expected {check.expected})"
            )


def _command(quick: bool, only: str | None, out: Path, seeds: int, resume: bool, jobs: int) -> str:
    """The command line that reproduces this report (options spelled out, defaults included)."""
    words = ["plstar", "reproduce"] + (["--quick"] if quick else [])
    words += ["--only", only] if only else []
    words += ["--out", str(out), "--seeds", str(seeds), "--jobs", str(jobs)]
    return shlex.join(words + (["--resume"] if resume else []))


@app.command()
def reproduce(
    quick: Annotated[bool, typer.Option("--quick", help="The CPU-minutes configurations (the test suite's).")] = False,
    only: Annotated[str | None, typer.Option(help="Experiment numbers, e.g. 1,3,5 (default: all).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for report.html, report.md, results.json, figures/ and runs/.")] = Path("plstar-reproduce"),
    seeds: Annotated[int | None, typer.Option(help="Seeds per configuration (default 1 with --quick, else 3).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Reuse the finished runs stored in --out.")] = False,
    jobs: Annotated[int, typer.Option(help="Configurations run side by side in this many processes.")] = 1,
) -> None:  # fmt: skip
    """Reproduce the paper's claims: run, check, draw and report every experiment."""
    seeds = seeds if seeds is not None else (1 if quick else 3)
    numbers = check_request(parse_numbers(only), seeds, jobs)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "command": _command(quick, only, out, seeds, resume, jobs),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": quick, "seeds": seeds, "jobs": jobs, "resume": resume,
        "threads": worker_threads(jobs), "experiments": numbers, "versions": versions(),
    }  # fmt: skip
    console.print(
        f"[bold]plstar reproduce[/] experiments {', '.join(map(str, numbers))}; "
        f"{'quick' if quick else 'full'}, {seeds} seed(s), {jobs} job(s) → {out}"
    )
    columns = (
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    )  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bars:
        outcome = runner.reproduce(
            numbers, out=out, quick=quick, seeds=seeds, resume=resume, jobs=jobs,
            progress=_Bars(bars), on_result=_announce,
        )  # fmt: skip
    meta["wall_seconds"] = time.perf_counter() - started
    written = write_report(out, outcome, meta)
    for text in outcome.failures:
        errors.print(f"[bold red]error:[/] {text}")
    for number, (done, total) in sorted(outcome.incomplete.items()):
        errors.print(f"[yellow]experiment {number} not finished:[/] {done} of {total} runs on disk")
    figures = sum(1 for name in written if name.startswith("figures/"))
    console.print(
        f"wrote {out}/report.html, report.md, results.json and {figures} figure(s) "
        f"({outcome.computed} runs computed, {outcome.reused} reused, {outcome.seconds:.1f} s)"
    )
    if outcome.interrupted:
        errors.print(
            f"[yellow]interrupted:[/] finished runs are in {out}/runs; "
            "run again with --resume to continue"
        )
        raise SystemExit(130)
    if not outcome.passed:
        for result, check in outcome.failed_checks:
            errors.print(
                f"[bold red]FAILED[/] {result.number}. {result.title} — {check.name}: "
                f"measured {check.measured}, expected {check.expected}"
            )
        raise SystemExit(1)
    console.print(f"[green]all {sum(len(r.checks) for r in outcome.results)} checks passed[/]")
