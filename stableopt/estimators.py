"""Trace and spectral density of an optimizer's (preconditioned) Hessian: measurement + estimator.

Thin compositions like :func:`stableopt.estimate_sharpness`: :func:`stableopt.measure` yields
the operator (P^{-1/2}·H·P^{-1/2} with ``preconditioned=True``, else H; sign of ``maximize`` and
coupled decay included), and a pure estimator (:mod:`stableopt.trace`,
:mod:`stableopt.density`) works on it. :class:`EstimatorsMixin` gives the optimizers
``hessian_trace`` and ``spectral_density``. Probes come from a private generator (seeded with
``seed``, by default from the step count), never from the global RNG, and every measurement
leaves parameters, ``.grad``, optimizer state, RNG streams and module buffers as they were.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .backends import BackendChoice, check_backend
from .density import DensityReport, lanczos_quadrature
from .operator import MeasuredGroup, measure
from .sharpness import common_threshold
from .trace import METHODS, TraceReport, hutch_plus_plus, hutchinson

__all__ = ["EstimatorsMixin", "estimate_density", "estimate_trace"]

#: seed of the probes of trace and density measurements at step 0 (the step count is added)
PROBE_SEED = 2017  # the year of Ubaru, Chen & Saad's SLQ paper; any fixed value would do


def _generator(seed: int | None, step: int) -> torch.Generator:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    return torch.Generator().manual_seed(PROBE_SEED + step if seed is None else seed)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _not_finite(what: str, step: int) -> None:
    warnings.warn(
        f"stableopt: {what} at step {step} is not finite (the loss or a Hessian-vector product); reporting NaN",
        RuntimeWarning,
        stacklevel=4,
    )


def estimate_trace(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    *,
    preconditioned: bool = True,
    probes: int = 30,
    method: str = "hutch++",
    batches: Iterable[Any] | None = None,
    hvp: str = "auto",
    choice: BackendChoice | None = None,
    step: int = 0,
    seed: int | None = None,
) -> TraceReport:
    """tr(P⁻¹H) (or tr(H)) by Hutch++ or Hutchinson with ``probes`` Hessian-vector products.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        >>> g = MeasuredGroup([w], [torch.tensor([2.0, 1.0])], threshold=2.0)
        >>> rep = estimate_trace(lambda: 0.5 * w @ H @ w, [g], probes=3)   # probes ≥ n: exact
        >>> round(rep.trace, 5), rep.hvps                                    # 4/2 + 2/1
        (4.0, 2)
    """
    _check_bool("preconditioned", preconditioned)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    estimator = hutch_plus_plus if method == "hutch++" else hutchinson
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < (3 if method == "hutch++" else 1):
        raise ValueError(
            f"probes must be an integer >= {3 if method == 'hutch++' else 1} for method={method!r}, got {probes!r}"
        )
    generator = _generator(seed, step)
    t0 = time.perf_counter()
    fingerprint = {
        "probes": probes,
        "trace method": METHODS.index(method),
        "preconditioned": preconditioned,
        "step": step,
    }
    with measure(loss_fn, groups, batches=batches, hvp=check_backend(hvp), choice=choice, fingerprint=fingerprint) as m:
        op = m.operator("preconditioned" if preconditioned else "raw")
        est = estimator(op, probes, generator) if math.isfinite(m.loss) else None
        trace, stderr = (est.trace, est.stderr) if est is not None else (math.nan, math.nan)
        if not math.isfinite(trace):
            _not_finite("the trace", step)
            trace = stderr = math.nan
        return TraceReport(
            step=step,
            trace=trace,
            stderr=stderr,
            probes=probes,
            hvps=m.products,
            method=method,
            preconditioned=preconditioned,
            size=op.size,
            seconds=m.agree_seconds(time.perf_counter() - t0),
            loss=m.loss,
            dtype=str(m.space.dtype).replace("torch.", ""),
            hvp_backend=m.backend,
        )


def estimate_density(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    *,
    preconditioned: bool = True,
    probes: int = 8,
    iters: int = 40,
    batches: Iterable[Any] | None = None,
    hvp: str = "auto",
    choice: BackendChoice | None = None,
    step: int = 0,
    seed: int | None = None,
) -> DensityReport:
    """The spectral density of P⁻¹H (or H) by stochastic Lanczos quadrature: ``probes`` probes
    of ``iters`` Lanczos steps (about probes × iters Hessian-vector products).

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> g = MeasuredGroup([w], [torch.ones(2)], threshold=2.0)
        >>> rep = estimate_density(lambda: 2.0 * w[0] ** 2 + 0.5 * w[1] ** 2, [g], probes=2, iters=5)
        >>> [round(x, 6) for x in rep.nodes[0]], round(rep.moment(1), 6)   # eigenvalues 1 and 4
        ([1.0, 4.0], 2.5)
    """
    _check_bool("preconditioned", preconditioned)
    for name, value in (("probes", probes), ("iters", iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    generator = _generator(seed, step)
    t0 = time.perf_counter()
    fingerprint = {"probes": probes, "iters": iters, "preconditioned": preconditioned, "step": step}
    with measure(loss_fn, groups, batches=batches, hvp=check_backend(hvp), choice=choice, fingerprint=fingerprint) as m:
        op = m.operator("preconditioned" if preconditioned else "raw")
        nodes, weights, finite = (
            lanczos_quadrature(op, probes, iters, generator) if math.isfinite(m.loss) else ([], [], False)
        )
        if not finite:
            _not_finite("the spectral density", step)
        return DensityReport(
            step=step,
            nodes=tuple(tuple(r) for r in nodes),
            weights=tuple(tuple(r) for r in weights),
            probes=probes,
            iters=iters,
            hvps=m.products,
            preconditioned=preconditioned,
            size=op.size,
            seconds=m.agree_seconds(time.perf_counter() - t0),
            loss=m.loss,
            dtype=str(m.space.dtype).replace("torch.", ""),
            hvp_backend=m.backend,
            threshold=common_threshold(groups) if preconditioned else math.nan,
        )


class EstimatorsMixin:
    """``hessian_trace`` and ``spectral_density`` for :class:`stableopt.StabilityMixin` optimizers."""

    _stableopt_step: int
    _stableopt_backend: BackendChoice
    _sharpness_groups: Callable[[], list[MeasuredGroup]]
    history: Any

    def hessian_trace(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        preconditioned: bool = True,
        probes: int = 30,
        method: str = "hutch++",
        batches: Iterable[Any] | None = None,
        hvp: str = "auto",
        seed: int | None = None,
    ) -> TraceReport:
        """Estimate tr(P⁻¹H) (``preconditioned=True``: the sum of the eigenvalues of P⁻¹H, of
        which λ_max is the largest) or tr(H) with ``probes`` Hessian-vector products.

        ``method="hutch++"`` (default; Meyer et al. 2021) deflates the top of the spectrum with a
        third of the products and is far more accurate on Hessians than plain
        ``"hutchinson"``; with ``probes`` ≥ the number of parameters it is exact. Probes are
        Rademacher vectors from a private generator (``seed``, default from the step count).
        Side-effect free like :meth:`sharpness`. Returns a :class:`stableopt.TraceReport`.
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        return estimate_trace(
            loss_fn,
            self._sharpness_groups(),
            preconditioned=preconditioned,
            probes=probes,
            method=method,
            batches=batches,
            hvp=hvp,
            choice=self._stableopt_backend,
            step=self._stableopt_step,
            seed=seed,
        )

    def spectral_density(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        preconditioned: bool = True,
        probes: int = 8,
        iters: int = 40,
        batches: Iterable[Any] | None = None,
        hvp: str = "auto",
        seed: int | None = None,
    ) -> DensityReport:
        """Estimate the eigenvalue density of P⁻¹H (or H) by stochastic Lanczos quadrature.

        ``probes`` Rademacher probes × ``iters`` Lanczos steps (about probes·iters
        Hessian-vector products). Returns a :class:`stableopt.DensityReport` with the Ritz
        ``nodes`` and ``weights`` of each probe, ``density(grid, sigma)`` and the ``threshold``
        (with one common τ); draw it with :func:`stableopt.plot_density`. The report is also
        recorded in :attr:`history` (``history.densities()``; ``stableopt report --plot`` draws
        the latest). Side-effect free like :meth:`sharpness`.
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        report = estimate_density(
            loss_fn,
            self._sharpness_groups(),
            preconditioned=preconditioned,
            probes=probes,
            iters=iters,
            batches=batches,
            hvp=hvp,
            choice=self._stableopt_backend,
            step=self._stableopt_step,
            seed=seed,
        )
        self.history.append_density(report)
        return report
