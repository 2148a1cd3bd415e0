"""The ``plstar`` parser: one argparse tree, option types that name the option, shared options.

Usage errors are one line on stderr and exit code 2 (no usage block), so a mistyped option reads
like every other refusal of bad input. Every long option is spelled so that it is not a prefix of
one of torchrun's options: torchrun's own parser classifies every argument, including those after
``-m plstar``, and stops at an abbreviation of two of its options (``--n`` matches ``--nnodes`` and
``--nproc-per-node``). ``--n`` is still accepted, outside torchrun, for older scripts.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from plstar.cli.outputs import output_spec
from plstar.data import SCALINGS
from plstar.models import ACTIVATIONS, PARAMETERIZATIONS

DTYPES = ("float32", "float64")
LEGACY_SAMPLES_OPTION = "--n"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (``prog: error: message``), exit 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {' '.join(message.split())}\n")
        raise SystemExit(2)


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to help texts that do not state their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        silent = default is None or default is False or default == argparse.SUPPRESS
        silent = silent or "(default" in text or "default:" in text
        return text if silent else f"{text} (default: %(default)s)"


def add_command(
    commands: argparse._SubParsersAction, name: str, summary: str, run: Callable[[Any], None]
) -> Parser:
    """A sub-command's parser; ``run(args)`` is what ``plstar NAME`` executes."""
    parser = commands.add_parser(
        name, help=summary, description=summary, formatter_class=HelpFormatter,
        allow_abbrev=False,
    )  # fmt: skip
    parser.set_defaults(run=run)
    return parser


def _refuse(text: str) -> NoReturn:
    raise argparse.ArgumentTypeError(text)


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An option type: an integer in ``minimum..maximum``; the message says which range."""
    wanted = f"an integer ≥ {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            _refuse(f"expected {wanted}, got {text!r}")
        if value < minimum or (maximum is not None and value > maximum):
            _refuse(f"expected {wanted}, got {text!r}")
        return value

    return parse


def finite_number(*, strict: bool) -> Callable[[str], float]:
    """An option type: a finite number > 0 (``strict``) or ≥ 0; NaN, ±inf and the rest refused."""
    wanted = f"a finite number {'>' if strict else '≥'} 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            _refuse(f"expected {wanted}, got {text!r}")
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            _refuse(f"expected {wanted}, got {text!r}")
        return value

    return parse


positive_number = finite_number(strict=True)
non_negative_number = finite_number(strict=False)


def learning_rate(text: str) -> str | float:
    """An option type: 'theory' or a finite step size > 0."""
    if text == "theory":
        return text
    try:
        return positive_number(text)
    except argparse.ArgumentTypeError:
        _refuse(f"expected 'theory' or a finite number > 0, got {text!r}")


_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def memory_size(text: str) -> int:
    """An option type: '2GiB', '500MB', '1e9' -> bytes (at least one)."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        _refuse(f"cannot read memory size {text!r}; write e.g. 2GiB, 500MB or 1e9")
    try:
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        _refuse(f"cannot read memory size {text!r}; write e.g. 2GiB, 500MB or 1e9")
    if not (math.isfinite(size) and size >= 1):
        _refuse(f"memory size must be at least 1 byte and finite, got {text!r}")
    return int(size)


DEVICE_HELP = (
    "cpu, cuda, cuda:N or auto (default: the first CUDA device when there is one, else the CPU). "
    "The model and data are moved there and every tensor plstar computes lives there."
)

# One upper bound that numpy's, torch's and Python's generators all accept.
SEED_MAX = 2**32 - 1


def add_problem_options(
    parser: argparse.ArgumentParser, *, seed_use: str, hessian_outputs: int | None = None,
    hessian_help: str = "", samples_help: str = "default: all",
) -> None:  # fmt: skip
    """The data and model options every measuring command shares (analyze, train, certify,
    landscape); --hessian-outputs only where ``hessian_outputs`` gives its default (a command
    that measures no ‖H_F‖ has no such option, rather than one it would ignore)."""
    group = parser.add_argument_group("data and model")
    group.add_argument(
        "-n", "--samples", LEGACY_SAMPLES_OPTION, dest="samples", type=integer(1), metavar="N",
        help=f"Number of samples ({samples_help}; a seeded random subset of a --data file). "
        "--n is the old spelling: it works, except under torchrun, which misreads it.",
    )  # fmt: skip
    group.add_argument("--width", type=integer(1), default=512,
                       help="Hidden width of the default MLP.")  # fmt: skip
    group.add_argument("--depth", type=integer(1), default=3,
                       help="Linear layers of the default MLP.")  # fmt: skip
    group.add_argument("--activation", choices=ACTIVATIONS, default="tanh",
                       help="Activation of the default MLP.")  # fmt: skip
    group.add_argument("--parameterization", choices=PARAMETERIZATIONS, default="ntk",
                       help="Weight parameterization of the MLP.")  # fmt: skip
    group.add_argument(
        "--outputs", type=int, choices=(1, 10),
        help="Digits targets: 1 = ±1 parity (the default), 10 = centred one-hot. Not with --data: "
        "a file's y gives the outputs.",
    )  # fmt: skip
    group.add_argument("--seed", type=integer(0, SEED_MAX), default=0,
                       help=f"Seed for {seed_use} (also seeds a --model factory).")  # fmt: skip
    group.add_argument("--dtype", choices=DTYPES, default="float64",
                       help="Dtype the model runs in (spectra are float64).")  # fmt: skip
    group.add_argument("--device", default="auto", metavar="DEVICE", help=DEVICE_HELP)
    group.add_argument("--data", type=Path, metavar="FILE",
                       help=".npz (x, y), .csv (target = last column) or .pt file.")  # fmt: skip
    group.add_argument("--target", metavar="COLUMN",
                       help="CSV column to use as target (with --data FILE.csv).")  # fmt: skip
    group.add_argument("--scaling", choices=("auto", *SCALINGS), default="auto",
                       help="Input scaling; auto = sphere for digits, none for files.")  # fmt: skip
    group.add_argument("--model", metavar="FILE.py:FACTORY",
                       help="FILE.py:factory returning an nn.Module.")  # fmt: skip
    group.add_argument(
        "--output", type=output_spec, metavar="SPEC",
        help="Which returned value is F: a key path such as logits, logits:last (also :first, "
        ":mean, along dim 1) or 0 (a tuple's first), or FILE.py:function called on what the "
        "model returns (default: a tensor itself, else logits, else the first tensor).",
    )  # fmt: skip
    if hessian_outputs is not None:
        group.add_argument("--hessian-outputs", type=integer(0), default=hessian_outputs,
                           metavar="COUNT", help=hessian_help)  # fmt: skip
    group.add_argument(
        "--memory-budget", type=memory_size, metavar="SIZE",
        help="Working memory, e.g. 2GiB (default: ¼ of physical RAM, at most 2 GiB).",
    )  # fmt: skip


def build_parser(register: list[Callable[[argparse._SubParsersAction], None]]) -> Parser:
    """The ``plstar`` parser; each function in ``register`` adds one sub-command."""
    import plstar

    parser = Parser(
        prog="plstar", formatter_class=HelpFormatter, allow_abbrev=False,
        description="Measure and certify the PL* landscape of over-parameterized models "
        "(Liu, Zhu & Belkin, arXiv 2003.00307).",
        epilog="Run 'plstar COMMAND --help' for a command's options.",
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"plstar {plstar.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for add in register:
        add(commands)
    return parser


def parse(parser: Parser, argv: list[str] | None) -> argparse.Namespace | None:
    """The parsed command line, or None when no command was given (the caller prints the help).

    Unknown options are reported by the sub-command they were given to, as argparse's usage
    errors are: ``plstar analyze: error: unrecognized arguments: --bogus``.
    """
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        if extras:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return None
    if extras:
        chooser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        chooser.choices[args.command].error(
            f"unrecognized arguments: {' '.join(extras)} (see plstar {args.command} --help)"
        )
    return args
