"""Every measurement an optimizer takes, as append-only columns that save to safetensors.

``opt.history`` is a :class:`History`. It has three tables of 1-D columns:

* measurements (one row per ``opt.sharpness()`` call, manual or scheduled by a monitor):
  ``step``, ``loss`` (on the probe data), ``preconditioned`` (λ_max(P⁻¹H)), ``raw`` (λ_max(H),
  NaN when not measured), ``threshold``, ``ratio``, ``residual``, ``hvps``, ``seconds``,
  ``converged``, ``monitor`` (the monitor's id, −1 for a manual call), ``elapsed`` (wall seconds
  since the optimizer was created, for the share of training time spent measuring), and per
  param group ``lr_<g>`` (effective lr) and ``threshold_<g>``, and ``eig_<i>`` (the top-k
  eigenvalues of P⁻¹H);
* secant (one row per step while a monitor with ``secant=True`` is attached): ``secant_step``,
  ``secant`` (the estimate Δθᵀ(g_t − g_{t−1}) / ΔθᵀPΔθ) and ``secant_ratio`` (the same over
  Σ τ_g·Δθ_gᵀP_gΔθ_g, so 1 = the edge);
* directional (one row per ``opt.directional_sharpness()`` call, manual or by a monitor with
  ``directional=``): ``directional_step``, ``directional`` (uᵀHu/uᵀPu), ``directional_ratio``
  (the same over Σ τ_g·u_gᵀP_gu_g), ``directional_hvps`` and ``directional_kind`` (the index of
  the direction in :data:`DIRECTIONAL_KINDS`); see :mod:`stableopt.directional`;
* events (guard actions): ``event_step``, ``event_group``, ``event_old_factor``,
  ``event_new_factor``, ``event_ratio`` and a reason string each.

Each row takes a fixed number of machine words (strings are cut at
:data:`MAX_REASON_CHARS`). Columns are plain ``array.array`` buffers: appending is O(1) and
reading one gives a NumPy array. :meth:`History.save` writes safetensors (one contiguous 1-D
tensor per column plus string metadata); :meth:`History.load` reads it back exactly and turns
every kind of bad file into a ``ValueError`` that names the file. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import weakref
from array import array
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = ["FORMAT", "SCHEMA_VERSION", "GuardEvent", "History"]

#: Value of the ``format`` metadata key of a saved history.
FORMAT = "stableopt.history"
#: Version of the column layout; files with a larger number are refused, not misread.
SCHEMA_VERSION = 1
#: Guard reasons longer than this are cut, so that every record has a bounded size.
MAX_REASON_CHARS = 200

# typecode of array.array -> numpy dtype
_NP = {"q": np.int64, "d": np.float64, "b": np.bool_}
_TYPECODE = {np.dtype(np.int64): "q", np.dtype(np.float64): "d", np.dtype(np.bool_): "b"}

#: the measurement columns every row has, in order, with their types
MEASUREMENT_COLUMNS: dict[str, str] = {
    "step": "q",
    "loss": "d",
    "preconditioned": "d",
    "raw": "d",
    "threshold": "d",
    "ratio": "d",
    "residual": "d",
    "hvps": "q",
    "seconds": "d",
    "converged": "b",
    "monitor": "q",
    "elapsed": "d",
}
#: prefixes of the per-group / per-eigenvalue measurement columns (all float64)
DYNAMIC_PREFIXES = ("lr_", "threshold_", "eig_")
SECANT_COLUMNS: dict[str, str] = {"secant_step": "q", "secant": "d", "secant_ratio": "d"}
DIRECTIONAL_COLUMNS: dict[str, str] = {
    "directional_step": "q", "directional": "d", "directional_ratio": "d", "directional_hvps": "q", "directional_kind": "q",
}
#: ``directional_kind`` i is the direction DIRECTIONAL_KINDS[i]
DIRECTIONAL_KINDS = ("update", "gradient", "explicit")
EVENT_COLUMNS: dict[str, str] = {
    "event_step": "q",
    "event_group": "q",
    "event_old_factor": "d",
    "event_new_factor": "d",
    "event_ratio": "d",
}
_TABLES = ("measurements", "secant", "events", "directional")


@dataclass(frozen=True)
class GuardEvent:
    """One action of the learning-rate guard: group ``group``'s lr factor went from
    ``old_factor`` to ``new_factor`` at ``step`` because the ratio was ``ratio``.

    Attributes read as ``event.step``; ``event["step"]`` and ``event.as_dict()`` work too.
    """

    step: int
    group: int
    old_factor: float
    new_factor: float
    ratio: float
    reason: str

    def __getitem__(self, key: str) -> Any:
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dynamic_order(name: str) -> tuple[int, int, str]:
    for i, prefix in enumerate(DYNAMIC_PREFIXES):
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return (i, int(name[len(prefix):]), name)
    return (len(DYNAMIC_PREFIXES), 0, name)


def _is_dynamic(name: str) -> bool:
    return _dynamic_order(name)[0] < len(DYNAMIC_PREFIXES)


def _table_of(name: str) -> str:
    if name in SECANT_COLUMNS:
        return "secant"
    if name in DIRECTIONAL_COLUMNS:
        return "directional"
    if name.startswith("event_"):
        return "events"
    return "measurements"


def _jsonable(value: Any) -> Any:
    """Hyper-parameters as JSON: tensors become numbers, tuples lists, the rest ``repr``."""
    try:
        import torch

        if isinstance(value, torch.Tensor):
            return value.item() if value.numel() == 1 else value.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


class History:
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
        self.reset()

    # -- storage -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything (a torch state dict without history was loaded)."""
        self._cols: dict[str, dict[str, array]] = {
            "measurements": {name: array(tc) for name, tc in MEASUREMENT_COLUMNS.items()},
            "secant": {name: array(tc) for name, tc in SECANT_COLUMNS.items()},
            "events": {name: array(tc) for name, tc in EVENT_COLUMNS.items()},
            "directional": {name: array(tc) for name, tc in DIRECTIONAL_COLUMNS.items()},
        }
        self._rows = {"measurements": 0, "secant": 0, "events": 0, "directional": 0}
        self._reasons: list[str] = []

    def _append(self, table: str, row: Mapping[str, Any]) -> None:
        cols = self._cols[table]
        n = self._rows[table]
        for name in row:
            if name not in cols:
                if table != "measurements" or not _is_dynamic(name):
                    raise KeyError(f"unknown {table} column {name!r}")
                cols[name] = array("d", [math.nan]) * n  # backfill earlier rows
        for name, col in cols.items():
            value = row.get(name, math.nan)
            if col.typecode == "d":
                col.append(float(value))
            elif col.typecode == "b":
                col.append(1 if value else 0)
            else:
                col.append(int(value))
        self._rows[table] = n + 1

    def elapsed(self) -> float:
        """Wall seconds since the optimizer was created (continued across checkpoints; frozen
        in a history loaded from a file)."""
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
        self._append("measurements", row)

    __call__ = record

    def append_secant(self, step: int, secant: float, ratio: float) -> None:
        """Record the per-step secant curvature estimate (see :mod:`stableopt.monitor`)."""
        self._append("secant", {"secant_step": step, "secant": secant, "secant_ratio": ratio})

    def append_directional(self, step: int, value: float, ratio: float, hvps: int, direction: str) -> None:
        """Record a directional sharpness (see :mod:`stableopt.directional`)."""
        kind = DIRECTIONAL_KINDS.index(direction)
        self._append("directional", {"directional_step": step, "directional": value, "directional_ratio": ratio, "directional_hvps": hvps, "directional_kind": kind})

    def append_event(self, step: int, group: int, old_factor: float, new_factor: float, ratio: float, reason: str) -> None:
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
        )
        self._reasons.append(str(reason)[:MAX_REASON_CHARS])

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of measurements."""
        return self._rows["measurements"]

    def __repr__(self) -> str:
        return (
            f"History({len(self)} measurements, {self._rows['secant']} secant estimates, "
            f"{self._rows['events']} guard events)"
        )

    def columns(self, table: str = "measurements") -> list[str]:
        """The column names of ``table`` ("measurements", "secant" or "events")."""
        if table not in _TABLES:
            raise ValueError(f"table must be one of {_TABLES}, got {table!r}")
        names = list(self._cols[table])
        if table == "measurements":
            fixed = [n for n in names if not _is_dynamic(n)]
            return fixed + sorted((n for n in names if _is_dynamic(n)), key=_dynamic_order)
        return names

    def column(self, name: str) -> np.ndarray:
        """One column as a new NumPy array (int64, float64 or bool).

        Raises:
            KeyError: no column of that name (the message lists the names there are).
        """
        col = self._cols[_table_of(name)].get(name)
        if col is None:
            known = [n for t in _TABLES for n in self.columns(t)]
            raise KeyError(f"no column {name!r}; the columns are {known}")
        if not len(col):
            return np.zeros(0, dtype=_NP[col.typecode])
        raw = np.frombuffer(col, dtype=np.int8 if col.typecode == "b" else _NP[col.typecode])
        return raw.astype(_NP[col.typecode])  # a copy: the history stays append-only

    def __getitem__(self, name: str) -> np.ndarray:
        return self.column(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name in self._cols[t] for t in _TABLES)

    def to_dict(self, table: str = "measurements") -> dict[str, np.ndarray]:
        """``{column: array}`` of one table, all the same length (``pandas.DataFrame(...)``)."""
        return {name: self.column(name) for name in self.columns(table)}

    def secant(self) -> dict[str, np.ndarray]:
        """The per-step secant estimates: ``{"secant_step", "secant", "secant_ratio"}``."""
        return self.to_dict("secant")

    def directional(self, direction: str | None = None) -> dict[str, np.ndarray]:
        """The directional measurements (of one ``direction`` only, if given): the columns of
        the ``directional`` table."""
        cols = self.to_dict("directional")
        if direction is None:
            return cols
        keep = cols["directional_kind"] == DIRECTIONAL_KINDS.index(direction)
        return {name: values[keep] for name, values in cols.items()}

    def events(self) -> list[GuardEvent]:
        """The guard's actions, oldest first."""
        cols = self.to_dict("events")
        return [
            GuardEvent(
                step=int(cols["event_step"][i]),
                group=int(cols["event_group"][i]),
                old_factor=float(cols["event_old_factor"][i]),
                new_factor=float(cols["event_new_factor"][i]),
                ratio=float(cols["event_ratio"][i]),
                reason=self._reasons[i],
            )
            for i in range(self._rows["events"])
        ]

    def rows(self) -> Iterator[dict[str, Any]]:
        """The measurements as dicts of Python numbers, oldest first."""
        cols = self.to_dict()
        for i in range(len(self)):
            yield {name: values[i].item() for name, values in cols.items()}

    def last(self) -> dict[str, Any] | None:
        """The latest measurement as a dict (None before the first)."""
        if not len(self):
            return None
        return {name: self.column(name)[-1].item() for name in self.columns()}

    def num_groups(self) -> int:
        return sum(1 for n in self._cols["measurements"] if n.startswith("lr_"))

    # -- optimizer description -------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        """The string metadata a saved file carries (format, schema, optimizer, versions)."""
        meta = dict(self.metadata)
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            groups = [{k: _jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            meta["optimizer"] = type(opt).__name__
            meta["hyperparameters"] = json.dumps(groups, sort_keys=True)
        try:
            import torch

            torch_version = str(torch.__version__)
        except ImportError:  # pragma: no cover
            torch_version = "unknown"
        from . import __version__

        meta.setdefault("optimizer", "unknown")
        meta.setdefault("hyperparameters", "[]")
        if opt is not None or "stableopt_version" not in meta:
            meta["stableopt_version"] = __version__
            meta["torch_version"] = torch_version
        meta["format"] = FORMAT
        meta["schema"] = str(SCHEMA_VERSION)
        meta["event_reasons"] = json.dumps(self._reasons, ensure_ascii=False)
        meta["elapsed"] = repr(self.elapsed())
        return meta

    @property
    def optimizer_name(self) -> str:
        return self.describe()["optimizer"]

    def hyperparameters(self) -> list[dict[str, Any]]:
        """Per param group hyper-parameters of the optimizer (from the file for a loaded one)."""
        try:
            value = json.loads(self.describe()["hyperparameters"])
        except ValueError:
            return []
        return value if isinstance(value, list) else []

    # -- files ---------------------------------------------------------------------------------
    def _stored_tables(self) -> tuple[str, ...]:
        """The tables files and state dicts hold: an empty directional table is left out, so
        that a run without directional measurements writes what older versions read."""
        return _TABLES if self._rows["directional"] else _TABLES[:3]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file: one contiguous 1-D tensor per column, string metadata.

        The write goes to a temporary file first and is renamed into place, so an interrupted
        save never leaves a truncated history behind.
        """
        from safetensors.numpy import save_file

        tensors = {name: np.ascontiguousarray(self.column(name)) for t in self._stored_tables() for name in self.columns(t)}
        path = os.fspath(path)
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".stableopt-", suffix=".safetensors", dir=folder)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=self.describe())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: the file is missing, empty, truncated or not safetensors, is a
                safetensors file that is not a stableopt history, was written by a newer schema,
                or has columns of the wrong type or length. The message names the file.
        """
        name = os.fspath(path)

        def bad(problem: str) -> ValueError:
            return ValueError(f"{name}: {problem}")

        if not os.path.exists(name):
            raise bad("no such file")
        if os.path.isdir(name):
            raise bad("is a directory, not a stableopt history file")
        if os.path.getsize(name) == 0:
            raise bad("empty file, not a stableopt history (safetensors) file")
        from safetensors import safe_open

        try:
            with safe_open(name, framework="np") as f:
                metadata = dict(f.metadata() or {})
                if metadata.get("format") != FORMAT:
                    raise bad(
                        "a safetensors file but not a stableopt history (its metadata has no "
                        f"'format: {FORMAT}')"
                        if f.keys() or metadata else "a safetensors file with nothing in it, not a stableopt history"
                    )
                schema = metadata.get("schema", "")
                if not schema.isdigit():
                    raise bad(f"stableopt history without a valid schema version ({schema!r})")
                if int(schema) > SCHEMA_VERSION:
                    raise bad(
                        f"written with history schema {schema}, newer than this stableopt reads "
                        f"(schema {SCHEMA_VERSION}); upgrade stableopt to read it"
                    )
                if int(schema) < 1:
                    raise bad(f"invalid history schema {schema}")
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except ValueError as exc:
            if str(exc).startswith(name):
                raise
            raise bad(f"not a readable safetensors file (truncated or corrupt?): {exc}") from None
        except Exception as exc:  # safetensors' own errors (SafetensorError), OSError
            raise bad(f"not a readable safetensors file (truncated or corrupt?): {exc}") from None

        history = cls()
        history._fill(tensors, bad)
        try:
            reasons = json.loads(metadata.get("event_reasons", "[]"))
        except ValueError:
            raise bad("corrupt 'event_reasons' metadata (not JSON)") from None
        if not isinstance(reasons, list) or len(reasons) != history._rows["events"] or not all(isinstance(r, str) for r in reasons):
            raise bad("'event_reasons' metadata does not match the event columns")
        history._reasons = reasons
        try:
            history._clock_offset = float(metadata.get("elapsed", "0"))
        except ValueError:
            history._clock_offset = 0.0
        history._clock = None  # a file's clock stands still
        history.metadata = {k: v for k, v in metadata.items() if k not in ("event_reasons",)}
        return history

    def _fill(self, tensors: Mapping[str, Any], bad: Any) -> None:
        """Replace the columns with ``tensors`` after checking names, types and lengths."""
        self.reset()
        lengths: dict[str, int] = {}
        fixed = {**MEASUREMENT_COLUMNS, **SECANT_COLUMNS, **EVENT_COLUMNS, **DIRECTIONAL_COLUMNS}
        for name, value in tensors.items():
            arr = np.asarray(value)
            table = _table_of(name)
            expected = fixed.get(name, "d" if table == "measurements" and _is_dynamic(name) else None)
            if expected is None:
                raise bad(f"unknown column {name!r}")
            if arr.ndim != 1:
                raise bad(f"column {name!r} has shape {tuple(arr.shape)}, expected a 1-D tensor")
            if _TYPECODE.get(arr.dtype) != expected:
                raise bad(f"column {name!r} has dtype {arr.dtype}, expected {np.dtype(_NP[expected])}")
            if lengths.setdefault(table, len(arr)) != len(arr):
                raise bad(f"column {name!r} has {len(arr)} rows, the other {table} columns {lengths[table]}")
            col = array(expected)
            col.frombytes(np.ascontiguousarray(arr.astype(np.int8) if expected == "b" else arr).tobytes())
            self._cols[table][name] = col
        for table, cols in (("measurements", MEASUREMENT_COLUMNS), ("secant", SECANT_COLUMNS), ("events", EVENT_COLUMNS), ("directional", DIRECTIONAL_COLUMNS)):
            missing = [n for n in cols if n not in tensors]
            if missing and (table != "directional" or len(missing) < len(cols)):  # older files have no directional table
                raise bad(f"stableopt history without the column(s) {missing}")
            self._rows[table] = lengths.get(table, 0)

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Columns as tensors plus reasons and the clock; loads with ``torch.load(weights_only=True)``."""
        import torch

        return {
            "schema": SCHEMA_VERSION,
            "columns": {name: torch.from_numpy(self.column(name)) for t in self._stored_tables() for name in self.columns(t)},
            "event_reasons": list(self._reasons),
            "elapsed": self.elapsed(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the history of a checkpoint (``None`` or ``{}``: start empty)."""
        if not state:
            self.reset()
            return
        schema = int(state.get("schema", 0))
        if schema > SCHEMA_VERSION:
            raise ValueError(
                f"the checkpoint's history has schema {schema}, newer than this stableopt reads "
                f"({SCHEMA_VERSION}); upgrade stableopt"
            )

        def bad(problem: str) -> ValueError:
            return ValueError(f"optimizer state dict history: {problem}")

        tensors = {name: t.detach().cpu().numpy() for name, t in state["columns"].items()}
        self._fill(tensors, bad)
        reasons = [str(r) for r in state.get("event_reasons", [])]
        if len(reasons) != self._rows["events"]:
            raise bad("event reasons do not match the event columns")
        self._reasons = reasons
        self._clock_offset = float(state.get("elapsed", 0.0))
        self._clock = time.perf_counter()
