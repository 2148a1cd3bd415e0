"""What every ``plstar`` command shares: consoles, option checks, data and model set-up, progress.

Options are checked in two steps, both before any computation: their own values by the parser's
types (:mod:`plstar.cli.options`), combinations here (:func:`check_problem_options`); a --samples
count against the data's size right after loading (:func:`load_problem`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

import plstar
from plstar.data import DIGITS_SIZE, Dataset, load_digits, load_file
from plstar.devices import HOST, host_permutation, resolve_device
from plstar.errors import PlstarInputError
from plstar.models import load_model_factory, mlp

# soft_wrap: long lines (paths, verdicts) stay whole instead of breaking at 80 columns off a tty.
console = Console(soft_wrap=True)


class Interrupted(Exception):  # noqa: N818  (a stop, not an error)
    """Ctrl-C, caught by a command; the message says what was kept (printed after "interrupted: ")."""


class Incomplete(Exception):  # noqa: N818  (a partial result, printed and written)
    """A command whose late stage failed after its other results were printed and written:
    one line on stderr (after "incomplete: ") and exit code 1."""


def say_error(text: str) -> None:
    """One line on stderr, whatever the terminal width and whatever newlines ``text`` holds."""
    sys.stderr.write(" ".join(text.split()) + "\n")
    sys.stderr.flush()


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C inside the block takes effect as it ends, so the block is done whole (a line
    written and counted once). Only the main thread can set signal handlers; elsewhere (tests
    calling ``main``) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:  # None: a handler installed outside Python; Python's own is the nearest
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if caught:
        raise KeyboardInterrupt


def problem_device(args: argparse.Namespace) -> torch.device:
    """--device resolved (:func:`plstar.devices.resolve_device`; PlstarInputError when absent). With
    --distributed the data and model are built on the host and each rank moves them to its own
    device (NCCL: cuda:LOCAL_RANK; gloo: the CPU), so --device must stay auto there."""
    if getattr(args, "distributed", False):
        if args.device != "auto":
            raise PlstarInputError(
                "--device with --distributed: each rank computes on its own device (NCCL: "
                "cuda:LOCAL_RANK, gloo: the CPU); omit --device"
            )
        return HOST
    return resolve_device(args.device)


def check_problem_options(args: argparse.Namespace) -> None:
    """Refuse option combinations that would be silently ignored, and a --device that does not
    exist here (PlstarInputError, option named)."""
    problem_device(args)
    if args.data is not None and args.outputs is not None:
        raise PlstarInputError(
            "--outputs applies to the digits only; with --data the file's y gives the outputs "
            "(drop --outputs)"
        )
    if args.target is not None and args.data is None:
        raise PlstarInputError("--target names a column of a --data FILE.csv; give --data too")
    if args.target is not None and args.data.suffix.lower() != ".csv":
        raise PlstarInputError(
            f"--target applies to .csv files only; {args.data.name} stores y separately"
        )


def torch_dtype(args: argparse.Namespace) -> torch.dtype:
    """The --dtype option as a torch dtype."""
    return {"float32": torch.float32, "float64": torch.float64}[args.dtype]


def load_problem(args: argparse.Namespace) -> Dataset:
    """The embedded digits by default, else the --data file (a seeded random subset of
    --samples), on --device. Refuses a --samples count above the data's size, naming both sizes."""
    found = _loaded(args)
    device = problem_device(args)
    return dataclasses.replace(found, x=found.x.to(device), y=found.y.to(device))


def _loaded(args: argparse.Namespace) -> Dataset:
    n, seed, dtype = args.samples, args.seed, torch_dtype(args)
    if args.data is None:
        if n is not None and n > DIGITS_SIZE:
            raise PlstarInputError(
                f"--samples {n} exceeds the {DIGITS_SIZE} digits; give at most {DIGITS_SIZE}"
            )
        scaling = "sphere" if args.scaling == "auto" else args.scaling
        outputs = 1 if args.outputs is None else args.outputs
        return load_digits(n, outputs=outputs, seed=seed, scaling=scaling, dtype=dtype)
    scaling = "none" if args.scaling == "auto" else args.scaling
    dataset = load_file(args.data, target=args.target, scaling=scaling, dtype=dtype)
    if n is not None and n > dataset.n:
        raise PlstarInputError(
            f"--samples {n} exceeds the {dataset.n} samples in {args.data.name}; give at most "
            f"{dataset.n}, or omit --samples to use them all"
        )
    if n is not None and n < dataset.n:
        index = host_permutation(dataset.n, torch.Generator(device=HOST).manual_seed(seed), HOST)[
            :n
        ]
        return Dataset(
            dataset.x[index], dataset.y[index], dataset.name, dataset.scaling,
            f"{dataset.description} (random subset of {n}, seed {seed})",
        )  # fmt: skip
    return dataset


def build_model(
    args: argparse.Namespace, dataset: Dataset, width: int | None = None
) -> torch.nn.Module:
    """The --model factory, called under --seed (as ``factory(width)`` when a width is given), or
    the default MLP of ``width`` (default --width); cast to --dtype and moved to --device. The
    weights are drawn on the host, so a seed gives the same model on every device."""
    dtype, device = torch_dtype(args), problem_device(args)
    if args.model is not None:
        arguments = () if width is None else (width,)
        model = load_model_factory(args.model, seed=args.seed, arguments=arguments)
        return model.to(device, dtype)
    return mlp(
        dataset.d, width or args.width, args.depth, dataset.k, activation=args.activation,
        parameterization=args.parameterization, generator_seed=args.seed, dtype=dtype,
    ).to(device)  # fmt: skip


def output_selector(args: argparse.Namespace) -> Any:
    """--output as the API's ``output=``: None (plstar's default) or a callable; a FILE.py:NAME
    is imported here, after the model was built."""
    return None if args.output is None else args.output.selector()


def hessian_outputs(args: argparse.Namespace) -> int | None:
    """--hessian-outputs as the API takes it: 0 means every output (None)."""
    return args.hessian_outputs or None


class ProgressBars:
    """Adapts core progress callbacks ``(phase, done, total)`` to rich progress bars."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, Any] = {}

    def __call__(self, phase: str, done: float, total: float) -> None:
        if phase not in self.tasks:
            self.tasks[phase] = self.progress.add_task(phase, total=total)
        self.progress.update(self.tasks[phase], completed=done, total=total)


def versions() -> dict[str, str]:
    """Versions of plstar, torch, numpy, scipy and python, for reports and JSON outputs."""
    import numpy
    import scipy

    return {
        "plstar": plstar.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "scipy": scipy.__version__, "python": sys.version.split()[0],
    }  # fmt: skip
