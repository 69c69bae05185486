"""A figure of a :class:`~stableopt.DensityReport`: the smoothed eigenvalue density, log scale.

Drawn like PyHessian's density plots (Yao et al. 2020): the Gaussian-smoothed density on a
logarithmic axis (the bulk near zero and the few outliers at the top differ by orders of
magnitude), with the nodes of every probe as ticks and, optionally, a threshold line. Uses the
same private Agg canvas as :func:`stableopt.plot_history` (pyplot's global state is left alone).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .plot import _matplotlib

__all__ = ["plot_density"]


def plot_density(
    report: Any,
    path: str | os.PathLike[str],
    *,
    sigma: float | None = None,
    points: int = 600,
    threshold: float | None = None,
    title: str | None = None,
    dpi: int = 150,
) -> Any:
    """Write the density of ``report`` to ``path`` (format from the suffix) and return the Figure.

    Args:
        report: a :class:`stableopt.DensityReport`.
        path: the image file.
        sigma: Gaussian width (default :meth:`DensityReport.default_sigma`).
        points: grid points between the smallest and largest node (padded by 5σ).
        threshold: draw a vertical line there (e.g. the stability threshold τ).
        title: the figure title (default: what was measured, at which step).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the report has no nodes (a failed measurement).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    if not report.nodes or not any(report.nodes):
        raise ValueError("the density report has no nodes to plot (was the measurement finite?)")
    sigma = report.default_sigma() if sigma is None else sigma
    lo, hi = report.support
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    phi = report.density(grid, sigma)
    fig = Figure(figsize=(6.4, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    floor = max(float(phi.max()) * 1e-8, 1e-300)
    ax.semilogy(grid, np.maximum(phi, floor), color="C0", lw=1.4)
    for row in report.nodes:
        ax.plot(row, np.full(len(row), floor), "|", color="C0", alpha=0.4, ms=8)
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.0, label=f"threshold {threshold:.4g}")
        ax.legend(frameon=False, fontsize=8)
    what = r"$P^{-1}H$" if report.preconditioned else r"$H$"
    ax.set_xlabel(f"eigenvalue of {what}")
    ax.set_ylabel(f"density (σ = {sigma:.2g})")
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(
        title or f"spectral density of {what} at step {report.step} ({report.probes} probes × {report.iters} steps)",
        fontsize=10,
    )
    fig.savefig(os.fspath(path))
    return fig
