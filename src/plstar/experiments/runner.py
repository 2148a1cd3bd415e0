"""Runs experiments through the contract of ``base.py``: configurations, runs, summary, figures."""

from __future__ import annotations

import time
from types import ModuleType

from plstar.experiments import EXPERIMENTS, load
from plstar.experiments.base import ExperimentResult, Run
from plstar.functional import ProgressCallback


def result_of(module: ModuleType, number: int, runs: list[Run], seconds: float) -> ExperimentResult:
    """Summarize finished runs of one experiment into its result (data and checks)."""
    data, checks = module.summarize(runs)
    return ExperimentResult(
        number=number, name=EXPERIMENTS[number], title=module.TITLE, claim=module.CLAIM,
        data=data, checks=checks, runs=runs, seconds=seconds,
    )  # fmt: skip


def evaluate(
    number: int, *, quick: bool = True, seeds: int = 1, progress: ProgressCallback | None = None
) -> ExperimentResult:
    """Run every configuration of experiment ``number`` in this process, nothing written to disk."""
    module = load(number)
    started = time.perf_counter()
    runs = []
    for config in module.configurations(quick, seeds):
        t0 = time.perf_counter()
        data = module.run_configuration(config, progress)
        runs.append(Run(config, data, time.perf_counter() - t0))
    return result_of(module, number, runs, time.perf_counter() - started)
