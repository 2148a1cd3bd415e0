"""Every experiment of ``plstar reproduce`` in its quick configuration: each claim's checks hold and
each figure renders. Experiment-specific oracles are in tests/test_experiment_<name>.py."""

from __future__ import annotations

import pytest
from conftest import assert_nonblank_pngs, quick_result

from plstar.experiments import EXPERIMENTS, load


@pytest.mark.parametrize("number", sorted(EXPERIMENTS))
def test_quick_configuration_passes_every_check(number: int) -> None:
    result = quick_result(number)
    failing = [c for c in result.checks if not c.passed]
    assert result.checks and not failing, "\n".join(
        f"{c.name}: measured {c.measured}, expected {c.expected}" for c in failing
    )


@pytest.mark.parametrize("number", sorted(EXPERIMENTS))
def test_figures_render_as_nonblank_pngs(number: int) -> None:
    figures = load(number).figures(quick_result(number))
    assert figures
    assert_nonblank_pngs(figures)
