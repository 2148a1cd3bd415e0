"""Runs experiments through the contract of ``base.py``: configurations, runs, summary, figures.

* :func:`evaluate` — one experiment in this process, nothing written (the test suite's entry).
* :func:`reproduce` — what ``plstar reproduce`` calls: every finished configuration is written at
  once to a :class:`RunStore` (``DIR/runs/NN-name/<key>.json``, atomically), so that ``resume``
  redoes nothing that finished; configurations run in this process or in a "spawn" process pool;
  Ctrl-C stops cleanly and returns what finished.

A run's key is a stable hash of its JSON configuration, so a changed configuration (other seeds,
quick versus full) never reuses a stale run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import plstar.experiments as registry
from plstar.conditions import json_safe
from plstar.devices import HOST, resolve_device
from plstar.errors import PlstarInputError
from plstar.experiments import common
from plstar.experiments.base import Check, ExperimentResult, Run
from plstar.functional import ProgressCallback
from plstar.report import write_json

OVERALL = "overall"
"""Progress phase counting finished configurations of the whole reproduction."""
RUN_PREFIX = "run: "
"""Prefix of the phases a configuration reports from inside (only when run in this process)."""


def experiment_phase(number: int, title: str) -> str:
    """The progress phase of one experiment (its finished configurations)."""
    return f"{number}. {title}"


def result_of(module: ModuleType, number: int, runs: list[Run], seconds: float) -> ExperimentResult:
    """Summarize finished runs of one experiment into its result (data and checks)."""
    data, checks = module.summarize(runs)
    return ExperimentResult(
        number=number, name=registry.EXPERIMENTS[number], title=module.TITLE, claim=module.CLAIM,
        data=data, checks=checks, runs=runs, seconds=seconds,
    )  # fmt: skip


def _timed(module: ModuleType, config: dict[str, Any], progress: ProgressCallback | None) -> Run:
    started = time.perf_counter()
    data = module.run_configuration(config, progress)
    return Run(config, data, time.perf_counter() - started)


def evaluate(
    number: int, *, quick: bool = True, seeds: int = 1, progress: ProgressCallback | None = None
) -> ExperimentResult:
    """Run every configuration of experiment ``number`` in this process, nothing written to disk."""
    module = registry.load(number)
    started = time.perf_counter()
    runs = [_timed(module, config, progress) for config in module.configurations(quick, seeds)]
    return result_of(module, number, runs, time.perf_counter() - started)


# ----------------------------------------------------------------------------- the store
def config_key(config: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over the canonical JSON of ``config`` (sorted keys, no spaces)."""
    text = json.dumps(json_safe(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back: tuples become lists, NaN and ±inf stay floats."""
    return json.loads(json.dumps(value))


class RunStore:
    """Finished runs on disk: ``root/runs/NN-name/<config_key>.json``, each written atomically.

    A file is trusted only if it parses and holds exactly the configuration asked for; anything
    else (a foreign or damaged file) counts as not finished.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, number: int) -> Path:
        return self.root / "runs" / f"{number:02d}-{registry.EXPERIMENTS[number]}"

    def path(self, number: int, config: dict[str, Any]) -> Path:
        return self.folder(number) / f"{config_key(config)}.json"

    def load(self, number: int, config: dict[str, Any]) -> Run | None:
        """The finished run of ``config``, or None."""
        try:
            stored = json.loads(self.path(number, config).read_text(encoding="utf-8"))
            if stored["config"] != plain(config):
                return None
            return Run(stored["config"], stored["data"], float(stored["seconds"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, number: int, run: Run) -> Run:
        """Write one finished run (temp file + rename: a crash never leaves half a file); return
        it as it reads back, so that a resumed run and a fresh one summarize alike."""
        stored = Run(plain(run.config), plain(run.data), run.seconds)
        payload = {
            "experiment": number, "name": registry.EXPERIMENTS[number],
            "key": config_key(run.config), "config": stored.config, "seconds": run.seconds,
            "data": stored.data,
        }  # fmt: skip
        # Not json_safe: NaN and ±inf are written as the NaN/Infinity that json reads back as floats.
        write_json(self.path(number, run.config), payload)
        return stored

    def clear(self, number: int) -> int:
        """Delete the stored runs of one experiment (only files named like a key); their count."""
        removed = 0
        for path in self.folder(number).glob("*.json") if self.folder(number).is_dir() else []:
            if len(path.stem) == 16 and all(c in "0123456789abcdef" for c in path.stem):
                path.unlink()
                removed += 1
        return removed


# ----------------------------------------------------------------------------- reproduce
@dataclass
class Reproduction:
    """What :func:`reproduce` did. ``results``: the experiments whose configurations all finished,
    summarized; ``incomplete``: number → (finished, total) for the others; ``failures``: errors of
    runs, summaries or imports, in words; ``reused``/``computed``: runs read from the store or run
    now; ``seconds``: wall time."""

    results: list[ExperimentResult] = field(default_factory=list)
    incomplete: dict[int, tuple[int, int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    interrupted: bool = False
    reused: int = 0
    computed: int = 0
    seconds: float = 0.0

    @property
    def failed_checks(self) -> list[tuple[ExperimentResult, Check]]:
        return [(r, c) for r in self.results for c in r.checks if not c.passed]

    @property
    def passed(self) -> bool:
        """Every selected experiment finished, with every check passed and no error."""
        return not (self.interrupted or self.incomplete or self.failures or self.failed_checks)


def check_request(numbers: Sequence[int] | None, seeds: int, jobs: int) -> list[int]:
    """The experiment numbers to run (all when None), or PlstarInputError for an unknown number,
    seeds < 1 or jobs < 1."""
    for name, value in (("seeds", seeds), ("jobs", jobs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlstarInputError(f"{name} must be an integer ≥ 1, got {value!r}")
    chosen = sorted(registry.EXPERIMENTS) if numbers is None else list(dict.fromkeys(numbers))
    unknown = [n for n in chosen if n not in registry.EXPERIMENTS]
    if unknown or not chosen:
        known = ", ".join(str(n) for n in sorted(registry.EXPERIMENTS))
        raise PlstarInputError(
            f"unknown experiment number(s) {unknown or '(none)'}; known: {known}"
        )
    return chosen


def worker_threads(jobs: int) -> int:
    """Torch threads per pool worker: the cores shared out, never above this process's own."""
    import torch

    return max(1, min(torch.get_num_threads(), (os.cpu_count() or 1) // jobs))


def _start_worker(threads: int, device: str) -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it stops the pool); fixed threads; the
    experiments' device."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import torch

    from plstar.experiments import common

    torch.set_num_threads(threads)
    common.DEVICE = torch.device(device)


def _work(module_name: str, config: dict[str, Any]) -> Run:
    """One configuration in a pool worker (module-level, so that "spawn" can pickle it)."""
    import importlib

    return _timed(importlib.import_module(module_name), config, None)


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """End the workers now and drop what has not started. Python < 3.14 has no public call for
    it; the worker list must be read before ``shutdown``, which forgets it."""
    terminate = getattr(pool, "terminate_workers", None)
    if terminate is not None:
        terminate()
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for process in workers:
        process.terminate()
    for process in workers:
        process.join(timeout=10)
    pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Experiment:
    number: int
    module: ModuleType
    configs: list[dict[str, Any]]
    runs: dict[int, Run] = field(default_factory=dict)


def reproduce(
    numbers: Sequence[int] | None = None,
    *,
    out: str | Path,
    quick: bool = False,
    seeds: int = 1,
    resume: bool = False,
    jobs: int = 1,
    progress: ProgressCallback | None = None,
    on_result: Callable[[ExperimentResult], None] | None = None,
    device: str | None = None,
) -> Reproduction:
    """Run the selected experiments (all when ``numbers`` is None), storing each finished run.

    ``resume``: reuse the runs already in ``out`` (without it, the selected experiments' stored
    runs are deleted first and everything is recomputed). ``jobs`` > 1: configurations run in that
    many "spawn" processes, each with :func:`worker_threads` torch threads. ``progress`` gets the
    phases ``OVERALL``, :func:`experiment_phase` and ``RUN_PREFIX + phase`` (in-process runs only);
    ``on_result`` each experiment's result as soon as its last configuration finished.
    ``device`` (default the host): where the experiments compute (problems and networks are made
    on the host and moved there); on another device than the CPU each configuration records it,
    so its stored runs are kept apart from the CPU's.
    Ctrl-C ends the runs in flight and returns with ``interrupted`` set (finished runs stay on
    disk). A run, summary or import that raises is recorded in ``failures`` and the rest goes on.
    Raises PlstarInputError for an unknown number, seeds < 1 or jobs < 1.
    """
    chosen = check_request(numbers, seeds, jobs)
    where = resolve_device(device) if device is not None else HOST
    started = time.perf_counter()
    store, outcome = RunStore(out), Reproduction()
    experiments: list[_Experiment] = []
    for number in chosen:
        try:
            module = registry.load(number)
            configs = module.configurations(quick, seeds)
            if where != HOST:
                configs = [{**config, "device": str(where)} for config in configs]
        except Exception as error:
            outcome.failures.append(f"experiment {number}: cannot load: {_describe(error)}")
            continue
        if not resume:
            store.clear(number)
        experiment = _Experiment(number, module, configs)
        for index, config in enumerate(configs):
            run = store.load(number, config) if resume else None
            if run is not None:
                experiment.runs[index] = run
                outcome.reused += 1
        experiments.append(experiment)
    total = sum(len(e.configs) for e in experiments)
    counts = {"done": sum(len(e.runs) for e in experiments)}

    def report(phase: str, done: float, size: float) -> None:
        if progress is not None:
            progress(phase, done, size)

    def finish(experiment: _Experiment, index: int, run: Run | None, error: str | None) -> None:
        if run is not None:
            experiment.runs[index] = store.save(experiment.number, run)
            outcome.computed += 1
        else:
            config = json.dumps(json_safe(experiment.configs[index]), ensure_ascii=False)
            outcome.failures.append(f"experiment {experiment.number}, {config}: {error}")
        counts["done"] += 1
        report(OVERALL, counts["done"], total)
        _progress_of(experiment, report)
        if len(experiment.runs) == len(experiment.configs):
            _summarize(experiment, outcome, on_result)

    report(OVERALL, counts["done"], total)
    for experiment in experiments:
        _progress_of(experiment, report)
        if len(experiment.runs) == len(experiment.configs):
            _summarize(experiment, outcome, on_result)
    tasks = [(e, i) for e in experiments for i in range(len(e.configs)) if i not in e.runs]
    try:
        if jobs == 1:
            with common.use_device(where):
                _run_here(tasks, report, finish)
        elif tasks:
            _run_pool(tasks, jobs, finish, where)
    except KeyboardInterrupt:
        outcome.interrupted = True
    for experiment in experiments:
        if len(experiment.runs) < len(experiment.configs):
            outcome.incomplete[experiment.number] = (len(experiment.runs), len(experiment.configs))
    outcome.results.sort(key=lambda r: r.number)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _run_here(
    tasks: list[tuple[_Experiment, int]],
    report: ProgressCallback,
    finish: Callable[[_Experiment, int, Run | None, str | None], None],
) -> None:
    """Every task in this process, in order."""
    for experiment, index in tasks:
        try:
            run = _timed(experiment.module, experiment.configs[index], _inner_progress(report))
        except Exception as error:
            finish(experiment, index, None, _describe(error))
        else:
            finish(experiment, index, run, None)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _inner_progress(report: ProgressCallback) -> ProgressCallback:
    def inner(phase: str, done: float, total: float) -> None:
        report(RUN_PREFIX + phase, done, total)

    return inner


def _progress_of(experiment: _Experiment, report: ProgressCallback) -> None:
    phase = experiment_phase(experiment.number, experiment.module.TITLE)
    report(phase, len(experiment.runs), len(experiment.configs))


def _summarize(
    experiment: _Experiment,
    outcome: Reproduction,
    on_result: Callable[[ExperimentResult], None] | None,
) -> None:
    """Summarize an experiment whose runs all finished; runs in configuration order."""
    runs = [experiment.runs[i] for i in range(len(experiment.configs))]
    seconds = sum(r.seconds for r in runs)
    try:
        result = result_of(experiment.module, experiment.number, runs, seconds)
    except Exception as error:
        outcome.failures.append(f"experiment {experiment.number}: summary: {_describe(error)}")
        return
    outcome.results.append(result)
    if on_result is not None:
        on_result(result)


def _run_pool(
    tasks: list[tuple[_Experiment, int]],
    jobs: int,
    finish: Callable[[_Experiment, int, Run | None, str | None], None],
    device: torch.device,
) -> None:
    """Every task in ``jobs`` spawned workers computing on ``device``; ``finish`` is called here,
    in completion order."""
    pool = ProcessPoolExecutor(
        max_workers=jobs, mp_context=get_context("spawn"), initializer=_start_worker,
        initargs=(worker_threads(jobs), str(device)),
    )  # fmt: skip
    pending: dict[Future[Run], tuple[_Experiment, int]] = {}
    try:
        for experiment, index in tasks:
            future = pool.submit(_work, experiment.module.__name__, experiment.configs[index])
            pending[future] = (experiment, index)
        while pending:
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in done:
                experiment, index = pending.pop(future)
                try:
                    run = future.result()
                except Exception as error:
                    finish(experiment, index, None, _describe(error))
                else:
                    finish(experiment, index, run, None)
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)
