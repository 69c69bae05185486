"""How the report panel and the figures show spectral densities (:mod:`stableopt.density`).

:func:`draw_densities` draws Gaussian-smoothed densities on a log axis (as PyHessian does, Yao
et al. 2020: the bulk near zero and the few outliers at the top differ by orders of magnitude)
for :func:`stableopt.plot_density` and for the density panel of :func:`stableopt.plot_history`;
:func:`densities_to_draw` picks which of a history's densities that panel shows and
:func:`add_density_rows` adds the latest one to the report. All read only what a history
records, so a saved history shows the same as a live one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .density import check_sigma, smoothing_width
from .thresholds import edge_ratio

__all__ = ["MAX_DRAWN", "add_density_rows", "densities_to_draw", "draw_densities"]

#: the history figure overlays at most this many densities (spread over the run, the latest last)
MAX_DRAWN = 4


def densities_to_draw(history: Any) -> list[Any]:
    """Up to :data:`MAX_DRAWN` recorded densities with nodes, of one kind (of P⁻¹H when there
    are any, else of H), spread evenly over the run and always including the latest.

    >>> import stableopt
    >>> densities_to_draw(stableopt.History())
    []
    """
    # with nodes, and a node range that a float64 grid can hold (a file may hold ±1e308)
    reports = [d for d in history.densities() if any(d.nodes) and math.isfinite(d.support[1] - d.support[0])]
    kind = [d for d in reports if d.preconditioned] or reports
    if len(kind) <= MAX_DRAWN:
        return kind
    picks = np.unique(np.linspace(0, len(kind) - 1, MAX_DRAWN).round().astype(int))
    return [kind[int(i)] for i in picks]


def _tick(x: float) -> str:
    """A threshold for a legend: ``38,000`` rather than ``3.8e+04``.

    >>> _tick(38000.0), _tick(0.25), _tick(2.5e9)
    ('38,000', '0.25', '2.5e+09')
    """
    return f"{x:,.0f}" if 1e3 <= abs(x) < 1e7 else f"{x:.4g}"


def draw_densities(
    ax: Any,
    reports: Sequence[Any],
    *,
    sigma: float | None = None,
    points: int = 600,
    threshold: float | None = None,
) -> float:
    """Draw the smoothed density of each report on ``ax`` (log y axis); returns σ (default:
    :func:`~stableopt.density.smoothing_width` of all the reports' nodes).

    Each report's nodes are ticks at the bottom. ``threshold`` draws one vertical line; without
    it, each report's own finite ``threshold`` is drawn (one black line when they agree). With
    several reports, each curve is labelled with its step.
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise ValueError(f"points must be an integer >= 2, got {points!r}")
    lo = min(d.support[0] for d in reports)
    hi = max(d.support[1] for d in reports)
    sigma = check_sigma(smoothing_width(lo, hi) if sigma is None else sigma)
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, points)
    curves = [d.density(grid, sigma) for d in reports]
    floor = max(max(float(phi.max()) for phi in curves) * 1e-8, 1e-300)
    several = len(reports) > 1
    for i, (d, phi) in enumerate(zip(reports, curves)):
        color = f"C{i}" if several else "C0"
        label = f"step {d.step}" if several else None
        ax.semilogy(grid, np.maximum(phi, floor), color=color, lw=1.4, label=label)
        for row in d.nodes:
            ax.plot(row, np.full(len(row), floor), "|", color=color, alpha=0.4, ms=8)
    own = [float(d.threshold) for d in reports if math.isfinite(d.threshold)]
    if threshold is not None:
        ax.axvline(threshold, color="black", ls="--", lw=1.0, label=f"threshold {_tick(threshold)}")
    elif own and max(own) - min(own) <= 1e-12 * max(abs(t) for t in own):
        ax.axvline(own[-1], color="black", ls="--", lw=1.0, label=f"threshold τ = {_tick(own[-1])}")
    else:
        for i, d in enumerate(reports):
            if math.isfinite(d.threshold):
                color = f"C{i}" if several else "C0"
                ax.axvline(d.threshold, color=color, ls="--", lw=0.8, label=f"τ at step {d.step}")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)
    what = r"$P^{-1}H$" if reports[-1].preconditioned else r"$H$"
    ax.set_xlabel(f"eigenvalue of {what}")
    ax.set_ylabel(f"density (σ = {sigma:.2g})")
    return sigma


def add_density_rows(grid: Any, history: Any) -> None:
    """One report row for the latest recorded density: support, mean, top node against τ."""
    from rich.text import Text

    from .report import _num

    reports = history.densities()
    if not reports:
        return
    d = reports[-1]
    what = "P⁻¹H" if d.preconditioned else "H"
    if not any(d.nodes):
        body = Text.assemble((f"step {d.step}: not finite (no nodes)", "red"))
    else:
        lo, hi = d.support
        body = Text.assemble(
            (f"step {d.step}", "bold"),
            f"  eigenvalues of {what} in [{_num(lo)}, {_num(hi)}], mean {_num(d.moment(1))}",
        )
        if math.isfinite(d.threshold):  # +inf for τ <= 0 (stableopt.thresholds)
            body.append(f"  top node / τ {edge_ratio(hi, d.threshold):.3f}")
    hvps = sum(r.hvps for r in reports)
    seconds = sum(r.seconds for r in reports)
    body.append(
        f"\n{len(reports)} densit{'ies' if len(reports) != 1 else 'y'} recorded ({hvps:,} HVPs, {seconds:,.2f} s "
        f"in all), the latest of {d.probes} probes × {d.iters} Lanczos steps; stableopt report --plot draws them",
        style="dim",
    )
    grid.add_row("spectral density", body)
