"""Stability thresholds of the update rules: the largest stable eigenvalue of P⁻¹H.

Linear stability on a quadratic f(θ) = ½ θᵀHθ with the preconditioner P frozen: substituting
u = P^{1/2} θ decouples the dynamics into the eigendirections of P⁻¹H, each of which evolves on
its own with a scalar eigenvalue ``a``. A rule is stable iff ``a`` lies below the threshold
returned here (Cohen et al. 2022, arXiv:2207.14484, Appendix; see docs/science.md).

Every function takes the learning rate ``lr`` (η) first and returns the threshold on ``a`` as a
Python float (``inf`` for η = 0: a group that does not move cannot become unstable). The tests check each formula by running the torch optimizer itself on
f = ½·a·x² with P held fixed: it converges at 0.98× the threshold and diverges at 1.02×.

**Thresholds ≤ 0.** AdamW's threshold (1 + β1)(2 − ηλ)/((1 − β1)η) is 0 at ηλ = 2 and negative
beyond: the decoupled decay alone, θ ← (1 − ηλ)θ, is then at or past its own stability limit
(|1 − ηλ| ≥ 1), so the update is unstable along every direction of curvature ≥ τ — every flat
direction included, whatever λ_max. :func:`edge_ratio`, which every ratio of stableopt goes
through (sharpness, per-block, tracking, directional, secant, report), makes such a ratio
``+inf`` rather than dividing by τ (a ``ZeroDivisionError``, or a negative ratio that would read
"below the edge"), and the lr guard cuts on it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = [
    "adam_threshold",
    "edge_ratio",
    "gd_threshold",
    "heavy_ball_threshold",
    "nesterov_threshold",
    "rmsprop_threshold",
    "sgd_threshold",
    "unstable_threshold",
]


def edge_ratio(value: float, threshold: float) -> float:
    """``value / threshold``, the dimensionless edge ratio (1 = the edge); ``+inf`` for a
    threshold ≤ 0, an update rule unstable at any curvature (see the module docstring), and 0
    for an infinite one (η = 0) with a finite ``value``; NaN for a NaN threshold.

    >>> edge_ratio(19.0, 38.0), edge_ratio(0.15, 0.0), edge_ratio(0.15, -19.0), edge_ratio(5.0, math.inf)
    (0.5, inf, inf, 0.0)
    """
    value, threshold = float(value), float(threshold)
    if threshold <= 0.0:
        return math.inf
    if threshold == math.inf and math.isfinite(value):
        return 0.0
    return value / threshold if threshold > 0.0 else math.nan


def unstable_threshold(thresholds: Iterable[float]) -> float | None:
    """The lowest of ``thresholds`` when it is ≤ 0 (the ratio is then ``+inf``), else None.

    >>> unstable_threshold([38.0, 0.0, -19.0]), unstable_threshold([38.0, math.nan])
    (-19.0, None)
    """
    return min((float(t) for t in thresholds if float(t) <= 0.0), default=None)


def _check_lr(lr: float) -> float:
    lr = float(lr)
    if not (lr >= 0.0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a non-negative finite number, got {lr!r}")
    return lr


def _over_lr(numerator: float, lr: float) -> float:
    """numerator/η, with η = 0 (a frozen group) mapped to an infinite threshold."""
    return math.inf if lr == 0.0 else numerator / lr


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(f"{name} must lie in [0, 1), got {value!r}")
    return value


def gd_threshold(lr: float) -> float:
    """Threshold of (preconditioned) gradient descent: ``2/η``.

    Characteristic polynomial z − (1 − ηa); stable iff |1 − ηa| < 1.

    >>> gd_threshold(0.5)
    4.0
    """
    return _over_lr(2.0, _check_lr(lr))


def heavy_ball_threshold(lr: float, momentum: float) -> float:
    """Threshold of heavy-ball momentum ``buf ← μ·buf + g; θ ← θ − η·buf``: ``(2 + 2μ)/η``.

    Characteristic polynomial z² − (1 + μ − ηa)z + μ; the root crosses z = −1 at ηa = 2 + 2μ.

    >>> round(heavy_ball_threshold(0.1, 0.9), 9)
    38.0
    """
    mu = _check_unit("momentum", momentum)
    return _over_lr(2.0 + 2.0 * mu, _check_lr(lr))


def nesterov_threshold(lr: float, momentum: float) -> float:
    """Threshold of torch's Nesterov SGD ``buf ← μ·buf + g; θ ← θ − η(g + μ·buf)``.

    Characteristic polynomial z² − (1 + μ − ηa(1 + μ))z + μ(1 − ηa); the root crosses z = −1 at
    ηa = (2 + 2μ)/(1 + 2μ).

    >>> round(nesterov_threshold(1.0, 0.5), 12)
    1.5
    """
    mu = _check_unit("momentum", momentum)
    return _over_lr((2.0 + 2.0 * mu) / (1.0 + 2.0 * mu), _check_lr(lr))


def sgd_threshold(lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """Threshold of ``torch.optim.SGD`` with its momentum options (P = I).

    Dampening d scales the gradient entering the buffer by (1 − d), i.e. the effective step
    is η(1 − d) once the buffer is initialised; torch's first step (buf = g) is a transient.

    >>> sgd_threshold(0.5)
    4.0
    >>> round(sgd_threshold(0.1, momentum=0.9, dampening=0.5), 10)
    76.0
    """
    mu = _check_unit("momentum", momentum)
    d = float(dampening)
    if not (0.0 <= d < 1.0):
        raise ValueError(f"dampening must lie in [0, 1) for a finite threshold, got {d!r}")
    if mu == 0.0:
        return gd_threshold(lr)
    if nesterov:
        return nesterov_threshold(lr, mu)  # torch requires dampening == 0 with nesterov
    return heavy_ball_threshold(lr, mu) / (1.0 - d)


def rmsprop_threshold(lr: float, momentum: float = 0.0) -> float:
    """Threshold of ``torch.optim.RMSprop`` on P⁻¹H: ``2/η``, or ``(2 + 2μ)/η`` with momentum.

    torch's RMSprop momentum is heavy ball on the preconditioned gradient
    (``buf ← μ·buf + g/P; θ ← θ − η·buf``), so the heavy-ball polynomial applies.

    >>> rmsprop_threshold(1e-2)
    200.0
    """
    mu = float(momentum)
    return gd_threshold(lr) if mu == 0.0 else heavy_ball_threshold(lr, mu)


def adam_threshold(lr: float, beta1: float = 0.9, *, weight_decay: float = 0.0, decoupled: bool = False) -> float:
    """Threshold of Adam/AdamW on P⁻¹H once bias correction has faded.

    EMA momentum ``m ← β1·m + (1 − β1)g``; with decoupled weight decay λ (AdamW) the update
    also multiplies θ by (1 − ηλ). Characteristic polynomial
    z² − (1 + β1 − ηλ − η(1 − β1)a)z + β1(1 − ηλ), giving

    * Adam: (2 + 2β1)/((1 − β1)η) — 38/η at β1 = 0.9;
    * AdamW: (1 + β1)(2 − ηλ)/((1 − β1)η).

    Coupled weight decay (Adam ``weight_decay``) does not change the threshold; it shifts the
    Hessian to H + λI instead (see :mod:`stableopt.sharpness`).

    >>> round(adam_threshold(1e-3), 9)
    38000.0
    >>> round(adam_threshold(1e-3, 0.99), 6)
    398000.0
    """
    lr = _check_lr(lr)
    b1 = _check_unit("beta1", beta1)
    wd = float(weight_decay)
    if wd < 0.0 or not math.isfinite(wd):
        raise ValueError(f"weight_decay must be a non-negative finite number, got {wd!r}")
    if not decoupled or wd == 0.0:
        return _over_lr((2.0 + 2.0 * b1) / (1.0 - b1), lr)
    return _over_lr((1.0 + b1) * (2.0 - lr * wd) / (1.0 - b1), lr)
