"""A figure of a :class:`~stableopt.DensityReport`: the smoothed eigenvalue density, log scale.

Drawn like PyHessian's density plots (Yao et al. 2020): the Gaussian-smoothed density on a
logarithmic axis (the bulk near zero and the few outliers at the top differ by orders of
magnitude), with the nodes of every probe as ticks and the threshold τ as a line. Uses the
same private Agg canvas as :func:`stableopt.plot_history` (pyplot's global state is left alone).
"""

from __future__ import annotations

import os
from typing import Any

from .density_view import draw_densities
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
        threshold: draw a vertical line there; by default the report's own ``threshold`` τ
            when it has one (a preconditioned density with one common threshold).
        title: the figure title (default: what was measured, at which step).

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: the report has no nodes (a failed measurement).
    """
    Figure, FigureCanvasAgg = _matplotlib()
    if not report.nodes or not any(report.nodes):
        raise ValueError("the density report has no nodes to plot (was the measurement finite?)")
    fig = Figure(figsize=(6.4, 3.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    draw_densities(ax, [report], sigma=sigma, points=points, threshold=threshold)
    ax.grid(alpha=0.25)
    ax.spines[["top", "right"]].set_visible(False)
    what = r"$P^{-1}H$" if report.preconditioned else r"$H$"
    fig.suptitle(
        title or f"spectral density of {what} at step {report.step} ({report.probes} probes × {report.iters} steps)",
        fontsize=10,
    )
    fig.savefig(os.fspath(path))
    return fig
