"""The ``plstar`` command: thin wiring of data, models and the core to a terminal.

One argparse parser (:mod:`plstar.cli.options`), one module per sub-command, each adding its
parser with ``register``. Exit codes: 0 done; 1 a failed check of ``reproduce``, a write that
failed, or an ``analyze`` whose β or ‖H_F‖ failed (the other figures printed and written); 2 bad
input (one line on stderr, before any computation where it can be known then); 130 Ctrl-C (one
line on stderr saying what was kept).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import warnings
from collections.abc import Iterator

from plstar.cli import analyze, certify, landscape, reproduce, train
from plstar.cli.common import Incomplete, Interrupted, say_error
from plstar.cli.options import build_parser, parse
from plstar.errors import PlstarInputError

__all__ = ["command_parser", "main"]


def command_parser() -> argparse.ArgumentParser:
    """The whole ``plstar`` parser, every sub-command with its options."""
    return build_parser(
        [analyze.register, certify.register, landscape.register, train.register, reproduce.register]
    )


def _one_line_warning(message: Warning | str, *_: object, **__: object) -> None:
    say_error(f"warning: {message}")


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Python's warnings print two lines (message and source line); a terminal user needs one."""
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        yield


def _finish(text: str, code: int) -> None:
    """Print the last line and exit; a further Ctrl-C cannot cut the line in half."""
    # Signal handlers can be changed from the main thread only (tests call main from others).
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
    try:
        say_error(text)
    finally:
        if previous is not None:  # None: a handler installed outside Python, left as it was
            signal.signal(signal.SIGINT, previous)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``plstar`` and ``python -m plstar``; ``argv`` defaults to ``sys.argv[1:]``.

    Returns on success; otherwise raises SystemExit with the codes of the module docstring. A bare
    ``plstar`` prints the help and exits 0.
    """
    parser = command_parser()
    prog = "plstar"
    try:
        args = parse(parser, argv)
        if args is None:
            parser.print_help()
            return
        prog = f"plstar {args.command}"  # as in the parser's own usage errors
        with _one_line_warnings():
            args.run(args)
    except Interrupted as stop:
        _finish(f"{prog}: interrupted: {stop}", 130)
    except Incomplete as partial:
        _finish(f"{prog}: incomplete: {partial}", 1)
    except KeyboardInterrupt:
        _finish(f"{prog}: interrupted: nothing was written", 130)
    except PlstarInputError as error:
        _finish(f"{prog}: error: {error}", 2)
    except OSError as error:  # a disk that filled up or vanished while writing results
        _finish(f"{prog}: error: {error}", 1)


if __name__ == "__main__":
    main()
