"""Preconditioned sharpness λ_max(P⁻¹H), the edge-of-stability ratio and raw λ_max(H).

P⁻¹H is not symmetric, but it is similar to the symmetric P^{-1/2}·H·P^{-1/2}, which has the same
eigenvalues; Lanczos runs on that (docs/science.md). The dimensionless ratio of a model whose param
groups g have thresholds τ_g is

    ratio = λ_max(D^{1/2}·H·D^{1/2}),   D = diag(1/(τ_g·P))   (per coordinate),

so ratio = 1 is the edge for every mix of per-group learning rates and betas; with one threshold
it is λ_max(P⁻¹H)/τ. H here is the Hessian of the objective the optimizer actually descends:
the sign of ``maximize`` applied, plus λI for coupled weight decay λ.

All measurements leave parameters, ``.grad``, RNG streams and module buffers as they were.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import blocks as _blocks
from .backends import BackendChoice
from .eigen import GAP_RESIDUAL_CAP, LanczosResult, lanczos
from .operator import CurvatureOperator, MeasuredGroup, Measurement, measure
from .thresholds import edge_ratio, unstable_threshold

__all__ = ["SharpnessGroup", "SharpnessReport", "common_threshold", "estimate_sharpness", "warm_start_vector"]

#: Relative weight of the previous second Ritz vector in a warm start vector. Eigenvalues near
#: the edge crowd (λ2/λ1 → 1) and cross; starting with a sizeable component along the old
#: runner-up lets Lanczos see a crossing instead of locking onto the old top direction. Along
#: the benchmark run through the edge (benchmarks/warm_replay.py, monitors every 25 and 100
#: steps, tol 1e-3 and 1e-2) 0.25 let one stop on the runner-up 1.7% low at tol 1e-3, and 1.0
#: took 9% more products and stopped 1.8% low at tol 1e-2, where 0.5 kept every measurement
#: within tol. A random vector added to the start (0.3 of its norm, so that Krylov space sees
#: the whole spectrum) took 7% more products and stopped up to 1.3% low at tol 1e-2: on 656,810
#: parameters it adds about 1e-3 of any one eigenvector, too little to find a hidden top one.
WARM_MIX = 0.5
#: Minimum Lanczos steps of a warm-started solve, for the same reason: a few Krylov steps are
#: needed before a residual can tell the top eigenpair from a nearby one, and before the gap
#: rule's start guard (:data:`stableopt.eigen.GAP_START_SHIFT`) can see a stale start climb:
#: with 2 or 3 the gap rule stopped 5–12% low at tol 1e-2 after loss spikes (quick replay).
WARM_MIN_ITERS = 4
#: Lanczos stopping rules of a measurement (see :func:`stableopt.eigen.lanczos`). Cold solves
#: (random start) stop on the residual, ‖r‖ ≤ tol·|θ|; warm-started solves on the quadratic
#: estimate ‖r‖²/gap ≤ tol·|θ| ("gap"), which needs fewer Hessian-vector products when the start
#: is already close to the top eigenvector, and on the residual when it is not (the top Ritz
#: value climbed more than ``GAP_START_SHIFT`` after the second step, e.g. after a loss spike).
#: benchmarks/sharpness.py measures both rules, cold and warm, against tight references, and
#: benchmarks/warm_replay.py every measurement of monitors every 25 and 100 steps along a run
#: through the edge.
STOP_BOUND: Literal["residual", "gap"] = "residual"
WARM_STOP_BOUND: Literal["residual", "gap"] = "gap"
#: Most Lanczos vectors a solve holds at once (thick restart beyond that, see
#: :func:`stableopt.eigen.lanczos`): memory of a measurement is bounded by about this many
#: copies of the parameters, whatever the number of iterations. On the benchmark MLP (656,810
#: parameters) cold solves took 18–22 products with 8 vectors, 16–21 with 12 and 19–21 with 10,
#: and peak memory above training fell from 60 MB (12) to 49 MB (8).
MAX_BASIS = 8


#: One param group as the estimator sees it: params, preconditioner, threshold, sign, decay
#: (the measurement seam's :class:`stableopt.operator.MeasuredGroup`, under its first name).
SharpnessGroup = MeasuredGroup


@dataclass(frozen=True)
class SharpnessReport:
    """One measurement.

    Attributes:
        step: optimizer steps taken when measured (H at θ_step paired with the P of that step).
        preconditioned: λ_max(P⁻¹H).
        threshold: the stability threshold τ (with groups of different τ, the effective
            ``preconditioned / ratio``; the lowest τ when one is ≤ 0).
        ratio: the dimensionless edge ratio (1 = the edge of stability); ``+inf`` when a
            group's threshold is ≤ 0 (AdamW with ηλ ≥ 2: unstable at any curvature, see
            :mod:`stableopt.thresholds`).
        raw: λ_max(H), or None when not asked for.
        eigenvalues: the top ``k`` eigenvalues of P⁻¹H, largest first.
        hvps: Hessian-vector products used.
        residual: the largest relative Ritz residual ‖Ax − θx‖/|θ| among the solves.
        converged: every solve met its tolerance and every eigenvalue is finite (the ratio
            may still be ``+inf``: it needs no solve then).
        seconds: wall time of the measurement.
        thresholds: τ of each param group.
        loss: the loss at the measured parameters.
        dtype: the floating-point type the Hessian-vector products ran in.
        hvp_backend: how the Hessian-vector products were computed: ``"autograd"`` (double
            backward), ``"fd"`` (finite differences of gradients) or ``"forward"``
            (forward-over-reverse); with ``hvp="auto"`` the backend the probe settled on.
        blocks: per-block sharpness by block name (:class:`stableopt.blocks.BlockSharpness`),
            when measured with ``blocks=``; empty otherwise.
        hvp_error: the estimated relative error the Hessian-vector products put into the
            reported eigenvalues (the largest among the solves): 0.0 for the exact backends
            (``"autograd"``, ``"forward"``). For ``"fd"`` each solve ends with two fresh products
            along its final Ritz vector y, at a step adapted to y and at half of it: the top
            value reported is y's Rayleigh quotient under the finer one (its residual there must
            meet the solve's bound), and the error estimate is ‖A_ε·y − A_{ε/2}·y‖/(‖y‖·|value|),
            which bounds what the products' error can do to an eigenvalue near the value
            (1.1–2× the true error where rounding dominates, up to 15× where truncation does,
            measured on the test transformers in float32 and bfloat16).
            ``converged`` requires it to be at most ``tol``.
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
    hvp_backend: str = "autograd"
    blocks: dict[str, _blocks.BlockSharpness] = field(default_factory=dict, hash=False)
    hvp_error: float = 0.0

    def __str__(self) -> str:
        raw = "" if self.raw is None else f", raw={self.raw:.6g}"
        err = f", product error ~{self.hvp_error:.1e}" if self.hvp_error > 0 else ""
        return (
            f"step {self.step}: λ_max(P⁻¹H)={self.preconditioned:.6g}, threshold="
            f"{self.threshold:.6g}, ratio={self.ratio:.4f}{raw} ({self.hvps} HVPs [{self.hvp_backend}]{err}, "
            f"{self.seconds:.3f} s{'' if self.converged else ', NOT converged'})"
        )


def _nan_report(
    step: int, k: int, groups: Sequence[SharpnessGroup], raw: bool, m: Measurement, t0: float, why: str
) -> SharpnessReport:
    warnings.warn(
        f"stableopt: sharpness at step {step} is not finite ({why}); reporting NaN", RuntimeWarning, stacklevel=3
    )
    nan = math.nan
    return SharpnessReport(
        step=step,
        preconditioned=nan,
        threshold=common_threshold(groups),
        ratio=math.inf if _unstable(groups) is not None else nan,  # no curvature needed
        raw=nan if raw else None,
        eigenvalues=(nan,) * k,
        hvps=m.products,
        residual=nan,
        converged=False,
        seconds=m.agree_seconds(time.perf_counter() - t0),
        thresholds=tuple(float(g.threshold) for g in groups),
        loss=m.loss,
        dtype=str(m.space.dtype).replace("torch.", ""),
        hvp_backend=m.backend,
    )


def _unstable(groups: Sequence[SharpnessGroup]) -> float | None:
    """The lowest threshold of a group with parameters when it is ≤ 0 (ratio +inf), else None."""
    return unstable_threshold(float(g.threshold) for g in groups if len(g.params))


def common_threshold(groups: Sequence[SharpnessGroup]) -> float:
    """The threshold τ every group with parameters shares (to 1e-12 relative), else NaN.

    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> common_threshold([SharpnessGroup([w], [torch.ones(2)], threshold=380.0)] * 2)
    380.0
    """
    taus = [float(g.threshold) for g in groups if len(g.params)]
    if not taus:
        return math.nan
    t0 = taus[0]
    if all(t == t0 or (math.isfinite(t0) and abs(t - t0) <= 1e-12 * abs(t0)) for t in taus):
        return t0
    return math.nan


def _warm_start(
    warm: MutableMapping[str, Tensor] | None, key: str, n: int, dtype: torch.dtype, device: torch.device
) -> Tensor | None:
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


def warm_start_vector(vectors: Tensor) -> Tensor | None:
    """The start vector a warm measurement derives from stored Ritz vectors (one entry of
    ``opt.warm_starts``, shape vectors × n): the first plus ``WARM_MIX`` times each other one.

    Returns None where the result is not finite or is zero (the measurement then starts cold).

    Example:
        >>> warm_start_vector(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        tensor([1.0000, 0.5000])
    """
    if not isinstance(vectors, Tensor) or vectors.dim() != 2:
        raise TypeError("vectors must be a 2-D tensor (vectors x n), an entry of opt.warm_starts")
    return _warm_start({"v": vectors}, "v", vectors.shape[1], vectors.dtype, vectors.device)


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
    hvp: str = "auto",
    choice: BackendChoice | None = None,
    blocks: Any = None,
) -> SharpnessReport:
    """Measure λ_max(P⁻¹H), the edge ratio and optionally λ_max(H) by Lanczos on HVPs.

    A thin composition: :func:`stableopt.measure` yields the operators, :func:`stableopt.lanczos`
    solves each (warm-started from ``warm``).

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
            solve, 2·tol (``GAP_RESIDUAL_CAP``) for a warm one. With ``hvp="fd"`` the operator
            itself carries the finite-difference error (:mod:`stableopt.finite_difference`).
        max_iters: Hessian-vector products per solve at most (default min(n, 100)).
        step: recorded in the report.
        generator: random source for cold starts (default: a fixed seed).
        warm: a mapping that keeps the top Ritz vectors between calls (warm starts);
            updated in place.
        hvp: how products are computed: ``"auto"`` (default), ``"autograd"``, ``"fd"`` or
            ``"forward"`` (:mod:`stableopt.backends`).
        choice: where ``hvp="auto"`` keeps its decision between calls.
        blocks: also measure each block's diagonal block (``"module"``, ``"group"``, an
            ``nn.Module`` or a dict of parameter lists; :mod:`stableopt.blocks`) into
            ``report.blocks``; each block is warm-started from ``warm["block:<name>"]``.

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
        >>> rep.hvp_backend
        'autograd'
    """
    t0 = time.perf_counter()
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    fingerprint = {
        "k": k,
        "raw": raw,
        "tol": tol,
        "max_iters": -1 if max_iters is None else max_iters,
        "step": step,
    }
    blocks = _blocks.check_blocks(blocks)
    watcher = _blocks.watch(blocks)  # blocks="module": sees the modules of the first evaluation
    try:
        with measure(loss_fn, groups, batches=batches, hvp=hvp, choice=choice, fingerprint=fingerprint) as m:
            if watcher is not None:
                watcher.stop()
            return _estimate(m, groups, step, k, raw, tol, max_iters, generator, warm, blocks, watcher, t0)
    finally:
        if watcher is not None:
            watcher.stop()


def _estimate(
    m: Measurement,
    groups: Sequence[SharpnessGroup],
    step: int,
    k: int,
    raw: bool,
    tol: float,
    max_iters: int | None,
    generator: torch.Generator,
    warm: MutableMapping[str, Tensor] | None,
    blocks: Any,
    watcher: Any,
    t0: float,
) -> SharpnessReport:
    if not math.isfinite(m.loss):
        return _nan_report(step, k, groups, raw, m, t0, "the loss is not finite")

    errors: list[float] = []
    #: per solve with approximate products: (value, residual, the residual meets the bound)
    checked: dict[str, tuple[float, float, bool]] = {}

    def solve(op: CurvatureOperator, kk: int, key: str | None = None, check: bool = True) -> LanczosResult:
        key = op.kind if key is None else key
        v0, cold = op.start(_warm_start(warm, key, op.local_size, op.dtype, op.device), generator)
        res = lanczos(
            op,
            v0,
            k=kk,
            tol=tol,
            max_iters=max_iters,
            min_iters=1 if cold else WARM_MIN_ITERS,
            generator=generator,
            bound=STOP_BOUND if cold else WARM_STOP_BOUND,
            num_vectors=kk + 1,
            max_basis=max(MAX_BASIS, 2 * kk + 4),
        )
        if warm is not None and res.finite:
            warm[key] = res.eigenvectors.detach().clone()
        fresh = op.check(res.eigenvectors[0]) if check and res.finite else None
        if fresh is not None:  # approximate products: the top value from the finer check product
            scale = abs(fresh.fine)
            errors.append(fresh.spread / scale if scale > 0 else math.inf)
            residual = fresh.residual / scale if scale > 0 else math.inf
            checked[key] = (fresh.fine, residual, residual <= tol * (1.0 if cold else GAP_RESIDUAL_CAP))
        return res

    results = [solve(m.operator("preconditioned"), k)]
    common = common_threshold(groups)
    low = _unstable(groups)  # a threshold <= 0: ratio +inf, no ratio operator (its D is not real)
    if math.isnan(common) and low is None:
        results.append(solve(m.operator("ratio"), 1))
    if raw:
        results.append(solve(m.operator("raw"), 1))
    if not all(r.finite for r in results):
        return _nan_report(step, k, groups, raw, m, t0, "a Hessian-vector product is not finite")
    block_reports = (
        {} if blocks is None else _blocks.measure_blocks(m, blocks, watcher, lambda op, key: solve(op, 1, key, False))
    )
    hvp_error = max(errors, default=0.0)
    if hvp_error > tol:
        warnings.warn(_product_error_message(m, hvp_error, tol), RuntimeWarning, stacklevel=4)

    def top(key: str, res: LanczosResult) -> float:
        return checked[key][0] if key in checked else float(res.eigenvalues[0])

    eig = (top("preconditioned", results[0]),) + tuple(float(x) for x in results[0].eigenvalues[1:])
    pre = eig[0]
    if low is not None:
        ratio, threshold = math.inf, low
    elif math.isnan(common):
        ratio = top("ratio", results[1])
        threshold = pre / ratio if ratio != 0 else math.nan
    else:
        ratio, threshold = edge_ratio(pre, common), common
    return SharpnessReport(
        step=step,
        preconditioned=pre,
        threshold=threshold,
        ratio=ratio,
        raw=top("raw", results[-1]) if raw else None,
        eigenvalues=eig,
        hvps=m.products,
        residual=max([float(r.residuals.max()) for r in results] + [c[1] for c in checked.values()]),
        converged=all(r.converged for r in results) and all(c[2] for c in checked.values()) and hvp_error <= tol,
        seconds=m.agree_seconds(time.perf_counter() - t0),
        thresholds=tuple(float(g.threshold) for g in groups),
        loss=m.loss,
        dtype=str(m.space.dtype).replace("torch.", ""),
        hvp_backend=m.backend,
        blocks=block_reports,
        hvp_error=hvp_error,
    )


def _product_error_message(m: Measurement, error: float, tol: float) -> str:
    """Why an fd measurement is not reported as converged, and what to do about it."""
    stats = getattr(m.product, "stats", None)
    dtype = getattr(stats, "compute_dtype", m.space.dtype)
    why = (
        f"the model computes in {str(dtype).replace('torch.', '')}, whose resolution finite differences "
        "cannot beat; measure a float32 forward (FSDP2: MixedPrecisionPolicy(param_dtype=torch.float32) "
        "for the measurement), or use hvp='autograd' where double backward works"
        if dtype in (torch.bfloat16, torch.float16)
        else "use hvp='autograd' where double backward works, or float64 parameters"
    )
    return (
        f"stableopt: the finite-difference (hvp='fd') products carry an estimated relative error of "
        f"{error:.1e} on this measurement's eigenvalues, more than tol={tol:g}; it is reported with "
        f"converged=False and hvp_error={error:.1e}: {why}"
    )
