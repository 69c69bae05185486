"""A Figure-1-style plot of a :class:`~stableopt.History` (Cohen et al. 2022, arXiv:2207.14484).

Three panels sharing the step axis: the preconditioned sharpness λ_max(P⁻¹H) with the stability
threshold, the raw sharpness λ_max(H), and the loss at the measured steps; below them, when the
history recorded spectral densities (``opt.spectral_density``), a panel of up to four of them
on the eigenvalue axis (:mod:`stableopt.density_view`). matplotlib comes with
the ``examples`` extra (``pip install "stableopt[examples]"``); the figure is drawn on a private
Agg canvas, so pyplot's global state and backend are left alone.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from ._atomic import atomic_write
from ._text import literal
from .density_view import densities_to_draw, draw_densities
from .directional_view import plot_directional

__all__ = ["plot_history"]


def _matplotlib() -> Any:
    try:
        importlib.import_module("matplotlib")  # the package itself, not only cached submodules
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            'stableopt.plot_history needs matplotlib: pip install matplotlib (or pip install "stableopt[examples]")'
        ) from None
    return Figure, FigureCanvasAgg


def plot_history(history: Any, path: str | os.PathLike[str], *, title: str | None = None, dpi: int = 150) -> Any:
    """Write the figure of ``history`` to ``path`` (format from the suffix: .png, .pdf, .svg).

    Returns the matplotlib ``Figure``.

    The image is written atomically (a temporary file in the same directory, renamed into
    place: see :mod:`stableopt._atomic`). The optimizer name in the default title is shown
    literally; an explicit ``title`` is matplotlib text (``$...$`` is mathtext).

    A history with recorded spectral densities gets a last panel with up to four of them
    (spread over the run, the latest included) and the threshold τ; a history with densities
    but no sharpness measurements gets that panel alone.

    Raises:
        ImportError: matplotlib is not installed (the message says how to install it).
        ValueError: the history has no measurements, directional sharpness or densities, the
            suffix names no image format matplotlib writes, or the path is a directory, FIFO, device or missing directory.
    """
    with np.errstate(all="ignore"):  # values near ±1e308 overflow matplotlib's autoscaling sums
        return _plot(history, os.fspath(path), title, dpi)


def _plot(history: Any, path: str, title: str | None, dpi: int) -> Any:
    Figure, FigureCanvasAgg = _matplotlib()
    suffix = os.path.splitext(path)[1][1:].lower()
    cols = history.to_dict()
    steps = cols["step"]
    densities = densities_to_draw(history)
    directional = len(history.column("directional_step")) > 0
    if not len(steps) and not densities and not directional:
        raise ValueError("the history has no measurements (nor directional sharpness or spectral densities) to plot")
    has_raw = bool(np.isfinite(cols["raw"]).any())
    # with no λ_max measurement, directional sharpness alone: one panel over the steps
    panels = (3 if has_raw else 2) if len(steps) else (1 if directional else 0)
    height = 2.1 * panels + (2.6 if densities else 0.0) + 0.5
    fig = Figure(figsize=(7.0, height), dpi=dpi, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    import matplotlib

    fmt = suffix or str(matplotlib.rcParams["savefig.format"])
    if fmt not in canvas.get_supported_filetypes():
        raise ValueError(
            f"{literal(path)}: matplotlib cannot write .{literal(fmt, 20)} images; use one of "
            f"{sorted(canvas.get_supported_filetypes())}"
        )
    ratios = [2.1] * panels + ([2.6] if densities else [])
    every = fig.subplots(len(ratios), 1, squeeze=False, gridspec_kw={"height_ratios": ratios})[:, 0]
    if densities:
        ax = every[-1]
        draw_densities(ax, densities)
        ax.set_title("spectral density (stochastic Lanczos quadrature)", fontsize=9, loc="left")
        ax.grid(alpha=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    if panels:
        _plot_steps(history, cols, list(every[:panels]), has_raw)
    if title is None:
        name = history.optimizer_name
        title = f"{_plain(name)}: the (adaptive) edge of stability" if name != "unknown" else None
    if title:
        fig.suptitle(title, fontsize=11)
    atomic_write(path, lambda f: fig.savefig(f, format=fmt))
    return fig


def _plot_steps(history: Any, cols: dict[str, np.ndarray], axes: list[Any], has_raw: bool) -> None:
    """The panels over the step axis: sharpness (with secant and directional), raw, loss."""
    steps = cols["step"]
    for a in axes[1:]:
        a.sharex(axes[0])
    for a in axes[:-1]:
        a.tick_params(labelbottom=False)

    def finite(name: str) -> tuple[np.ndarray, np.ndarray]:
        ok = np.isfinite(cols[name])
        return steps[ok], cols[name][ok]

    marker = "o" if len(steps) <= 40 else None
    ax = axes[0]
    if len(steps):
        ax.plot(*finite("preconditioned"), color="C0", lw=1.6, marker=marker, ms=3, label=r"$\lambda_{\max}(P^{-1}H)$")
        ax.plot(*finite("threshold"), color="black", ls="--", lw=1.2, label="threshold")
    sec = history.secant()
    if len(sec["secant"]):
        ax.plot(
            sec["secant_step"], sec["secant"], color="C0", alpha=0.25, lw=0.6, label="secant estimate (lower bound)"
        )
    top_directional = plot_directional(history, ax)
    ok = np.isfinite(cols["preconditioned"])
    top = (
        np.nanmax(np.concatenate([cols["preconditioned"][ok], cols["threshold"][np.isfinite(cols["threshold"])]]))
        if ok.any()
        else (top_directional if top_directional > 0 else 1.0)  # NaN compares False: 1.0
    )
    ax.set_ylim(0, 1.15 * top)
    ax.set_ylabel("preconditioned\nsharpness")
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    if len(axes) == 1:  # directional sharpness only
        ax.set_xlabel("step")
        return

    if has_raw:
        ax = axes[1]
        ax.plot(*finite("raw"), color="C3", lw=1.6, marker="o" if np.isfinite(cols["raw"]).sum() <= 40 else None, ms=3)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("raw sharpness\n" + r"$\lambda_{\max}(H)$")

    ax = axes[-1]
    loss_steps, loss = finite("loss")
    ax.plot(loss_steps, loss, color="C2", lw=1.6)
    if len(loss) > 1 and np.all(loss > 0):
        ax.set_yscale("log")
    ax.set_ylabel("train loss\n(at measurements)")
    ax.set_xlabel("step")

    for event in history.events():
        for a in axes:
            a.axvline(event.step, color="orange", lw=0.8, alpha=0.6)
    for a in axes:
        a.grid(alpha=0.25)
        a.spines[["top", "right"]].set_visible(False)


def _plain(name: str) -> str:
    r"""``name`` as literal matplotlib text: control characters visible, ``$`` not mathtext.

    >>> _plain("a$b\x1b")
    'a\\$b\\x1b'
    """
    return literal(name, 100).replace("$", r"\$")
