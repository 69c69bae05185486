"""Directional sharpness: the curvature of P⁻¹H along one direction u, from one Hessian-vector product.

For a direction u (the last update, the preconditioned gradient, or any vector) and the
optimizer's diagonal preconditioner P,

    value = uᵀHu / uᵀPu,        ratio = uᵀHu / Σ_g τ_g·u_gᵀP_gu_g,

with H the Hessian of the objective the optimizer descends (the sign of ``maximize``, plus λI
for coupled weight decay: exactly the ``"raw"`` operator of a measurement) and τ_g the
threshold of param group g (ratio = 1 is the edge, per-group thresholds as in the edge ratio
of docs/science.md and the secant ratio of :mod:`stableopt.secant`). With w = P^{1/2}u, value is
the Rayleigh quotient wᵀ(P^{-1/2}HP^{-1/2})w / wᵀw, so

    value ≤ λ_max(P⁻¹H)   and   ratio ≤ the edge ratio of ``opt.sharpness()``:

a lower bound, tight only when u lies along the top eigenvector. It costs one product, where a
λ_max measurement costs 5–25.

What it predicts: Bai et al. 2025 (arXiv:2506.04805) report that the preconditioned curvature
*along the gradient* (``direction="gradient"``, u = P⁻¹g) crossing the stability threshold
precedes Adam's loss spikes, earlier and more reliably than λ_max. ``examples/spike_predictor.py``
measures it on full-batch Adam on the digits problem: there the gradient-direction ratio crossed
1 one to six steps before most spikes, while the update direction's crossed at the onsets or
after them, never before (examples/README.md has the table, λ_max included). When it is noisy:
with mini-batches the update and the gradient are those of the batch just used while H is that
of ``loss_fn`` (or ``batches``), so the value moves with the batch; read its trend, not single
values.

Coordinates the optimizer cannot move (P = inf: a parameter it has not stepped yet) are
dropped from u, as every preconditioned operator drops them. A zero direction (nothing moved, a
zero gradient, only frozen coordinates) has no curvature: the report then has NaN ``value`` and
``ratio``, ``hvps`` = 0, and a ``RuntimeWarning`` says why, so a training loop keeps running.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .backends import BackendChoice, check_backend
from .operator import CurvatureOperator, MeasuredGroup, measure
from .space import is_dtensor, local_tensor
from .thresholds import unstable_threshold
from .updates import UpdateTracker as UpdateTracker  # re-exported: it was defined here
from .updates import update_tracker as update_tracker

__all__ = [
    "DIRECTIONS",
    "DirectionalReport",
    "UpdateTracker",
    "directional_curvature",
    "estimate_directional_sharpness",
]

#: the named directions (``direction=`` also takes a list of tensors: "explicit")
DIRECTIONS = ("update", "gradient")


@dataclass(frozen=True)
class DirectionalReport:
    """One directional measurement (see the module docs).

    Attributes:
        step: optimizer steps taken when measured.
        value: uᵀHu / uᵀPu (NaN for a zero direction or a non-finite loss/product).
        threshold: τ of the groups along u: Σ_g τ_g·u_gᵀP_gu_g / uᵀPu (with one threshold, τ).
        ratio: uᵀHu / Σ_g τ_g·u_gᵀP_gu_g, so 1 = the edge; ≤ the edge ratio of ``sharpness()``;
            ``+inf`` when u moves a group whose threshold is ≤ 0 (:mod:`stableopt.thresholds`).
        direction: ``"update"``, ``"gradient"`` or ``"explicit"``.
        hvps: Hessian-vector products used (1; 0 when the direction is zero).
        seconds: wall time of the measurement.
        loss: the loss at the measured parameters.
        hvp_backend: the backend the product used (``"autograd"``, ``"fd"``, ``"forward"``).
    """

    step: int
    value: float
    threshold: float
    ratio: float
    direction: str
    hvps: int
    seconds: float
    loss: float = math.nan
    hvp_backend: str = "autograd"

    def __str__(self) -> str:
        return (
            f"step {self.step}: curvature along the {self.direction} direction {self.value:.6g}, threshold "
            f"{self.threshold:.6g}, ratio {self.ratio:.4f} ({self.hvps} HVP [{self.hvp_backend}], {self.seconds:.3f} s)"
        )


def directional_curvature(
    op: CurvatureOperator, u: Tensor, precond: Tensor, thresholds: Tensor
) -> tuple[float, float, float]:
    """(uᵀAu, uᵀPu, Σ τ·uᵀPu) for the operator ``op`` (A, normally ``"raw"``): one product.

    ``u``, ``precond`` (P) and ``thresholds`` (τ) are flat (local) vectors of ``op``'s space;
    coordinates where P is not finite are dropped from u first. Inner products are those of
    ``op`` (all-reduced when sharded). One host synchronisation.

    Example:
        >>> from stableopt import DenseOperator
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
        >>> op = DenseOperator(lambda x: H @ x, 2, torch.float64, torch.device("cpu"))
        >>> u, P = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([2.0, 1.0], dtype=torch.float64)
        >>> directional_curvature(op, u, P, torch.full((2,), 10.0, dtype=torch.float64))
        (8.0, 3.0, 30.0)
    """
    u = torch.where(torch.isfinite(precond), u, torch.zeros_like(u))
    zero = torch.zeros_like(u)
    pu = torch.where(u != 0, precond * u, zero)  # P·u = 0 where u = 0, whatever P
    tpu = torch.where(pu != 0, thresholds * pu, zero)  # and τ = inf (lr 0) times 0 is 0
    quad = torch.stack([op.dot(u, op.matvec(u)), op.dot(u, pu), op.dot(u, tpu)])
    curvature, metric, weighted = (float(x) for x in quad.double().tolist())
    return curvature, metric, weighted


def _nonpositive_metric(m: Any, u: Tensor, precond: Tensor) -> float:
    """Σ u·P·u over the coordinates whose threshold is ≤ 0 (all-reduced when sharded): > 0 when
    ``u`` moves a group that is unstable at any curvature."""
    keep = torch.isfinite(precond) & (m.thresholds() <= 0) & (u != 0)
    zero = torch.zeros_like(u)
    return float(m.space.dot(torch.where(keep, u, zero), torch.where(keep, precond * u, zero)))


def _flat(space: Any, tensors: Sequence[Tensor | None]) -> Tensor:
    """One flat vector from per-parameter tensors (None = zeros), on the space's device."""
    return space.flatten(
        [torch.zeros_like(t) if v is None else local_tensor(v).to(t.device) for v, t in zip(tensors, space.locals)]
    )


def _nan_report(step: int, label: str, m: Any, t0: float, why: str, hvps: int) -> DirectionalReport:
    warnings.warn(f"stableopt: directional sharpness at step {step} is NaN: {why}", RuntimeWarning, stacklevel=4)
    return DirectionalReport(
        step=step,
        value=math.nan,
        threshold=math.nan,
        ratio=math.nan,
        direction=label,
        hvps=hvps,
        seconds=m.agree_seconds(time.perf_counter() - t0),
        loss=m.loss,
        hvp_backend=m.backend,
    )


def _check_vectors(direction: Sequence[Any], params: Sequence[Tensor]) -> list[Tensor | None]:
    if len(direction) != len(params):
        raise ValueError(
            f"direction has {len(direction)} tensors, expected one per parameter ({len(params)}); "
            "pass a list shaped like the parameters (None for a parameter it does not move)"
        )
    out: list[Tensor | None] = []
    for i, (d, p) in enumerate(zip(direction, params)):
        if d is None:
            out.append(None)
            continue
        if not isinstance(d, Tensor):
            raise TypeError(f"direction[{i}] must be a tensor (or None), got {type(d).__name__}")
        if tuple(d.shape) != tuple(p.shape):
            raise ValueError(
                f"direction[{i}] has shape {tuple(d.shape)}, its parameter {tuple(p.shape)}; pass tensors shaped like the parameters"
            )
        if is_dtensor(p) != is_dtensor(d):
            raise TypeError(
                f"direction[{i}]: its parameter is {'a' if is_dtensor(p) else 'not a'} DTensor, so must the direction be"
            )
        if d.is_complex() or not d.is_floating_point():
            raise TypeError(f"direction[{i}] must be a real floating-point tensor, got {d.dtype}")
        if not bool(torch.isfinite(local_tensor(d)).all()):
            raise ValueError(f"direction[{i}] has non-finite entries; a direction must be finite")
        out.append(local_tensor(d.detach()))
    return out


def _gradients(groups: Sequence[MeasuredGroup]) -> list[Tensor | None]:
    """The descended gradient s·g + λθ of each measured parameter (None where ``.grad`` is None)."""
    out: list[Tensor | None] = []
    with torch.no_grad():
        for g in groups:
            for p in g.params:
                grad = p.grad
                if grad is None:
                    out.append(None)
                    continue
                if grad.is_sparse:
                    raise TypeError("direction='gradient' needs dense gradients (nn.Embedding(sparse=True)?)")
                dtype = torch.promote_types(torch.float32, p.dtype)
                d = grad.detach().to(dtype) * g.sign
                if g.weight_decay:
                    d = d.add(p.detach().to(dtype), alpha=g.weight_decay)
                out.append(d)
    if all(d is None for d in out):
        raise RuntimeError(
            "direction='gradient' reads the parameters' .grad, and none has one: call "
            "loss.backward() before measuring (and do not zero the gradients in between)"
        )
    return out


def estimate_directional_sharpness(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    direction: str | Sequence[Tensor | None],
    *,
    batches: Iterable[Any] | None = None,
    hvp: str = "auto",
    choice: BackendChoice | None = None,
    step: int = 0,
    label: str = "explicit",
) -> DirectionalReport:
    """The curvature of P⁻¹H along ``direction`` (module docs), with one Hessian-vector product.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)``) returning the scalar loss.
        groups: the param groups with their preconditioners, thresholds, sign and decay.
        direction: ``"gradient"`` (u = P⁻¹(s·g + λθ) with g what the parameters' ``.grad``
            holds and θ their current values: the gradient of the descended objective,
            preconditioned; measured after ``step()``, g is the gradient that step used, taken
            at θ_{t−1}) or one tensor per parameter of ``groups`` (None: zero), shaped like it.
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        hvp: the Hessian-vector-product backend (:mod:`stableopt.backends`).
        choice: where ``hvp="auto"`` keeps its decision between calls.
        step: recorded in the report.
        label: recorded in the report as its ``direction``.

    Returns:
        A :class:`DirectionalReport`; parameters, ``.grad``, RNG streams and module buffers are
        left as they were.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        >>> g = MeasuredGroup([w], [torch.tensor([2.0, 1.0])], threshold=10.0)
        >>> rep = estimate_directional_sharpness(lambda: 0.5 * w @ H @ w, [g], [torch.ones(2)])
        >>> rep.value, rep.ratio, rep.hvps   # uᵀHu = 8, uᵀPu = 3
        (2.6666666666666665, 0.26666666666666666, 1)
    """
    if isinstance(direction, str):
        if direction != "gradient":
            raise ValueError(
                f"direction must be 'gradient' or a list of tensors here, got {direction!r} ('update' needs the optimizer: opt.directional_sharpness)"
            )
        return _estimate(loss_fn, groups, _gradients(groups), True, batches, hvp, choice, step, "gradient")
    if not isinstance(direction, (list, tuple)):
        raise TypeError(f"direction must be 'gradient' or a list of tensors, got {type(direction).__name__}")
    vectors = _check_vectors(direction, [p for g in groups for p in g.params])
    return _estimate(loss_fn, groups, vectors, False, batches, hvp, choice, step, label)


def _estimate(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    vectors: Sequence[Tensor | None],
    preconditioned: bool,
    batches: Iterable[Any] | None,
    hvp: str,
    choice: BackendChoice | None,
    step: int,
    label: str,
) -> DirectionalReport:
    """u from per-parameter (local) ``vectors`` (divided by P if ``preconditioned``), then one product."""
    t0 = time.perf_counter()
    check_backend(hvp)
    with measure(
        loss_fn, groups, batches=batches, hvp=hvp, choice=choice, fingerprint={"directional": 1.0, "step": step}
    ) as m:
        P = m.preconditioner()
        u = _flat(m.space, vectors)
        if preconditioned:  # P⁻¹g; P = inf (frozen) gives 0
            u = torch.where(torch.isfinite(P) & (P > 0), u / P, torch.zeros_like(u))
        if not math.isfinite(m.loss):
            return _nan_report(step, label, m, t0, "the loss is not finite", m.products)
        if not bool(torch.isfinite(u).all()):
            return _nan_report(step, label, m, t0, f"the {label} direction is not finite", m.products)
        if float(m.space.norm(torch.where(torch.isfinite(P), u, torch.zeros_like(u)))) == 0.0:
            return _nan_report(
                step, label, m, t0, f"the {label} direction is zero on every coordinate the optimizer moves", m.products
            )
        curvature, metric, weighted = directional_curvature(m.operator("raw"), u, P, m.thresholds())
        # a group with threshold <= 0 along u: unstable at any curvature, ratio +inf
        unstable = unstable_threshold(float(g.threshold) for g in groups if len(g.params)) is not None
        unstable = unstable and _nonpositive_metric(m, u, P) > 0
    if not (math.isfinite(curvature) and metric > 0 and math.isfinite(metric)):
        return _nan_report(
            step, label, m, t0, "the Hessian-vector product or uᵀPu is not finite and positive", m.products
        )
    taus = {float(g.threshold) for g in groups if len(g.params)}
    return DirectionalReport(
        step=step,
        value=curvature / metric,
        threshold=taus.pop() if len(taus) == 1 else weighted / metric,
        ratio=math.inf if unstable else (curvature / weighted if weighted > 0 else math.nan),
        direction=label,
        hvps=m.products,
        seconds=m.agree_seconds(time.perf_counter() - t0),
        loss=m.loss,
        hvp_backend=m.backend,
    )


def optimizer_directional_sharpness(
    optimizer: Any,
    loss_fn: Callable[..., Tensor],
    direction: Any,
    *,
    batches: Iterable[Any] | None,
    hvp: str,
) -> DirectionalReport:
    """The body of ``opt.directional_sharpness`` (see there): resolve the direction, measure, publish."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_backend(hvp)
    if isinstance(direction, str) and direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be one of {DIRECTIONS} or a list of tensors shaped like the parameters, got {direction!r}"
        )
    if not isinstance(direction, (str, list, tuple)):
        raise TypeError(f"direction must be one of {DIRECTIONS} or a list of tensors, got {type(direction).__name__}")
    groups = optimizer._sharpness_groups()
    choice, step = optimizer._stableopt_backend, optimizer.steps_taken
    measured = [p for g in groups for p in g.params]
    label = direction if isinstance(direction, str) else "explicit"
    vectors: Any = direction
    if direction == "update":
        tracker = optimizer.__dict__.get("_stableopt_update_tracker")
        if tracker is None or tracker.users == 0:
            raise RuntimeError(
                "direction='update' needs θ_{t−1}, which the optimizer keeps only when asked (one copy "
                "of the parameters): call opt.track_updates() before training, or use "
                "opt.monitor(loss_fn, directional='update')"
            )
        vectors = tracker.update(measured)  # local tensors
    elif label == "explicit":
        everything = [p for group in optimizer.param_groups for p in group["params"]]
        checked = _check_vectors(direction, everything)
        by_param = {id(p): d for p, d in zip(everything, checked)}
        vectors = [by_param[id(p)] for p in measured]
    if direction == "gradient":
        report = _estimate(loss_fn, groups, _gradients(groups), True, batches, hvp, choice, step, label)
    else:
        report = _estimate(loss_fn, groups, vectors, False, batches, hvp, choice, step, label)
    for hook in list(optimizer._stableopt_directional_hooks.values()):
        hook(optimizer, report)
    return report


def record_directional(optimizer: Any, report: DirectionalReport) -> None:
    """The optimizer's directional hook that appends ``report`` to ``optimizer.history``."""
    optimizer.history.append_directional(report.step, report.value, report.ratio, report.hvps, report.direction)
