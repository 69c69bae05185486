"""The spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The density φ(t) = (1/n)·Σ_i δ(t − λ_i) of the eigenvalues of A is estimated as in Ubaru, Chen
& Saad, "Fast Estimation of tr(f(A)) via Stochastic Lanczos Quadrature" (SIAM J. Matrix Anal.
Appl. 2017), and as PyHessian draws Hessian densities (Yao et al. 2020): for each of a few
random unit probes v, m Lanczos steps from v give a tridiagonal T whose eigenpairs (θ_j, s_j)
are the nodes and weights w_j = s_{1j}² of the Gauss quadrature of the measure
μ_v = Σ_i (u_iᵀv)²·δ(t − λ_i); E[μ_v] = φ for Rademacher probes. The weights of each probe sum
to 1; averaging the probes' quadratures estimates φ, and Σ_j w_j·f(θ_j) estimates
tr(f(A))/n (the first moment is tr(A)/n). Every node lies in [λ_min, λ_max] (Cauchy
interlacing), and the extreme nodes converge to the extreme eigenvalues as m grows.

:meth:`DensityReport.density` smooths the nodes with Gaussians of width σ (Lin, Saad & Yang,
"Approximating spectral densities of large matrices", SIAM Review 2016), which is what one plots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .krylov import tridiagonalize
from .linear_operator import LinearOperator
from .thresholds import edge_ratio
from .trace import MeasurementInfo, rademacher

__all__ = ["DensityReport", "check_sigma", "lanczos_quadrature", "smoothing_width"]


def smoothing_width(lo: float, hi: float) -> float:
    """The default Gaussian width for nodes in [lo, hi]: 1/100 of the range (1e-3 of the scale
    if the range is a point).

    >>> smoothing_width(0.0, 5.0), smoothing_width(2.0, 2.0)
    (0.05, 0.002)
    """
    width = hi - lo
    return width / 100 if width > 0 else max(abs(hi), 1.0) * 1e-3


def check_sigma(sigma: Any) -> float:
    """``sigma`` if it is a positive finite number; ValueError otherwise."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    return float(sigma)


def lanczos_quadrature(
    op: LinearOperator, probes: int, iters: int, generator: torch.Generator
) -> tuple[list[list[float]], list[list[float]], bool]:
    """(nodes, weights, finite): one Gauss quadrature per Rademacher probe, ``iters`` Lanczos
    steps each (fewer when the probe's Krylov space is exhausted first).

    Example:
        >>> from stableopt import DenseOperator
        >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
        >>> op = DenseOperator(lambda x: A @ x, 4, torch.float64, torch.device("cpu"))
        >>> nodes, weights, ok = lanczos_quadrature(op, 1, 10, torch.Generator().manual_seed(0))
        >>> [round(x, 6) for x in nodes[0]], [round(w, 6) for w in weights[0]]   # exact: n ≤ iters
        ([1.0, 2.0, 3.0, 4.0], [0.25, 0.25, 0.25, 0.25])
    """
    for name, value in (("probes", probes), ("iters", iters)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    nodes, weights = [], []
    for _ in range(probes):
        t = tridiagonalize(op, rademacher(op, generator), iters)
        if not t.finite:
            return [], [], False
        theta, S = torch.linalg.eigh(t.matrix())
        nodes.append(theta.tolist())
        weights.append((S[0] ** 2).tolist())
    return nodes, weights, True


@dataclass(frozen=True)
class DensityReport(MeasurementInfo):
    """A spectral density measured by an optimizer (:meth:`stableopt.Adam.spectral_density`).

    Attributes:
        step: optimizer steps taken when measured.
        nodes: per probe, the Ritz values θ_j (ascending).
        weights: per probe, the quadrature weights w_j (each probe's sum to 1).
        probes: the probes asked for.
        iters: the Lanczos steps per probe asked for (``hvps``: the products spent).
        threshold: the stability threshold τ on P⁻¹H when ``preconditioned`` and every param
            group has the same τ (keyword-only); NaN otherwise (a density of H, or groups with
            different thresholds, whose edge is not one point on this axis).
        preconditioned: the density of the eigenvalues of P⁻¹H (else of H); the other
            :class:`~stableopt.trace.MeasurementInfo` fields as there.
    """

    step: int
    nodes: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    probes: int
    iters: int
    hvps: int
    threshold: float = field(default=math.nan, kw_only=True)

    def _flat(self) -> tuple[np.ndarray, np.ndarray]:
        theta = np.array([x for row in self.nodes for x in row], dtype=np.float64)
        w = np.array([x for row in self.weights for x in row], dtype=np.float64) / max(len(self.nodes), 1)
        return theta, w

    def moment(self, k: int = 1) -> float:
        """Σ w·θᵏ averaged over probes: an estimate of tr(Aᵏ)/n (k = 1: the mean eigenvalue)."""
        theta, w = self._flat()
        return float(np.sum(w * theta**k)) if len(theta) else math.nan

    @property
    def support(self) -> tuple[float, float]:
        """(smallest, largest) node: estimates of λ_min and λ_max (from inside)."""
        theta, _ = self._flat()
        return (float(theta.min()), float(theta.max())) if len(theta) else (math.nan, math.nan)

    def default_sigma(self) -> float:
        """The default Gaussian width: 1/100 of the node range (1e-3 of the scale if flat)."""
        return smoothing_width(*self.support)

    def density(self, grid: Sequence[float] | np.ndarray | Any, sigma: float | None = None) -> np.ndarray:
        """φ_σ(t) = Σ_j w_j·N(t; θ_j, σ²), averaged over probes, at each point of ``grid``.

        It integrates to 1 over the real line.

        >>> rep = DensityReport(0, ((0.0, 1.0),), ((0.5, 0.5),), 1, 2, 2, size=2)
        >>> rep.density([0.0, 0.5], sigma=0.1).round(3).tolist()
        [1.995, 0.0]
        """
        sigma = check_sigma(self.default_sigma() if sigma is None else sigma)
        t = np.asarray(grid, dtype=np.float64).reshape(-1, 1)
        theta, w = self._flat()
        z = (t - theta[None, :]) / sigma
        return (np.exp(-0.5 * z * z) @ w) / (sigma * math.sqrt(2 * math.pi))

    def __str__(self) -> str:
        what = "P⁻¹H" if self.preconditioned else "H"
        lo, hi = self.support
        ratio = edge_ratio(hi, self.threshold)  # +inf for a threshold <= 0
        edge = f", top node / threshold {ratio:.3f}" if math.isfinite(self.threshold) else ""
        return (
            f"step {self.step}: spectral density of {what} from {self.probes} probes × {self.iters} Lanczos steps: "
            f"support [{lo:.4g}, {hi:.4g}], mean {self.moment(1):.4g}{edge} ({self.hvps} HVPs, {self.seconds:.3f} s)"
        )
