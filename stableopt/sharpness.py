"""Preconditioned sharpness λ_max(P⁻¹H), the edge-of-stability ratio and raw λ_max(H).

P⁻¹H is not symmetric, but it is similar to the symmetric P^{-1/2}·H·P^{-1/2}, which has the same
eigenvalues; Lanczos runs on that (SCIENCE.md). The dimensionless ratio of a model whose param
groups g have thresholds τ_g is

    ratio = λ_max(D^{1/2}·H·D^{1/2}),   D = diag(1/(τ_g·P))   (per coordinate),

so ratio = 1 is the edge for every mix of per-group learning rates and betas; with one threshold
it is λ_max(P⁻¹H)/τ. H here is the Hessian of the objective the optimizer actually descends:
the sign of ``maximize`` applied, plus λI for coupled weight decay λ.

All measurements leave parameters, ``.grad``, RNG streams and module buffers as they were.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, MutableMapping, Sequence

import torch
from torch import Tensor

from . import _precision
from . import distributed as _dist
from ._state import preserved_training_state
from .eigen import LanczosResult, lanczos
from .hvp import HVP, make_hvp

__all__ = ["SharpnessGroup", "SharpnessReport", "estimate_sharpness"]

#: Relative weight of the previous second Ritz vector in a warm start vector. Eigenvalues near
#: the edge crowd (λ2/λ1 → 1) and cross; starting with a sizeable component along the old
#: runner-up lets Lanczos see a crossing instead of locking onto the old top direction.
WARM_MIX = 0.5
#: Minimum Lanczos steps of a warm-started solve, for the same reason: a few Krylov steps are
#: needed before a residual can tell the top eigenpair from a nearby one.
WARM_MIN_ITERS = 4
#: Lanczos stopping rules of a measurement (see :func:`stableopt.eigen.lanczos`). Cold solves
#: (random start) stop on the residual, ‖r‖ ≤ tol·|θ|; warm-started solves on the quadratic
#: estimate ‖r‖²/gap ≤ tol·|θ| ("gap"), which needs fewer Hessian-vector products when the start
#: is already close to the top eigenvector (benchmarks/sharpness.py measures both rules, cold
#: and warm, against tight references).
STOP_BOUND = "residual"
WARM_STOP_BOUND = "gap"
#: Most Lanczos vectors a solve holds at once (thick restart beyond that, see
#: :func:`stableopt.eigen.lanczos`): memory of a measurement is bounded by about this many
#: copies of the parameters, whatever the number of iterations. On the benchmark MLP (656,810
#: parameters) cold solves took 18–22 products with 8 vectors, 16–21 with 12 and 19–21 with 10,
#: and peak memory above training fell from 60 MB (12) to 49 MB (8).
MAX_BASIS = 8


@dataclass(frozen=True)
class SharpnessGroup:
    """One param group as the sharpness estimator sees it.

    Attributes:
        params: the group's parameters that require grad.
        preconditioner: the diagonal P of each parameter (``inf`` for a frozen one).
        threshold: the group's stability threshold τ on P⁻¹H (see :mod:`stableopt.thresholds`).
        sign: −1 when the optimizer maximizes, else +1.
        weight_decay: coupled weight decay λ (adds λI to the Hessian); 0 for decoupled decay.
    """

    params: Sequence[Tensor]
    preconditioner: Sequence[Tensor]
    threshold: float
    sign: float = 1.0
    weight_decay: float = 0.0


@dataclass(frozen=True)
class SharpnessReport:
    """One measurement.

    Attributes:
        step: optimizer steps taken when measured (H at θ_step paired with the P of that step).
        preconditioned: λ_max(P⁻¹H).
        threshold: the stability threshold τ (with groups of different τ, the effective
            ``preconditioned / ratio``).
        ratio: the dimensionless edge ratio (1 = the edge of stability).
        raw: λ_max(H), or None when not asked for.
        eigenvalues: the top ``k`` eigenvalues of P⁻¹H, largest first.
        hvps: Hessian-vector products used.
        residual: the largest relative Ritz residual ‖Ax − θx‖/|θ| among the solves.
        converged: every solve met its tolerance and every value is finite.
        seconds: wall time of the measurement.
        thresholds: τ of each param group.
        loss: the loss at the measured parameters.
        dtype: the floating-point type the Hessian-vector products ran in.
    """

    step: int
    preconditioned: float
    threshold: float
    ratio: float
    raw: float | None
    eigenvalues: tuple[float, ...]
    hvps: int
    residual: float
    converged: bool
    seconds: float
    thresholds: tuple[float, ...] = ()
    loss: float = math.nan
    dtype: str = "float32"

    def __str__(self) -> str:
        raw = "" if self.raw is None else f", raw={self.raw:.6g}"
        return (
            f"step {self.step}: λ_max(P⁻¹H)={self.preconditioned:.6g}, threshold="
            f"{self.threshold:.6g}, ratio={self.ratio:.4f}{raw} ({self.hvps} HVPs, "
            f"{self.seconds:.3f} s{'' if self.converged else ', NOT converged'})"
        )


@dataclass
class _Layout:
    """Flattening of the measured parameters into one vector."""

    params: list[Tensor]
    numels: list[int]
    dtype: torch.dtype
    device: torch.device
    n: int = field(init=False)

    def __post_init__(self) -> None:
        self.n = sum(self.numels)

    def flatten(self, tensors: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        return [c.view_as(p) for c, p in zip(flat.split(self.numels), self.params)]


def _compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _per_coordinate(groups: Sequence[SharpnessGroup], values: Sequence[float], layout: _Layout) -> Tensor:
    return torch.cat(
        [
            torch.full((p.numel(),), float(v), dtype=layout.dtype, device=layout.device)
            for g, v in zip(groups, values)
            for p in g.params
        ]
    )


def _nan_report(step: int, k: int, groups: Sequence[SharpnessGroup], raw: bool, hvps: int, t0: float, loss: float, dtype: torch.dtype, why: str) -> SharpnessReport:
    warnings.warn(f"stableopt: sharpness at step {step} is not finite ({why}); reporting NaN", RuntimeWarning, stacklevel=3)
    nan = math.nan
    return SharpnessReport(
        step=step, preconditioned=nan, threshold=_common_threshold(groups), ratio=nan,
        raw=nan if raw else None, eigenvalues=(nan,) * k, hvps=hvps, residual=nan,
        converged=False, seconds=time.perf_counter() - t0,
        thresholds=tuple(float(g.threshold) for g in groups), loss=loss, dtype=str(dtype).replace("torch.", ""),
    )


def _common_threshold(groups: Sequence[SharpnessGroup]) -> float:
    taus = [float(g.threshold) for g in groups if len(g.params)]
    if not taus:
        return math.nan
    t0 = taus[0]
    if all(t == t0 or (math.isfinite(t0) and abs(t - t0) <= 1e-12 * abs(t0)) for t in taus):
        return t0
    return math.nan


def _warm_start(warm: MutableMapping[str, Tensor] | None, key: str, n: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    if warm is None or key not in warm:
        return None
    vecs = warm[key]
    if vecs.dim() != 2 or vecs.shape[1] != n:
        return None  # the parameter set changed since: start cold
    vecs = vecs.to(dtype=dtype, device=device)
    v0 = vecs[0].clone()
    for extra in vecs[1:]:
        v0.add_(extra, alpha=WARM_MIX)
    return v0 if bool(torch.isfinite(v0).all()) and float(v0.norm()) > 0 else None


def estimate_sharpness(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[SharpnessGroup],
    *,
    batches: Iterable[Any] | None = None,
    raw: bool = False,
    k: int = 1,
    tol: float = 1e-3,
    max_iters: int | None = None,
    step: int = 0,
    generator: torch.Generator | None = None,
    warm: MutableMapping[str, Tensor] | None = None,
) -> SharpnessReport:
    """Measure λ_max(P⁻¹H), the edge ratio and optionally λ_max(H) by Lanczos on HVPs.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)``) returning the scalar loss through the
            parameters in ``groups``.
        groups: the param groups with their preconditioners and thresholds.
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        raw: also measure λ_max(H) of the descended objective.
        k: number of top eigenvalues of P⁻¹H to report.
        tol: relative accuracy target of each eigenvalue: each solve stops when the estimated
            relative error of the top Ritz values is ≤ ``tol`` (``STOP_BOUND`` for a cold
            solve, ``WARM_STOP_BOUND`` for a warm-started one, see
            :func:`stableopt.eigen.lanczos`); ``report.residual`` is the rigorous bound that
            went with it (an eigenvalue lies within residual·|θ|): at most tol for a cold
            solve, 2·tol (``GAP_RESIDUAL_CAP``) for a warm one.
        max_iters: Hessian-vector products per solve at most (default min(n, 100)).
        step: recorded in the report.
        generator: random source for cold starts (default: a fixed seed).
        warm: a mapping that keeps the top Ritz vectors between calls (warm starts);
            updated in place.

    Returns:
        A :class:`SharpnessReport`. A non-finite loss or HVP gives NaN values with
        ``converged=False`` and a ``RuntimeWarning`` instead of an exception.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        >>> g = SharpnessGroup([w], [torch.tensor([2.0, 1.0])], threshold=2.0)
        >>> rep = estimate_sharpness(lambda: 0.5 * w @ H @ w, [g], tol=1e-6)
        >>> round(rep.preconditioned, 4), round(rep.ratio, 4)   # eig of P^-1/2 H P^-1/2
        (2.7071, 1.3536)
    """
    t0 = time.perf_counter()
    params = [p for g in groups for p in g.params]
    if not params:
        raise ValueError("there is no parameter with requires_grad=True to measure")
    for p in params:
        if p.is_complex():
            raise TypeError(f"complex parameters are not supported, got a parameter of dtype {p.dtype}")
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError("sparse gradients are not supported (nn.Embedding(sparse=True)?); use dense gradients")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
    signs = {float(g.sign) for g in groups if len(g.params)}
    if len(signs) > 1:
        raise ValueError(
            "param groups mix maximize=True and maximize=False; the update Jacobian is then not "
            "symmetric and has no edge-of-stability threshold"
        )
    sign = signs.pop()
    dtype = _compute_dtype(params)
    layout = _Layout(params, [p.numel() for p in params], dtype, params[0].device)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    # torch.distributed: HVPs all-reduced across ranks, same report everywhere (distributed.py)
    red = _dist.Reduction.begin(params)
    if red is not None:
        red.check(n=layout.n, k=k, raw=raw, tol=tol, max_iters=max_iters, step=step,
                  batched=batches is not None, params=params)

    with preserved_training_state() as rng, _dist.quiet_ddp(), _precision.float32_measurement(params) as upcast:
        def build() -> HVP:
            return _precision.explained(
                upcast, lambda: make_hvp(loss_fn, params, batches=batches, before_forward=rng.restore)
            )

        hvp: HVP = build() if red is None else red.first_evaluation(build)
        loss = float(hvp.loss)
        if not math.isfinite(loss):
            return _agree(red, _nan_report(step, k, groups, raw, 0, t0, loss, dtype, "the loss is not finite"))

        decay = [float(g.weight_decay) for g in groups]
        lam = _per_coordinate(groups, decay, layout) if any(decay) else None

        def operator(d: Tensor | None) -> Callable[[Tensor], Tensor]:
            def matvec(u: Tensor) -> Tensor:
                x = u if d is None else d * u
                y = layout.flatten(hvp(layout.unflatten(x)))
                if sign != 1.0:
                    y = y.mul_(sign)
                if lam is not None:
                    y = y.add_(lam * x)
                return y if d is None else y.mul_(d)

            return matvec

        def solve(key: str, d: Tensor | None, kk: int) -> LanczosResult:
            v0 = _warm_start(warm, key, layout.n, dtype, layout.device)
            cold = v0 is None
            if red is not None:  # every rank starts from rank 0's vector, cold or warm as it is
                v0, cold = red.start_vector(v0, layout.n, generator, dtype, layout.device)
            res = lanczos(
                operator(d), v0, n=layout.n, k=kk, tol=tol, max_iters=max_iters,
                min_iters=1 if cold else WARM_MIN_ITERS, generator=generator,
                bound=STOP_BOUND if cold else WARM_STOP_BOUND,
                dtype=dtype, device=layout.device, num_vectors=kk + 1, max_basis=max(MAX_BASIS, 2 * kk + 4),
            )
            if warm is not None and res.finite:
                warm[key] = res.eigenvectors.detach().clone()
            return res

        precond = layout.flatten(P for g in groups for P in g.preconditioner)
        d_pre = precond.rsqrt()
        results = [solve("preconditioned", d_pre, k)]
        common = _common_threshold(groups)
        if math.isnan(common):
            taus = _per_coordinate(groups, [g.threshold for g in groups], layout)
            results.append(solve("ratio", (taus * precond).rsqrt(), 1))
        if raw:
            results.append(solve("raw", None, 1))

    hvps = hvp.calls
    if not all(r.finite for r in results):
        return _agree(red, _nan_report(step, k, groups, raw, hvps, t0, loss, dtype, "a Hessian-vector product is not finite"))
    eig = tuple(float(x) for x in results[0].eigenvalues)
    pre = eig[0]
    if math.isnan(common):
        ratio = float(results[1].eigenvalues[0])
        threshold = pre / ratio if ratio != 0 else math.nan
    else:
        ratio, threshold = pre / common, common
    residuals = [float(r.residuals.max()) for r in results]
    return _agree(red, SharpnessReport(
        step=step,
        preconditioned=pre,
        threshold=threshold,
        ratio=ratio,
        raw=float(results[-1].eigenvalues[0]) if raw else None,
        eigenvalues=eig,
        hvps=hvps,
        residual=max(residuals),
        converged=all(r.converged for r in results),
        seconds=time.perf_counter() - t0,
        thresholds=tuple(float(g.threshold) for g in groups),
        loss=loss,
        dtype=str(dtype).replace("torch.", ""),
    ))


def _agree(red: _dist.Reduction | None, report: SharpnessReport) -> SharpnessReport:
    """Distributed: every rank reports the slowest rank's wall time, so reports are identical."""
    if red is None:
        return report
    return dataclasses.replace(report, seconds=red.agree_seconds(report.seconds))
