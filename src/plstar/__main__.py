"""``python -m plstar`` is the ``plstar`` command."""

from plstar.cli import main

main()
