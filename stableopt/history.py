"""Every measurement an optimizer takes, as append-only columns that save to safetensors.

``opt.history`` is a :class:`History`. It has seven tables of 1-D columns:

* measurements (one row per ``opt.sharpness()`` call, manual or scheduled by a monitor):
  ``step``, ``loss`` (on the probe data), ``preconditioned`` (λ_max(P⁻¹H)), ``raw`` (λ_max(H),
  NaN when not measured), ``threshold``, ``ratio``, ``residual``, ``hvps``, ``seconds``,
  ``converged``, ``monitor`` (the monitor's id, −1 for a manual call), ``elapsed`` (wall seconds
  since the optimizer was created, for the share of training time spent measuring),
  ``hvp_backend`` (the Hessian-vector-product backend, a code: 0 ``"autograd"``, 1 ``"fd"``,
  2 ``"forward"``, −1 not recorded; :meth:`History.hvp_backends` gives the names),
  ``hvp_error`` (the estimated relative error the products put into the eigenvalues: 0 for the
  exact backends, NaN in files from before the column), and per
  param group ``lr_<g>`` (effective lr) and ``threshold_<g>``, and ``eig_<i>`` (the top-k
  eigenvalues of P⁻¹H), and per block of a ``sharpness(blocks=...)`` call
  ``block_<name>_lmax`` and ``block_<name>_ratio`` (names made safe by
  :func:`stableopt.blocks.column_stems`; NaN in rows measured without that block);
* secant (one row per step while a monitor with ``secant=True`` is attached): ``secant_step``,
  ``secant`` (the estimate Δθᵀ(g_t − g_{t−1}) / ΔθᵀPΔθ) and ``secant_ratio`` (the same over
  Σ τ_g·Δθ_gᵀP_gΔθ_g, so 1 = the edge);
* directional (one row per ``opt.directional_sharpness()`` call, manual or by a monitor with
  ``directional=``): ``directional_step``, ``directional`` (uᵀHu/uᵀPu), ``directional_ratio``
  (the same over Σ τ_g·u_gᵀP_gu_g), ``directional_hvps`` and ``directional_kind`` (the index of
  the direction in :data:`DIRECTIONAL_KINDS`); see :mod:`stableopt.directional`;
* tracking (one row per step of a monitor with ``budget=``, :mod:`stableopt.tracking`):
  ``track_step``, ``track`` (the tracked λ_max estimate), ``track_ratio``, ``track_residual``
  (its relative residual bound) and ``track_hvps``;
* density (one row per ``opt.spectral_density()`` call, :mod:`stableopt.density`):
  ``density_step``, ``density_preconditioned``, ``density_probes``, ``density_iters``,
  ``density_hvps``, ``density_size`` (n), ``density_seconds``, ``density_loss``,
  ``density_threshold`` (τ for a preconditioned density with one common threshold, else NaN),
  ``density_hvp_backend`` and ``density_dtype`` (codes:
  :data:`~stableopt._columns.DTYPE_CODES`);
* density_nodes (one row per Ritz node of a density): ``node_density`` (the row of its
  density), ``node_probe``, ``node`` (θ_j) and ``node_weight`` (w_j). :meth:`History.densities`
  gives both tables back as :class:`~stableopt.DensityReport` objects, which
  ``stableopt report --plot`` draws;
* events (guard actions): ``event_step``, ``event_group``, ``event_old_factor``,
  ``event_new_factor``, ``event_ratio`` and a reason string each.

Each row takes a fixed number of machine words (strings are cut at
:data:`MAX_REASON_CHARS`). Columns are plain ``array.array`` buffers: appending is O(1) and
all-or-nothing (an interrupted append adds no row), and reading one gives a NumPy array.
:meth:`History.save` writes safetensors (one contiguous 1-D tensor per column plus string
metadata) atomically; :meth:`History.load` reads it back exactly, treating every byte as
untrusted (:mod:`stableopt._history_file`), and turns every kind of bad file into a one-line
``ValueError`` that names the file and the field. Nothing is ever unpickled. What a column may
hold is :mod:`stableopt._columns`.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _history_file
from ._columns import (  # noqa: F401 - the column tables are part of this module's API
    BLOCK_COLUMN,
    DENSITY_COLUMNS,
    DIRECTIONAL_COLUMNS,
    DIRECTIONAL_KINDS,
    DTYPE_CODES,
    DYNAMIC_PREFIXES,
    EVENT_COLUMNS,
    HVP_BACKEND_CODES,
    MAX_REASON_CHARS,
    MEASUREMENT_COLUMNS,
    NODE_COLUMNS,
    OPTIONAL_COLUMNS,
    OPTIONAL_TABLES,
    SCHEMA_VERSION,
    SECANT_COLUMNS,
    TABLES,
    TRACK_COLUMNS,
    Tables,
    check_columns,
    check_row,
    dynamic_order,
    is_dynamic,
    table_of,
    tables_from_state,
    typed,
)
from ._history_file import FORMAT
from ._history_read import GuardEvent as GuardEvent  # re-exported: it was defined here
from ._history_read import HistoryReads

__all__ = ["FORMAT", "SCHEMA_VERSION", "GuardEvent", "History"]

_NP = {"q": np.int64, "d": np.float64, "b": np.bool_}  # array typecode -> numpy dtype
_TABLES = tuple(TABLES)


class History(HistoryReads):
    """Append-only record of an optimizer's measurements, secant estimates and guard events.

    Example:
        >>> import torch, stableopt
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
        >>> opt = stableopt.SGD([w], lr=0.1)
        >>> loss_fn = lambda: (w ** 2).sum()
        >>> loss_fn().backward(); opt.step()
        >>> _ = opt.sharpness(loss_fn)
        >>> len(opt.history), opt.history.column("preconditioned").round(3).tolist()
        (1, [2.0])
    """

    def __init__(self, optimizer: Any = None) -> None:
        self._optimizer = weakref.ref(optimizer) if optimizer is not None else None
        self._clock: float | None = time.perf_counter()
        self._clock_offset = 0.0
        #: the id of the monitor measuring now (−1: a manual call); set by the monitors
        self.source = -1
        #: string metadata of a loaded file (empty for a live history)
        self.metadata: dict[str, str] = {}
        self._t = Tables.empty()

    # -- storage -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (a torch state dict without history was loaded)."""
        self._t = Tables.empty()

    def _append(self, table: str, row: Mapping[str, Any], reason: str | None = None) -> None:
        """Append one row, all or nothing: values are converted and checked first, and the row
        counts only once the final ``rows`` update ran (an interrupt before it leaves no row)."""
        t = self._t
        cols = t.cols[table]
        n = t.rows[table]
        values: dict[str, Any] = {}
        for name in row:
            if name not in cols and (table != "measurements" or not is_dynamic(name)):
                raise KeyError(f"unknown {table} column {name!r}")
        for name in [*cols, *(k for k in row if k not in cols)]:
            default = OPTIONAL_COLUMNS.get(name, math.nan)  # a column a caller may leave out
            value = typed(cols[name].typecode if name in cols else "d", row.get(name, default))
            previous = cols[name][n - 1] if n and name in cols else None
            problem = check_row(name, value, previous)
            if problem is not None:
                raise ValueError(f"History: cannot record this {table} row: {problem}")
            values[name] = value
        for col in cols.values():
            if len(col) > n:
                del col[n:]
        for name in values:
            if name not in cols:
                cols[name] = array("d", [math.nan]) * n  # backfill earlier rows
        for name, col in cols.items():
            col.append(values[name])
        if reason is not None:
            del t.reasons[n:]
            t.reasons.append(reason)
        t.rows[table] = n + 1

    def elapsed(self) -> float:
        """Wall seconds since the optimizer was created (continued across checkpoints from the
        last recorded ``elapsed``; frozen in a history loaded from a file)."""
        if self._clock is None:
            return self._clock_offset
        return self._clock_offset + (time.perf_counter() - self._clock)

    def record(self, optimizer: Any, report: Any) -> None:
        """Append one :class:`~stableopt.SharpnessReport` (the optimizer's measurement hook)."""
        row: dict[str, Any] = {
            "step": report.step,
            "loss": report.loss,
            "preconditioned": report.preconditioned,
            "raw": math.nan if report.raw is None else report.raw,
            "threshold": report.threshold,
            "ratio": report.ratio,
            "residual": report.residual,
            "hvps": report.hvps,
            "seconds": report.seconds,
            "converged": report.converged,
            "monitor": self.source,
            "elapsed": self.elapsed(),
            "hvp_backend": HVP_BACKEND_CODES.get(getattr(report, "hvp_backend", ""), -1),
            "hvp_error": getattr(report, "hvp_error", math.nan),
        }
        try:
            lrs = optimizer.effective_lr()
        except Exception:  # an optimizer without the mixin: no lr columns
            lrs = []
        for g, lr in enumerate(lrs):
            row[f"lr_{g}"] = lr
        for g, tau in enumerate(report.thresholds):
            row[f"threshold_{g}"] = tau
        for i, lam in enumerate(report.eigenvalues):
            row[f"eig_{i}"] = lam
        for block in getattr(report, "blocks", {}).values():
            row[f"block_{block.column}_lmax"] = block.preconditioned
            row[f"block_{block.column}_ratio"] = block.ratio
        self._append("measurements", row)

    __call__ = record

    def append_secant(self, step: int, secant: float, ratio: float) -> None:
        """Record the per-step secant curvature estimate (see :mod:`stableopt.monitor`)."""
        self._append("secant", {"secant_step": step, "secant": secant, "secant_ratio": ratio})

    def append_directional(self, step: int, value: float, ratio: float, hvps: int, direction: str) -> None:
        """Record a directional sharpness (see :mod:`stableopt.directional`)."""
        kind = DIRECTIONAL_KINDS.index(direction)
        self._append(
            "directional",
            {
                "directional_step": step,
                "directional": value,
                "directional_ratio": ratio,
                "directional_hvps": hvps,
                "directional_kind": kind,
            },
        )

    def append_track(self, step: int, value: float, ratio: float, residual: float, hvps: int) -> None:
        """Record one step of a tracking monitor (``opt.monitor(..., budget=b)``)."""
        self._append(
            "tracking",
            {"track_step": step, "track": value, "track_ratio": ratio, "track_residual": residual, "track_hvps": hvps},
        )

    def append_density(self, report: Any) -> None:
        """Record a :class:`~stableopt.DensityReport`: one density row and one node row per Ritz
        node, all or nothing (checked first; an interrupt before the final commit adds no row to
        either table). A failed measurement (no nodes) is recorded with no node rows."""
        t = self._t
        runs, count = t.rows["density"], t.rows["density_nodes"]
        per_probe = [len(xs) for xs in report.nodes]

        def bad(problem: str) -> ValueError:
            return ValueError(f"History: cannot record this density: {problem}")

        if per_probe != [len(ws) for ws in report.weights]:
            raise bad(
                f"nodes and weights differ in shape ({per_probe} nodes per probe, weights {report.weights!r:.80})"
            )
        run = {
            "density_step": report.step,
            "density_preconditioned": report.preconditioned,
            "density_probes": report.probes,
            "density_iters": report.iters,
            "density_hvps": report.hvps,
            "density_size": report.size,
            "density_seconds": report.seconds,
            "density_loss": report.loss,
            "density_threshold": report.threshold,
            "density_hvp_backend": HVP_BACKEND_CODES.get(report.hvp_backend, -1),
            "density_dtype": DTYPE_CODES.get(report.dtype, -1),
        }
        # this density alone, as row 0, with its nodes: the same checks as a file gets
        new: dict[str, np.ndarray] = {
            name: np.array([typed(tc, run[name])], dtype=_NP[tc]) for name, tc in DENSITY_COLUMNS.items()
        }
        new["node_density"] = np.zeros(sum(per_probe), np.int64)
        new["node_probe"] = np.repeat(np.arange(len(per_probe), dtype=np.int64), per_probe)
        new["node"] = np.array([x for xs in report.nodes for x in xs], np.float64)
        new["node_weight"] = np.array([w for ws in report.weights for w in ws], np.float64)
        check_columns(new, bad)
        previous = t.cols["density"]["density_step"][runs - 1] if runs else None
        problem = check_row("density_step", float(report.step), previous)
        if problem is not None:
            raise bad(problem)
        new["node_density"] += runs
        for table, n in (("density", runs), ("density_nodes", count)):
            for name, col in t.cols[table].items():
                del col[n:]  # what an interrupted append left
                col.frombytes(np.ascontiguousarray(new[name], dtype=np.int8 if col.typecode == "b" else None).tobytes())
        t.rows = {**t.rows, "density": runs + 1, "density_nodes": count + sum(per_probe)}  # one commit

    def append_event(
        self, step: int, group: int, old_factor: float, new_factor: float, ratio: float, reason: str
    ) -> None:
        """Record a guard action: group ``group``'s lr factor ``old_factor`` → ``new_factor``."""
        self._append(
            "events",
            {
                "event_step": step,
                "event_group": group,
                "event_old_factor": old_factor,
                "event_new_factor": new_factor,
                "event_ratio": ratio,
            },
            reason=str(reason)[:MAX_REASON_CHARS],
        )

    # -- files ---------------------------------------------------------------------------------
    def _stored_tables(self) -> tuple[str, ...]:
        """The tables files and state dicts hold: an empty directional or tracking table is left
        out, so that a run without them writes what older versions read."""
        return tuple(t for t in _TABLES if t not in OPTIONAL_TABLES or self._t.rows[t])

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file: one contiguous 1-D tensor per column, string metadata.

        The history is checked first (what saves also loads). The content goes to a temporary
        file in the same directory, is fsynced and renamed into place, so an interrupted or
        killed save leaves the old file whole; a symlink is written through, the permissions of
        the replaced file are kept (``0666 & ~umask`` for a new one).

        Raises:
            ValueError: the path is a directory, FIFO, device, symlink loop or hard-linked
                file, or its directory does not exist (nothing written).
            OSError: the write failed (the old file is intact).
        """
        columns = {name: self.column(name) for t in self._stored_tables() for name in self.columns(t)}
        _history_file.write(path, columns, self.describe())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a file written by :meth:`save`; every byte of it is treated as untrusted.

        Raises:
            ValueError: the file is missing, not a regular file, unreadable, empty, truncated
                or not safetensors, declares more data than it holds, is not a stableopt
                history, was written by a newer schema, has unknown or malformed metadata, or
                columns of the wrong name, type, length or values. The message names the file
                and the field, on one line.
        """
        columns, metadata, reasons = _history_file.read(path)
        history = cls()
        rows = {t: len(columns.get(next(iter(TABLES[t])), ())) for t in _TABLES}
        history._t = Tables.of(columns, rows, reasons)
        history._clock_offset = _history_file.elapsed_of(metadata, columns)
        history._clock = None  # a file's clock stands still
        history.metadata = metadata
        return history

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Columns as tensors plus the event reasons: a pure function of the recorded rows
        (no clock), loadable with ``torch.load(weights_only=True)``."""
        import torch

        return {
            "schema": SCHEMA_VERSION,
            "columns": {
                name: torch.from_numpy(self.column(name)) for t in self._stored_tables() for name in self.columns(t)
            },
            "event_reasons": list(self._event_reasons()),
        }

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue the history of a checkpoint (``None`` or ``{}``: start empty).

        The clock continues from the last recorded ``elapsed``. Everything is checked before the
        history changes.

        Raises:
            ValueError: the entry is not what :meth:`state_dict` writes (the message says what).
        """
        self.prepare_load(state)()

    def prepare_load(self, state: Mapping[str, Any] | None) -> Callable[[], None]:
        """Check a :meth:`state_dict` entry; returns the commit that loads it (cannot fail)."""

        def bad(problem: str) -> ValueError:
            return ValueError(f"optimizer state dict history: {problem}")

        if state is None or (isinstance(state, Mapping) and not state):
            return self.reset
        tables = tables_from_state(state, bad)
        elapsed = tables.cols["measurements"]["elapsed"]
        offset = float(elapsed[tables.rows["measurements"] - 1]) if tables.rows["measurements"] else 0.0

        def commit() -> None:
            self._t = tables
            self._clock_offset, self._clock = offset, time.perf_counter()

        return commit
