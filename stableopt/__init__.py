"""stableopt: PyTorch optimizers that measure their own (adaptive) edge of stability.

Replace ``torch.optim.Adam`` with ``stableopt.Adam`` and nothing changes until you call
``opt.sharpness(loss_fn)``, which measures λ_max(P⁻¹H) of the preconditioned Hessian and its
ratio to the stability threshold of the update rule (Cohen et al. 2022, arXiv:2207.14484).
"""

from . import distributed, loggers, rules
from .backends import BACKENDS, BackendChoice
from .blocks import BlockSharpness
from .density import DensityReport
from .density_plot import plot_density
from .directional import DirectionalReport, directional_curvature, estimate_directional_sharpness
from .eigen import LanczosResult, lanczos
from .estimators import estimate_density, estimate_trace
from .finite_difference import make_fd_hvp
from .forward_ad import ForwardADError, make_forward_hvp
from .guard import LRGuard
from .history import GuardEvent, History
from .hvp import DoubleBackwardError, hessian_vector_product, make_hvp
from .linear_operator import DenseOperator, LinearOperator
from .monitor import Monitor
from .operator import BlockOperator, CurvatureOperator, MeasuredGroup, Measurement, measure
from .optimizers import SGD, Adam, AdamW, RMSprop, StabilityMixin
from .plot import plot_history
from .report import render_report
from .rules import StabilityRule
from .sharpness import SharpnessGroup, SharpnessReport, estimate_sharpness
from .space import ParameterSpace
from .thresholds import (
    adam_threshold,
    gd_threshold,
    heavy_ball_threshold,
    nesterov_threshold,
    rmsprop_threshold,
    sgd_threshold,
)
from .trace import TraceReport
from .tracking import Tracker

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SGD",
    "Adam",
    "AdamW",
    "BackendChoice",
    "BlockOperator",
    "BlockSharpness",
    "CurvatureOperator",
    "DenseOperator",
    "DirectionalReport",
    "DensityReport",
    "DoubleBackwardError",
    "ForwardADError",
    "GuardEvent",
    "History",
    "LRGuard",
    "LanczosResult",
    "LinearOperator",
    "MeasuredGroup",
    "Measurement",
    "Monitor",
    "ParameterSpace",
    "RMSprop",
    "SharpnessGroup",
    "SharpnessReport",
    "StabilityMixin",
    "StabilityRule",
    "TraceReport",
    "Tracker",
    "__version__",
    "adam_threshold",
    "directional_curvature",
    "distributed",
    "estimate_directional_sharpness",
    "estimate_density",
    "estimate_sharpness",
    "estimate_trace",
    "gd_threshold",
    "hessian_vector_product",
    "heavy_ball_threshold",
    "lanczos",
    "make_fd_hvp",
    "make_forward_hvp",
    "loggers",
    "make_hvp",
    "measure",
    "nesterov_threshold",
    "plot_density",
    "plot_history",
    "render_report",
    "rmsprop_threshold",
    "rules",
    "sgd_threshold",
]
