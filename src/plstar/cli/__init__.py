"""The ``plstar`` command: thin wiring of data, models and the core to a terminal.

One module per sub-command registers itself on the shared typer ``app`` (``cli/common.py``).
"""

from __future__ import annotations

import typer

from plstar.cli import analyze, reproduce, train  # noqa: F401  (registers the sub-commands)
from plstar.cli.common import app, errors
from plstar.errors import PlstarInputError

__all__ = ["app", "main"]


@app.callback()
def _root() -> None:
    """plstar: tangent kernels, spectra and PL* certificates for PyTorch models."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: bad input ends with a one-line message and exit code 2, Ctrl-C with 130."""
    try:
        app(args=argv, standalone_mode=False)
    except PlstarInputError as error:
        errors.print(f"[bold red]error:[/] {error}")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        errors.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
    except typer.Exit as done:
        raise SystemExit(done.exit_code) from None
    except Exception as error:  # click's own usage errors carry their exit code
        import click

        if isinstance(error, click.ClickException):
            error.show()
            raise SystemExit(error.exit_code) from None
        if isinstance(error, click.exceptions.Abort):
            errors.print("[yellow]interrupted[/]")
            raise SystemExit(130) from None
        raise


if __name__ == "__main__":
    main()
