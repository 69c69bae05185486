"""The rich report of a :class:`~stableopt.History`: where training stands relative to the edge.

:func:`render_report` returns a rich ``Panel`` (for your own console or ``Live``);
``opt.report()`` prints it; ``stableopt report FILE`` prints it for a saved history together
with :func:`terminal_chart`. The ratio λ_max(P⁻¹H)/threshold is coloured by zone: green *below*
the edge (ratio < 0.9), yellow *at* it (0.9 ≤ ratio ≤ 1.1), red *above* it (ratio > 1.1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ._text import literal, text
from .directional_view import add_directional_rows
from .monitor import ABOVE, BELOW, zone
from .report_estimators import add_estimator_rows
from .thresholds import edge_ratio

__all__ = ["print_report", "render_report", "render_saved", "sparkline", "terminal_chart", "trend"]

ZONE_STYLE = {"below": "green", "at": "yellow", "above": "bold red", "unknown": "dim"}
ZONE_WORDS = {
    "below": "below the edge",
    "at": "at the edge",
    "above": "above the edge",
    "unknown": "not measured (NaN)",
}
_BLOCKS = "▁▂▃▄▅▆▇█"
#: the secant line of the report shows the largest secant ratio of this many latest steps
SECANT_WINDOW = 100


def _resample(values: np.ndarray, width: int) -> np.ndarray:
    """At most ``width`` values: the last value of each of ``width`` equal chunks."""
    if len(values) <= width:
        return values
    edges = np.linspace(0, len(values), width + 1).astype(int)
    return np.array([values[e - 1] for e in edges[1:]])


def _fraction(v: float, lo: float, hi: float) -> float:
    """Where ``v`` lies in [lo, hi] as a number in [0, 1], without overflow for any finite
    doubles (halves first: ``hi - lo`` overflows for ±1e308)."""
    frac = (min(max(v, lo), hi) / 2 - lo / 2) / (hi / 2 - lo / 2)
    return frac if math.isfinite(frac) else 0.0


def sparkline(values: Sequence[float], *, width: int = 48, top: float | None = None, zones: bool = False) -> Text:
    """A one-line block chart of ``values`` (scaled 0 … ``top``, default the max), NaN as space.

    With ``zones=True`` each block is coloured by the edge zone of its value (for ratios).

    >>> sparkline([0.0, 0.5, 1.0]).plain
    '▁▅█'
    """
    vals = _resample(np.asarray(values, dtype=float), width)
    finite = vals[np.isfinite(vals)]
    text = Text()
    if not len(finite):
        return text
    lo = min(0.0, float(finite.min()))
    hi = float(top) if top is not None else float(finite.max())
    hi = max(hi, lo + 1e-300)
    for v in vals:
        if not math.isfinite(v) and v != math.inf:  # +inf (a ratio at a threshold <= 0): the top
            text.append(" ")
            continue
        level = int(round(_fraction(v, lo, hi) * (len(_BLOCKS) - 1)))
        text.append(_BLOCKS[level], style=ZONE_STYLE[zone(v)] if zones else "cyan")
    return text


def trend(steps: np.ndarray, values: np.ndarray, *, window: int = 5) -> tuple[str, float] | None:
    """(arrow, relative change) of ``values`` over the last ``window`` finite measurements."""
    ok = np.isfinite(values)
    steps, values = steps[ok][-window:], values[ok][-window:]
    if len(values) < 2 or values[0] == 0:
        return None
    change = float(values[-1] / values[0] - 1.0)
    arrow = "↑" if change > 0.02 else ("↓" if change < -0.02 else "→")
    return arrow, change


def _num(x: float, digits: int = 4) -> str:
    if not math.isfinite(x):
        return "—"
    if x != 0 and (abs(x) >= 1e6 or abs(x) < 1e-3):
        return f"{x:.{digits - 1}e}"
    return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _group_count(history: Any) -> int:
    count = 0
    for name in history.columns():
        prefix, _, index = name.rpartition("_")
        if prefix in ("lr", "threshold") and index.isdigit():
            count = max(count, int(index) + 1)
    return count


def _title(history: Any, title: str | Text | None) -> Text:
    """The panel title, shown literally (a ``Text`` is used as given)."""
    if isinstance(title, Text):
        return title
    if title is None:
        name = history.optimizer_name
        title = f"stableopt · {name}" if name != "unknown" else "stableopt"
    return text(title, "bold", limit=120)


def _backends(history: Any) -> str:
    """Which Hessian-vector-product backend measured, e.g. ``fd`` or ``fd (12), autograd (1)``."""
    names = history.hvp_backends() if hasattr(history, "hvp_backends") else []
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    if len(counts) == 1:
        return next(iter(counts))
    return ", ".join(f"{name} ({n})" for name, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "unknown"


def _product_error(cols: Any) -> str:
    """``, product error ≤ 3.1e-05`` when some measurement used approximate (fd) products."""
    errors = cols.get("hvp_error")
    if errors is None or not len(errors):
        return ""
    known = errors[~np.isnan(errors)]
    if not len(known) or float(known.max()) == 0.0:
        return ""
    return f", product error ≤ {float(known.max()):.1e}"


def _grid() -> Table:
    """The report's two-column grid: a bold label, then its value."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    return grid


def render_report(history: Any, *, title: str | Text | None = None, spark_width: int = 32) -> Panel:
    """The report panel of ``history``: per group lr and threshold, the latest λ_max(P⁻¹H) and
    ratio (coloured by zone), a sparkline of the ratio, raw sharpness and its trend, the
    secant estimate, guard events and the cost of measuring.

    Every string that comes from the history (optimizer name, event reasons) or from
    ``title`` is shown literally: rich markup is not interpreted and control characters
    appear escaped (``\\x1b``); pass a rich ``Text`` as ``title`` for a styled one.
    """
    title = _title(history, title)
    n = len(history)
    if n == 0:
        body: RenderableType = Text(
            "No measurements yet: call opt.sharpness(loss_fn) or opt.monitor(loss_fn, every=N).",
            style="dim",
        )
        extra = _grid()  # what other tables hold (directional, density...)
        add_directional_rows(extra, history)
        add_estimator_rows(extra, history)
        if extra.row_count:
            body = Group(body, Text(""), extra)
        return Panel(body, title=title, title_align="left", border_style="dim")
    cols = history.to_dict()
    steps = cols["step"]
    last = {key: values[-1] for key, values in cols.items()}
    ratio = float(last["ratio"])
    z = zone(ratio)
    style = ZONE_STYLE[z]

    groups = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    groups.add_column("group", justify="right")
    groups.add_column("lr", justify="right")
    groups.add_column("threshold τ", justify="right")
    groups.add_column("λ_max(P⁻¹H)/τ", justify="right")
    for g in range(_group_count(history)):
        lr = float(last.get(f"lr_{g}", math.nan))
        tau = float(last.get(f"threshold_{g}", math.nan))
        per = edge_ratio(float(last["preconditioned"]), tau)  # +inf for τ <= 0
        groups.add_row(
            str(g),
            f"{lr:.4g}",
            _num(tau),
            Text(f"{per:.3f}" if math.isfinite(per) else "—", style=ZONE_STYLE[zone(per)]),
        )

    grid = _grid()
    converged = "" if bool(last["converged"]) else "  [red](Lanczos did not converge)[/]"
    scheduled = int((cols["monitor"] >= 0).sum())
    grid.add_row(
        "step",
        f"{int(last['step'])}   [dim]{n} measurement{'s' if n != 1 else ''}: {scheduled} scheduled, "
        f"{n - scheduled} manual[/]",
    )
    grid.add_row("loss", _num(float(last["loss"]), 5))
    grid.add_row(
        "λ_max(P⁻¹H)",
        f"{_num(float(last['preconditioned']))}   [dim]threshold {_num(float(last['threshold']))}[/]{converged}",
    )
    grid.add_row(
        "ratio", Text.assemble((f"{ratio:.3f}", style), "  ", (ZONE_WORDS[z], style), ("   1 = the edge", "dim"))
    )
    ratios = cols["ratio"]
    finite_ratio = ratios[np.isfinite(ratios)]
    top = max(1.25, float(finite_ratio.max()) if len(finite_ratio) else 1.25)
    spark = sparkline(ratios, width=spark_width, top=top, zones=True)
    spark.append(f"  0–{_num(top, 3)}, steps {int(steps[0])}–{int(steps[-1])}", style="dim")
    grid.add_row("ratio history", spark)
    if "eig_1" in cols:
        eigs = [float(last[f"eig_{i}"]) for i in range(sum(1 for c in cols if c.startswith("eig_")))]
        grid.add_row("top-k of P⁻¹H", ", ".join(_num(e) for e in eigs))
    raw = cols["raw"]
    if np.isfinite(raw).any():
        ok = np.isfinite(raw)
        latest_raw = float(raw[ok][-1])
        text = Text(f"{_num(latest_raw)}", style="bold")
        tr = trend(steps, raw)
        if tr is not None:
            arrow, change = tr
            first = int(steps[ok][-5:][0])
            text.append(f"  {arrow} {change:+.1%} since step {first}", style="magenta" if arrow == "↑" else "cyan")
        text.append("  ")
        text.append_text(sparkline(raw[ok], width=24))
        grid.add_row("raw λ_max(H)", text)
    sec = history.secant()
    if len(sec["secant"]):
        s_ratio = float(sec["secant_ratio"][-1])
        recent = sec["secant_ratio"][-SECANT_WINDOW:]
        recent = recent[np.isfinite(recent) | (recent == np.inf)]  # +inf: a threshold <= 0
        peak = float(recent.max()) if len(recent) else math.nan
        grid.add_row(
            "secant estimate",
            Text.assemble(
                (_num(float(sec["secant"][-1])), "bold"),
                "  ratio ",
                (f"{s_ratio:.3f}", ZONE_STYLE[zone(s_ratio)]),
                f"  (max {peak:.3f} over the last {len(recent)} steps)",
                ("\na lower bound; meaningful for full-batch training only", "dim"),
            ),
        )
    add_directional_rows(grid, history)
    events = history.events()
    if events:
        lines = Text()
        for i, ev in enumerate(events[-3:]):
            if i:
                lines.append("\n")
            lines.append(
                f"step {ev.step} group {ev.group}: lr ×{ev.old_factor:.3g} → ×{ev.new_factor:.3g} at ratio {ev.ratio:.3f}",
                style="yellow",
            )
            if ev.reason:
                lines.append(f" ({literal(ev.reason)})", style="dim")
        if len(events) > 3:
            lines.append(f"\n({len(events)} in all, the latest 3 shown)", style="dim")
        grid.add_row("guard events", lines)
    add_estimator_rows(grid, history)
    seconds = float(cols["seconds"].sum())
    elapsed = float(last["elapsed"])
    share = (
        f" = {seconds / elapsed:.1%} of {elapsed:,.1f} s wall time" if math.isfinite(elapsed) and elapsed > 0 else ""
    )
    grid.add_row("cost", f"{int(cols['hvps'].sum()):,} HVPs, {seconds:,.2f} s{share}")
    grid.add_row("HVPs by", _backends(history) + _product_error(cols))
    legend = Text.assemble(
        ("zones: ", "dim"),
        ("below", ZONE_STYLE["below"]),
        (f" < {BELOW} ≤ ", "dim"),
        ("at", ZONE_STYLE["at"]),
        (f" ≤ {ABOVE} < ", "dim"),
        ("above", ZONE_STYLE["above"]),
    )
    return Panel(
        Group(groups, Text(""), grid, Text(""), legend),
        title=title,
        title_align="left",
        subtitle=f"[{style}]{ZONE_WORDS[z]}[/]",
        subtitle_align="right",
        border_style=style if z != "unknown" else "dim",
        expand=False,
    )


def print_report(history: Any, console: Console | None = None) -> None:
    """Print :func:`render_report` to ``console`` (default: a new rich console on stdout)."""
    (console or Console()).print(render_report(history))


# -- terminal chart ---------------------------------------------------------------------------
def _line_cells(rows: list[int], height: int) -> list[list[str]]:
    """asciichart-style line through one row index per column (0 = top): ─ ╭ ╮ ╰ ╯ │."""
    width = len(rows)
    cells = [[" "] * width for _ in range(height)]
    for x in range(width):
        a = rows[x]
        if a < 0:
            continue
        b = rows[x + 1] if x + 1 < width else a
        if b < 0 or b == a:
            cells[a][x] = "─"
        elif b < a:  # going up
            cells[a][x], cells[b][x] = "╯", "╭"
            for r in range(b + 1, a):
                cells[r][x] = "│"
        else:  # going down
            cells[a][x], cells[b][x] = "╮", "╰"
            for r in range(a + 1, b):
                cells[r][x] = "│"
    return cells


def _chart(
    title: str,
    xs: np.ndarray,
    ys: np.ndarray,
    *,
    width: int,
    height: int,
    hline: float | None = None,
    zoned: bool = False,
    style: str = "cyan",
) -> Text:
    ok = np.isfinite(ys)
    text = Text()
    text.append(title + "\n", style="bold")
    if not ok.any():
        note = "; +inf: a threshold <= 0" if bool((ys == np.inf).any()) else ""
        text.append(f"  (no finite values{note})\n", style="dim")
        return text
    x0, x1 = float(xs[0]), float(xs[-1])
    xs, ys = xs[ok].astype(float), ys[ok].astype(float)
    lo = min(0.0, float(ys.min()))
    hi = float(ys.max())
    if hline is not None:
        hi = max(hi, hline * 1.25)
    hi = hi if hi > lo else lo + 1.0
    # one value per column: the series interpolated at the column's step (none before the
    # first measured step or after the last)
    grid_x = np.linspace(x0, x1, width) if x1 > x0 else np.full(width, x0)
    values = np.interp(grid_x, xs, ys)
    inside = (grid_x >= xs[0] - 1e-9) & (grid_x <= xs[-1] + 1e-9)

    def row_of(v: float) -> int:
        return int(round((1.0 - _fraction(v, lo, hi)) * (height - 1)))

    rows = [row_of(v) if ins else -1 for v, ins in zip(values, inside)]
    cells = _line_cells(rows, height)
    line_row = row_of(hline) if hline is not None else None
    labels = {0: _num(hi), height - 1: _num(lo)}
    if line_row is not None and hline is not None:
        labels[line_row] = _num(hline)
    label_w = max(len(v) for v in labels.values())
    for r, row in enumerate(cells):
        text.append(f"{labels.get(r, ''):>{label_w}} ┤", style="dim")
        row_value = hi - (hi - lo) * r / (height - 1)
        row_style = ZONE_STYLE[zone(row_value)] if zoned else style
        for _c, ch in enumerate(row):
            if ch != " ":
                text.append(ch, style=row_style)
            elif r == line_row:
                text.append("╌", style="yellow dim")
            else:
                text.append(" ")
        text.append("\n")
    start, end = f"{int(x0)}", f"{int(round(x1))}"
    text.append(" " * label_w + " └" + "─" * width + "\n", style="dim")
    gap = max(1, width - len(start) - len(end) - 5)
    text.append(" " * (label_w + 2) + start + " " * gap + "step " + end + "\n", style="dim")
    return text


def terminal_chart(history: Any, *, width: int = 64, height: int = 10) -> RenderableType:
    """Line charts of the ratio (with the edge, ratio = 1, marked) and raw λ_max(H) over steps."""
    cols = history.to_dict()
    if not len(cols["step"]):
        return Text("")
    steps = cols["step"]
    parts: list[RenderableType] = [
        _chart(
            "ratio λ_max(P⁻¹H) / threshold  (╌╌ the edge, ratio 1)",
            steps,
            cols["ratio"],
            width=width,
            height=height,
            hline=1.0,
            zoned=True,
        )
    ]
    if np.isfinite(cols["raw"]).any():
        parts.append(
            _chart(
                "raw sharpness λ_max(H)",
                steps,
                cols["raw"],
                width=width,
                height=max(4, height // 2 + 1),
                style="magenta",
            )
        )
    return Group(*parts)


def render_saved(history: Any, name: str) -> Group:
    """What ``stableopt report FILE`` prints: a line about the file, the panel, the charts
    (the file name and every metadata string shown literally)."""
    meta = history.metadata
    optimizer = meta.get("optimizer", "?")
    header = Text.assemble(
        text(name, "bold", limit=300),
        f": {len(history)} measurements of ",
        text(meta.get("optimizer", "an optimizer")),
        "\n",
        text(
            f"written by stableopt {meta.get('stableopt_version', '?')} with torch {meta.get('torch_version', '?')}",
            "dim",
        ),
    )
    title = Text.assemble(("stableopt · ", "bold"), text(optimizer, "bold", limit=100))
    return Group(header, render_report(history, title=title), terminal_chart(history))
