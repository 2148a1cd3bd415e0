"""One module per claim of Liu, Zhu & Belkin that ``plstar reproduce`` measures (see ``base.py``)."""

from __future__ import annotations

import importlib
from types import ModuleType

# number -> module name; the order of the paper's list in issue 5 / docs/reproduction.md.
EXPERIMENTS: dict[int, str] = {
    1: "transition_to_linearity",
    2: "kernel_along_path",
    3: "linear_convergence",
    4: "over_under_parameterized",
    5: "non_convexity",
    6: "sgd",
    7: "pl_eps",
    8: "nonlinear_output",
    9: "random_systems",
    10: "infinite_width",
    11: "pl_region",
}


def load(number: int) -> ModuleType:
    """The experiment module with this number."""
    return importlib.import_module(f"plstar.experiments.{EXPERIMENTS[number]}")
