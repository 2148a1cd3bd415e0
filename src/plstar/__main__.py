"""The ``plstar`` command and ``python -m plstar``: load the command line, then run it.

Loading torch takes seconds; a Ctrl-C meanwhile ends like every other Ctrl-C of plstar (one line,
exit code 130) instead of a traceback.
"""

from __future__ import annotations

import sys


def main() -> None:
    """Entry point of the ``plstar`` console script."""
    try:
        from plstar.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("plstar: interrupted: nothing was written\n")
        raise SystemExit(130) from None
    run()


if __name__ == "__main__":
    main()
