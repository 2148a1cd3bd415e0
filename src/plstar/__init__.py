"""plstar: measure and certify the PL* optimization landscape of over-parameterized models.

Theory: Liu, Zhu & Belkin, *Loss landscapes and optimization in over-parameterized non-linear
systems and neural networks* (arXiv 2003.00307). Conventions: docs/conventions in README.md.
"""

from plstar import distributed, theory
from plstar.certify import BallPoint, Certificate, certify
from plstar.conditions import Analysis, analyze, pl_ratio
from plstar.curvature import (
    EigenEstimate,
    HessianNorm,
    loss_gradient,
    loss_sharpness,
    model_hessian_norm,
)
from plstar.errors import DataError, IllDefinedModelError, PlstarInputError
from plstar.functional import FunctionalModel, jacobian_rows, make_functional
from plstar.infinite_width import infinite_width_nngp, infinite_width_ntk
from plstar.kernel import tangent_kernel
from plstar.matrix_free import KernelOperator, kernel_operator
from plstar.monitor import Monitor, Record
from plstar.planning import KernelPlan, default_memory_budget, plan_kernel
from plstar.spectrum import LanczosResult, Spectrum, lanczos, spectrum
from plstar.train import TrainingInterrupted, TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "Analysis",
    "BallPoint",
    "Certificate",
    "DataError",
    "EigenEstimate",
    "FunctionalModel",
    "HessianNorm",
    "IllDefinedModelError",
    "KernelOperator",
    "KernelPlan",
    "LanczosResult",
    "Monitor",
    "PlstarInputError",
    "Record",
    "Spectrum",
    "TrainResult",
    "TrainingInterrupted",
    "__version__",
    "analyze",
    "certify",
    "default_memory_budget",
    "distributed",
    "infinite_width_nngp",
    "infinite_width_ntk",
    "jacobian_rows",
    "kernel_operator",
    "lanczos",
    "loss_gradient",
    "loss_sharpness",
    "make_functional",
    "model_hessian_norm",
    "pl_ratio",
    "plan_kernel",
    "spectrum",
    "tangent_kernel",
    "theory",
    "train",
]
