"""The console side of monitors: the edge zones, one plain line per measurement (logs without a
terminal) and the rich Live panel that :class:`stableopt.monitor.MonitorSet` keeps per optimizer.

Rich output goes through :mod:`stableopt.report`; this module only decides where it goes.
"""

from __future__ import annotations

import atexit
import math
from typing import Any

__all__ = ["ABOVE", "BELOW", "LiveView", "plain_line", "zone"]

#: ratio zones: below the edge (< BELOW), at it ([BELOW, ABOVE]), above it (> ABOVE)
BELOW, ABOVE = 0.9, 1.1


def zone(ratio: float) -> str:
    """ "below", "at" or "above" the edge of stability (or "unknown" for NaN and −inf); +inf,
    the ratio of a threshold ≤ 0 (:mod:`stableopt.thresholds`), is "above".

    >>> zone(0.5), zone(1.05), zone(1.3), zone(math.inf)
    ('below', 'at', 'above', 'above')
    """
    if ratio == math.inf:
        return "above"
    if not math.isfinite(ratio):
        return "unknown"
    return "below" if ratio < BELOW else ("at" if ratio <= ABOVE else "above")


def plain_line(report: Any) -> str:
    """One plain-text line for a measurement (logs without a terminal: no control codes)."""
    raw = "" if report.raw is None else f" raw={report.raw:.6g}"
    note = "" if report.converged else " NOT converged"
    return (
        f"stableopt step {report.step}: loss={report.loss:.6g} λ_max(P⁻¹H)={report.preconditioned:.6g} "
        f"threshold={report.threshold:.6g} ratio={report.ratio:.4f} ({zone(report.ratio)} the edge)"
        f"{raw} [{report.hvps} HVPs, {report.seconds:.3f} s{note}]"
    )


class LiveView:
    """One rich Live panel per optimizer, or plain lines when the console is not a terminal."""

    def __init__(self, history: Any, console: Any = None) -> None:
        from rich.console import Console

        self.history = history
        self.console = console if console is not None else Console()
        self.live: Any = None
        self._atexit = False

    @property
    def interactive(self) -> bool:
        return bool(self.console.is_terminal)

    def measuring(self, step: int) -> None:
        if not self.interactive:
            return
        from rich.console import Group
        from rich.spinner import Spinner

        from .report import render_report

        if self.live is None:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.start()
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
        spinner = Spinner("dots", text=f"measuring λ_max(P⁻¹H) at step {step}…", style="cyan")
        self.live.update(Group(render_report(self.history), spinner), refresh=True)

    def measured(self, report: Any) -> None:
        if not self.interactive:
            self.console.file.write(plain_line(report) + "\n")
            self.console.file.flush()
            return
        from .report import render_report

        if self.live is not None:
            self.live.update(render_report(self.history), refresh=True)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
