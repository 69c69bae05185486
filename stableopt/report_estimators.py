"""Report rows of the extra estimators: per-block sharpness (sorted by ratio), the tracked λ_max
and the latest spectral density.

:func:`add_estimator_rows` is called by :func:`stableopt.render_report` and reads only history
columns (``block_<name>_ratio``/``_lmax``, the tracking and density tables), so a saved history
shows the same rows as a live one.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from rich.table import Table
from rich.text import Text

from .density_view import add_density_rows
from .monitor import zone

__all__ = ["add_estimator_rows", "block_table", "latest_blocks"]

#: the report lists this many blocks (the highest ratios); the rest are counted
MAX_BLOCK_ROWS = 8


def _style(ratio: float) -> str:
    from .report import ZONE_STYLE  # report imports this module

    return ZONE_STYLE[zone(ratio)]


def latest_blocks(history: Any) -> tuple[int, list[tuple[str, float, float]]]:
    """(step, [(name, λ_max, ratio), ...] sorted by ratio, highest first) of the latest
    measurement that measured blocks; (−1, []) if none did.

    >>> import stableopt
    >>> latest_blocks(stableopt.History())
    (-1, [])
    """
    cols = history.to_dict()
    names = [c[len("block_") : -len("_ratio")] for c in cols if c.startswith("block_") and c.endswith("_ratio")]
    if not names or not len(cols["step"]):
        return -1, []
    ratios = np.stack([cols[f"block_{n}_ratio"] for n in names])
    shown = np.isfinite(ratios) | (ratios == np.inf)  # +inf: a block with a threshold <= 0
    rows = np.flatnonzero(shown.any(axis=0))
    if not len(rows):
        return -1, []
    i = int(rows[-1])
    out = []
    for n in names:
        lmax = cols.get(f"block_{n}_lmax")
        ratio = float(cols[f"block_{n}_ratio"][i])
        if math.isfinite(ratio) or ratio == math.inf:
            out.append((n, float(lmax[i]) if lmax is not None else math.nan, ratio))
    out.sort(key=lambda row: -row[2])
    return int(cols["step"][i]), out


def block_table(history: Any) -> Table | None:
    """The per-block table of the latest block measurement (None when there is none)."""
    step, rows = latest_blocks(history)
    if not rows:
        return None
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("block", no_wrap=True)
    table.add_column("λ_max(P_b⁻¹H_bb)", justify="right")
    table.add_column("ratio", justify="right")
    for name, lmax, ratio in rows[:MAX_BLOCK_ROWS]:
        table.add_row(Text(name), f"{lmax:.4g}", Text(f"{ratio:.3f}", style=_style(ratio)))
    more = f", {len(rows) - MAX_BLOCK_ROWS} more not shown" if len(rows) > MAX_BLOCK_ROWS else ""
    table.caption = f"step {step}, {len(rows)} blocks by ratio{more}"
    table.caption_style = "dim"
    return table


def add_estimator_rows(grid: Table, history: Any) -> None:
    """Add the block table, the tracking line and the density line (when the history has them)
    to ``grid``."""
    table = block_table(history)
    if table is not None:
        grid.add_row("per block", table)
    track = history.tracking() if hasattr(history, "tracking") else {}
    if len(track.get("track_step", ())):
        ratio = float(track["track_ratio"][-1])
        grid.add_row(
            "tracked λ_max",
            Text.assemble(
                (f"{float(track['track'][-1]):.4g}", "bold"),
                "  ratio ",
                (f"{ratio:.3f}" if math.isfinite(ratio) or ratio == math.inf else "—", _style(ratio)),
                f"  residual ≤ {float(track['track_residual'][-1]):.2g}",
                (f"\n{len(track['track_step'])} steps, ≤ {int(track['track_hvps'].max())} HVPs each", "dim"),
            ),
        )
    add_density_rows(grid, history)
