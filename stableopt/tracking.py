"""Fixed-budget tracking of λ_max of a changing operator: ``opt.monitor(loss_fn, every=1, budget=b)``.

A full measurement (:meth:`stableopt.Adam.sharpness`) solves to a tolerance, 5–20 Hessian-vector
products warm. Tracking spends at most ``b`` products per step and instead *continues one
iteration across training steps*, the way central flows (Cohen, Damian et al. 2024) follow the
top eigenvectors with a warm-started eigensolver: the operator A_t = P_t^{-1/2}·H_t·P_t^{-1/2}
changes slowly from step to step, so the previous step's iterate is an excellent start.

Each step t (:meth:`Tracker.step`):

1. b Lanczos steps on the *current* operator A_t from the carried unit vector x_t
   (:func:`stableopt.krylov.tridiagonalize`): A_t·Q = Q·T + β_b·q'·e_bᵀ.
2. The estimate is the top Ritz pair (θ_t, y_t = Q·s) of T, with the residual bound
   ρ_t = β_b·|s_b|/|θ_t|, both exact for A_t: θ_t ≤ λ_max(A_t) (a Rayleigh quotient), and some
   eigenvalue of A_t lies within ρ_t·|θ_t| of θ_t (whether it is the top one depends, as for
   every Krylov method, on the iteration having found it).
3. The next start x_{t+1} is the top Ritz vector of T extended by the next Lanczos direction q':
   the (b+1)×(b+1) matrix [[T, β_b·e_b], [β_b·e_bᵀ, α']] whose only unknown entry is
   α' ≈ q'ᵀ·A·q'. Without it a one-product step could never leave span{x_t} (the Ritz vector of
   a one-dimensional Krylov space is its start); with it, b = 1 is Rayleigh-quotient ascent with a
   line search and b > 1 is Lanczos restarted every b steps with one extrapolated step. α' is
   learnt from the data as a gap g = θ − α': the next step's first product gives the Rayleigh
   quotient of x_{t+1} exactly, which fixes the one unknown of its predicted value. The
   observation mixes in how much the operator moved between the steps, so it is used only when
   x_{t+1} moved far enough along q' (weight ≥ ``LEARN_MIN_WEIGHT``), and g changes by at most a
   factor ``GAP_FACTOR`` per step: a gap learnt too small would send the next start far along a
   direction the iteration knows little about (the estimate dropped from 1e-5 to 46% error in one
   step on a drifting test spectrum before this bound). Initially g = θ − α_b (the last Lanczos
   α) for b > 1 and g = β for b = 1, and g is never above 2|θ| + β (``GAP_SCALE``): the gap is
   absolute, so when the operator jumps (on the benchmark MLP a loss spike took λ_max from
   50,000 to 37,000 and the curvature along the old top direction to 5,000) a gap learnt before
   the jump is many times the new θ, the steps along q' too short to learn a new one, and b = 1
   stayed lost for the rest of the run.

Errors therefore come only from the iteration not having converged (yet, or after the operator
moved); the trade against full measurements every N steps is measured in benchmarks/tracking.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .krylov import tridiagonalize
from .linear_operator import LinearOperator

__all__ = ["TrackEstimate", "Tracker", "track"]

#: α' is learnt from a step only when the start moved at least this far along q' (squared
#: coefficient): below it the observation is dominated by how much the operator moved
LEARN_MIN_WEIGHT = 1e-2
#: the learnt gap θ − α' changes by at most this factor per step (see the module docs)
GAP_FACTOR = 2.0
#: the gap is at most GAP_SCALE·|θ| + β (see the module docs): the spectrum of a Hessian-like
#: operator rarely reaches further below θ than 2|θ| (its most negative eigenvalues are smaller
#: than its top one), and a direction coupled to the iterate by β has eigenvalues within β
GAP_SCALE = 2.0
#: seed of the tracker's private generator for its first (random) start
TRACK_SEED = 20240101


@dataclass(frozen=True)
class TrackEstimate:
    """One tracking step: the estimate ``value`` (top Ritz value on the current operator), its
    relative residual bound ``residual``, the products ``hvps`` (≤ the budget), and whether the
    iteration started from a random vector (``cold``)."""

    value: float
    residual: float
    hvps: int
    cold: bool


class Tracker:
    """Follows the top eigenpair of a slowly changing symmetric operator with ``budget`` products
    per call of :meth:`step` (see the module docs). Knows only the
    :class:`~stableopt.linear_operator.LinearOperator` interface.

    Example:
        >>> from stableopt import DenseOperator
        >>> A = torch.diag(torch.linspace(0.0, 1.0, 50, dtype=torch.float64))
        >>> op = DenseOperator(lambda x: A @ x, 50, torch.float64, torch.device("cpu"))
        >>> tracker = Tracker(2, generator=torch.Generator().manual_seed(0))
        >>> for _ in range(60):
        ...     est = tracker.step(op)
        >>> est.hvps, round(est.value, 4)
        (2, 1.0)
    """

    def __init__(self, budget: int, *, generator: torch.Generator | None = None) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive integer (Hessian-vector products per step), got {budget!r}")
        self.budget = budget
        self.generator = generator if generator is not None else torch.Generator().manual_seed(TRACK_SEED)
        self.x: Tensor | None = None
        self._gap: float | None = None  # the learnt θ − α'
        self._pending: tuple[float, float, float] | None = None  # (RQ of x without α', weight of α', θ)

    def reset(self) -> None:
        """Start the next step from a random vector."""
        self.x, self._gap, self._pending = None, None, None

    def step(self, op: LinearOperator) -> TrackEstimate:
        """Spend at most ``budget`` products of ``op`` (this step's operator); see the module docs."""
        cold = self.x is None or self.x.numel() != op.local_size
        if cold:
            self.reset()
            x = op.random(self.generator)
        else:
            x = self.x.to(dtype=op.dtype, device=op.device)  # type: ignore[union-attr]
        t = tridiagonalize(op, x, self.budget)
        if not t.finite:
            self.reset()
            return TrackEstimate(math.nan, math.nan, t.steps, cold)
        m = t.steps
        theta, S = torch.linalg.eigh(t.matrix())
        top, s = float(theta[-1]), S[:, -1]
        beta = float(t.betas[-1])
        residual = beta * abs(float(s[-1])) / max(abs(top), 1e-300)
        if self._pending is not None and self._gap is not None:  # α_1 is x's Rayleigh quotient
            base, weight, theta_then = self._pending
            if weight >= LEARN_MIN_WEIGHT:
                seen = theta_then - (float(t.alphas[0]) - base) / weight
                self._gap = min(max(seen, self._gap / GAP_FACTOR), self._gap * GAP_FACTOR)
        self._pending = None
        y = t.basis.T @ s.to(t.basis.dtype)
        if t.next is None:  # the Krylov space is invariant: y is an eigenvector
            self.x = y / op.norm(y)
        else:
            self.x = self._extend(t, top, beta, op)
        return TrackEstimate(top, residual, m, cold)

    def _extend(self, t: Any, top: float, beta: float, op: LinearOperator) -> Tensor:
        """The top Ritz vector of T extended by q' (module docs, step 3)."""
        m = t.steps
        if self._gap is None or not math.isfinite(self._gap):
            self._gap = top - float(t.alphas[-1]) if m > 1 else beta
        self._gap = min(self._gap, GAP_SCALE * abs(top) + beta)
        self._gap = max(self._gap, 1e-12 * max(abs(top), 1e-300))
        T = t.matrix()
        M = torch.zeros((m + 1, m + 1), dtype=torch.float64)
        M[:m, :m] = T
        M[m - 1, m] = M[m, m - 1] = beta
        M[m, m] = top - self._gap
        c = torch.linalg.eigh(M)[1][:, -1]
        cq = c[:m]
        self._pending = (float(cq @ T @ cq + 2 * c[m - 1] * c[m] * beta), float(c[m] ** 2), top)
        x = t.basis.T @ cq.to(t.basis.dtype) + float(c[m]) * t.next
        return x / op.norm(x)


def track(
    optimizer: Any,
    loss_fn: Callable[..., Tensor],
    tracker: Tracker,
    *,
    batches: Iterable[Any] | None = None,
    hvp: str = "auto",
    tol: float = 1e-3,
    key: str = "track",
) -> Any:
    """One tracking step of ``optimizer``'s λ_max(P⁻¹H) (its ratio operator when the param groups'
    thresholds differ), recorded in ``optimizer.history``'s tracking table. The carried vector
    lives in ``optimizer.warm_starts[key]`` (so it travels in the state dict).

    Returns:
        A :class:`~stableopt.SharpnessReport` of the estimate (``converged``: residual ≤ ``tol``;
        not passed to measurement hooks: the guard and the measurements table see only full
        measurements).
    """
    from .sharpness import SharpnessReport, common_threshold
    from .thresholds import edge_ratio, unstable_threshold

    t0 = time.perf_counter()
    groups = optimizer._sharpness_groups()
    common = common_threshold(groups)
    low = unstable_threshold(float(g.threshold) for g in groups if len(g.params))
    if low is not None:  # a threshold <= 0: ratio +inf; track λ_max(P⁻¹H) (the ratio's D is not real)
        common = low
    warm = optimizer.warm_starts
    if tracker.x is None and key in warm:
        tracker.x = warm[key][0].clone()
    with optimizer.measure(loss_fn, batches=batches, hvp=hvp) as m:
        op = m.operator("preconditioned" if math.isfinite(common) else "ratio")  # τ <= 0 is finite
        est = tracker.step(op) if math.isfinite(m.loss) else TrackEstimate(math.nan, math.nan, 0, True)
        hvps = m.products
        seconds = m.agree_seconds(time.perf_counter() - t0)
    if tracker.x is not None:
        warm[key] = tracker.x.detach().clone()[None]
    pre, ratio = (est.value, edge_ratio(est.value, common)) if math.isfinite(common) else (math.nan, est.value)
    step = optimizer.steps_taken
    optimizer.history.append_track(step, pre, ratio, est.residual, hvps)
    return SharpnessReport(
        step=step,
        preconditioned=pre,
        threshold=common,
        ratio=ratio,
        raw=None,
        eigenvalues=(pre,),
        hvps=hvps,
        residual=est.residual,
        converged=bool(est.residual <= tol),
        seconds=seconds,
        thresholds=tuple(float(g.threshold) for g in groups),
        loss=m.loss,
        dtype=str(m.space.dtype).replace("torch.", ""),
        hvp_backend=m.backend,
    )
