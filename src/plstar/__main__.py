"""The ``plstar`` command and ``python -m plstar``: load the command line, then run it.

Loading torch, numpy and scipy takes seconds. A Ctrl-C meanwhile must end like every other Ctrl-C
of plstar (one line, exit code 130), but a KeyboardInterrupt raised in the middle of a library's
import can leave it half-initialised and end in an unrelated error; so until the command line is
loaded, Ctrl-C ends the process at once, with nothing written yet to lose.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _stop_while_loading(signum: int, frame: FrameType | None) -> None:
    sys.stderr.write("plstar: interrupted: nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


def main() -> None:
    """Entry point of the ``plstar`` console script."""
    previous = signal.signal(signal.SIGINT, _stop_while_loading)
    try:
        from plstar.cli import main as run
    finally:
        signal.signal(signal.SIGINT, previous)
    run()


if __name__ == "__main__":
    main()
