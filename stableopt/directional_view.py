"""How the report panel and the history figure show directional sharpness (:mod:`stableopt.directional`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .history import DIRECTIONAL_KINDS
from .monitor import zone

__all__ = ["add_directional_rows", "plot_directional"]

#: the report shows the largest directional ratio of this many latest measurements
DIRECTIONAL_WINDOW = 100


def _by_kind(history: Any) -> list[tuple[str, dict[str, np.ndarray]]]:
    if "directional_step" not in history:  # a history from before the directional table
        return []
    return [(kind, cols) for kind in DIRECTIONAL_KINDS if len((cols := history.directional(kind))["directional"])]


def add_directional_rows(grid: Any, history: Any) -> None:
    """One row of the report ``grid`` per direction measured: latest value and ratio, recent peak."""
    from rich.text import Text

    from .report import ZONE_STYLE, _num

    for kind, cols in _by_kind(history):
        ratio = float(cols["directional_ratio"][-1])
        recent = cols["directional_ratio"][-DIRECTIONAL_WINDOW:]
        recent = recent[np.isfinite(recent) | (recent == np.inf)]  # +inf: a threshold <= 0
        peak = float(recent.max()) if len(recent) else math.nan
        grid.add_row(
            f"along the {kind}",
            Text.assemble(
                (_num(float(cols["directional"][-1])), "bold"),
                "  ratio ",
                (f"{ratio:.3f}" if math.isfinite(ratio) or ratio == math.inf else "—", ZONE_STYLE[zone(ratio)]),
                f"  (max {peak:.3f} over the last {len(recent)} measurements)",
                ("\nuᵀHu/uᵀPu, one HVP each: a lower bound on λ_max(P⁻¹H); noisy with mini-batches", "dim"),
            ),
        )


def plot_directional(history: Any, ax: Any) -> float:
    """Draw each measured direction's uᵀHu/uᵀPu on ``ax`` (the λ_max(P⁻¹H) panel); returns the
    largest finite value drawn (NaN: none).

    A history without λ_max measurements also gets the threshold the directional ratios imply
    (value / ratio, dashed), so the panel still shows where the edge is."""
    colors = {"update": "C1", "gradient": "C4", "explicit": "C5"}
    top = math.nan
    measured = len(history.column("step")) > 0
    for kind, cols in _by_kind(history):
        ok = np.isfinite(cols["directional"])
        ax.plot(
            cols["directional_step"][ok],
            cols["directional"][ok],
            color=colors[kind],
            alpha=0.5,
            lw=0.7,
            label=f"along the {kind} (lower bound)",
        )
        if ok.any():
            top = float(np.nanmax([top, float(cols["directional"][ok].max())]))
        if not measured:
            with np.errstate(all="ignore"):
                tau = cols["directional"] / cols["directional_ratio"]
            good = np.isfinite(tau) & (tau > 0)
            if good.any():
                label = "threshold" if "threshold" not in ax.get_legend_handles_labels()[1] else None
                ax.plot(cols["directional_step"][good], tau[good], color="black", ls="--", lw=1.2, label=label)
                top = float(np.nanmax([top, float(tau[good].max())]))
    return top
