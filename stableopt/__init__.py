"""stableopt: PyTorch optimizers that measure their own (adaptive) edge of stability.

Replace ``torch.optim.Adam`` with ``stableopt.Adam`` and nothing changes until you call
``opt.sharpness(loss_fn)``, which measures λ_max(P⁻¹H) of the preconditioned Hessian and its
ratio to the stability threshold of the update rule (Cohen et al. 2022, arXiv:2207.14484).
"""

from . import distributed, loggers
from .eigen import LanczosResult, lanczos
from .guard import LRGuard
from .history import GuardEvent, History
from .hvp import hessian_vector_product, make_hvp
from .monitor import Monitor
from .optimizers import SGD, Adam, AdamW, RMSprop, StabilityMixin
from .plot import plot_history
from .report import render_report
from .sharpness import SharpnessGroup, SharpnessReport, estimate_sharpness
from .thresholds import (
    adam_threshold,
    gd_threshold,
    heavy_ball_threshold,
    nesterov_threshold,
    rmsprop_threshold,
    sgd_threshold,
)

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "GuardEvent",
    "History",
    "LRGuard",
    "LanczosResult",
    "Monitor",
    "RMSprop",
    "SharpnessGroup",
    "SharpnessReport",
    "StabilityMixin",
    "__version__",
    "adam_threshold",
    "distributed",
    "estimate_sharpness",
    "gd_threshold",
    "hessian_vector_product",
    "heavy_ball_threshold",
    "lanczos",
    "loggers",
    "make_hvp",
    "nesterov_threshold",
    "plot_history",
    "render_report",
    "rmsprop_threshold",
    "sgd_threshold",
]
