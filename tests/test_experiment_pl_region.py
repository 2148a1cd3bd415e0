"""Experiment 11 (the PL* region against the GD ball): its checks failing where the theory says
they must (a bottlenecked network, whose ‖H_F‖ does not fall with width). The searches it uses
are tested against closed forms in tests/test_region.py."""

from __future__ import annotations

from plstar.experiments import pl_region
from plstar.experiments.base import Run


def test_crossover_is_the_first_width_from_which_r_mu_stays_above_r() -> None:
    widths = [16, 64, 256, 1024]
    assert pl_region.crossover(widths, [1, 5, 3, 9], [4, 4, 4, 4]) == 1024
    assert pl_region.crossover(widths, [1, 5, 6, 9], [4, 4, 4, 4]) == 64
    assert pl_region.crossover(widths, [1, 2, 3, 3], [4, 4, 4, 4]) is None


def test_bottlenecked_network_fails_the_width_checks() -> None:
    """Every path through one scalar unit: ‖H_F‖ does not fall with width, nor does r_μ grow,
    so the experiment's slope checks fail — they can fail."""
    runs = []
    for width in (16, 64, 256, 1024):
        config = {"family": "bottleneck", "width": width, "n": 4, "d": 64, "ball": 8.0,
                  "steps": 100, "seed": 0}  # fmt: skip
        runs.append(Run(config, pl_region.run_configuration(config, None), 0.0))
    _, checks = pl_region.summarize(runs)
    by_name = {c.name.split("] ")[1]: c for c in checks}
    hessian = by_name["log-log slope of sup ‖H_F‖ on B(w₀, r_ball) against width"]
    region = by_name["log-log slope of r_μ against width (PL* region ∝ √m)"]
    assert not hessian.passed and not region.passed, (hessian, region)
    assert len(checks) == 3  # no crossover checks for a family outside CROSSING
