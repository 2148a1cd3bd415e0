"""plstar: measure and certify the PL* optimization landscape of over-parameterized models.

Theory: Liu, Zhu & Belkin, *Loss landscapes and optimization in over-parameterized non-linear
systems and neural networks* (arXiv 2003.00307). Conventions: docs/conventions in README.md.

The public names below load on first use (PEP 562): ``import plstar`` does not import torch, so
the ``plstar`` command can answer ``--help`` and take a Ctrl-C cleanly while torch loads.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC: dict[str, str] = {
    "BallPoint": "plstar.certify",
    "Certificate": "plstar.certify",
    "certify": "plstar.certify",
    "Analysis": "plstar.conditions",
    "analyze": "plstar.conditions",
    "pl_ratio": "plstar.conditions",
    "EigenEstimate": "plstar.curvature",
    "HessianNorm": "plstar.curvature",
    "loss_gradient": "plstar.curvature",
    "loss_hessian_min": "plstar.curvature",
    "loss_sharpness": "plstar.curvature",
    "model_hessian_norm": "plstar.curvature",
    "Direction": "plstar.directions",
    "make_directions": "plstar.directions",
    "DataError": "plstar.errors",
    "IllDefinedModelError": "plstar.errors",
    "PlstarInputError": "plstar.errors",
    "FunctionalModel": "plstar.functional",
    "jacobian_rows": "plstar.functional",
    "make_functional": "plstar.functional",
    "LayerRule": "plstar.factors",
    "RULES": "plstar.layer_rules",
    "register_rule": "plstar.layer_rules",
    "infinite_width_nngp": "plstar.infinite_width",
    "infinite_width_ntk": "plstar.infinite_width",
    "tangent_kernel": "plstar.kernel",
    "landscape": "plstar.landscape",
    "Landscape": "plstar.landscape_results",
    "LandscapeGrid": "plstar.landscape_results",
    "LanczosResult": "plstar.lanczos",
    "lanczos": "plstar.lanczos",
    "KernelOperator": "plstar.matrix_free",
    "kernel_operator": "plstar.matrix_free",
    "Monitor": "plstar.monitor",
    "Record": "plstar.monitor",
    "KernelPlan": "plstar.planning",
    "default_memory_budget": "plstar.planning",
    "plan_kernel": "plstar.planning",
    "Spectrum": "plstar.spectrum",
    "spectrum": "plstar.spectrum",
    "TrainingInterrupted": "plstar.train",
    "TrainResult": "plstar.train",
    "train": "plstar.train",
}
_SUBMODULES = ("distributed", "theory")

__all__ = sorted([*_PUBLIC, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"plstar.{name}")
    elif name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
    else:
        raise AttributeError(f"module 'plstar' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return __all__


class _Package(types.ModuleType):
    """The package object. Importing a submodule binds it on its package, and five public
    functions share their module's name (certify, landscape, lanczos, spectrum, train): the
    function wins, as ``plstar.spectrum(K)`` must work whatever was imported before."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from plstar import distributed, theory  # noqa: F401
    from plstar.certify import BallPoint, Certificate, certify  # noqa: F401
    from plstar.conditions import Analysis, analyze, pl_ratio  # noqa: F401
    from plstar.curvature import (  # noqa: F401
        EigenEstimate,
        HessianNorm,
        loss_gradient,
        loss_hessian_min,
        loss_sharpness,
        model_hessian_norm,
    )
    from plstar.directions import Direction, make_directions  # noqa: F401
    from plstar.errors import DataError, IllDefinedModelError, PlstarInputError  # noqa: F401
    from plstar.factors import LayerRule  # noqa: F401
    from plstar.functional import FunctionalModel, jacobian_rows, make_functional  # noqa: F401
    from plstar.infinite_width import infinite_width_nngp, infinite_width_ntk  # noqa: F401
    from plstar.kernel import tangent_kernel  # noqa: F401
    from plstar.lanczos import LanczosResult, lanczos  # noqa: F401
    from plstar.landscape import landscape  # noqa: F401
    from plstar.landscape_results import Landscape, LandscapeGrid  # noqa: F401
    from plstar.layer_rules import register_rule  # noqa: F401
    from plstar.matrix_free import KernelOperator, kernel_operator  # noqa: F401
    from plstar.monitor import Monitor, Record  # noqa: F401
    from plstar.planning import KernelPlan, default_memory_budget, plan_kernel  # noqa: F401
    from plstar.spectrum import Spectrum, spectrum  # noqa: F401
    from plstar.train import TrainingInterrupted, TrainResult, train  # noqa: F401
