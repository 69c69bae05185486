"""The read side of :class:`stableopt.History`: columns, tables, rows, events and metadata.

:class:`HistoryReads` is a base class of :class:`stableopt.History` (which adds appends, files
and state dicts); :class:`GuardEvent` is one row of the events table.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from . import _history_file
from ._columns import (
    DIRECTIONAL_KINDS,
    DTYPE_CODES,
    HVP_BACKEND_CODES,
    SCHEMA_VERSION,
    TABLES,
    Tables,
    dynamic_order,
    is_dynamic,
    table_of,
)
from ._history_file import FORMAT

__all__ = ["GuardEvent", "HistoryReads"]

_NP = {"q": np.int64, "d": np.float64, "b": np.bool_}  # array typecode -> numpy dtype
_TABLES = tuple(TABLES)


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


def _by_probe(values: np.ndarray, probe: np.ndarray) -> tuple[tuple[float, ...], ...]:
    """``values`` cut into one tuple per probe (``probe`` never decreases within a density).

    >>> _by_probe(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1]))
    ((1.0, 2.0), (3.0,))
    """
    if not len(values):
        return ()
    return tuple(tuple(r.tolist()) for r in np.split(values, np.flatnonzero(np.diff(probe)) + 1))


class HistoryReads:
    """Reading a history's tables (see :class:`stableopt.History`)."""

    _t: Tables
    _optimizer: Any
    metadata: dict[str, str]
    #: wall-clock seconds since the history started (History.elapsed)
    elapsed: Callable[[], float]

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of measurements."""
        return self._t.rows["measurements"]

    def __repr__(self) -> str:
        rows = self._t.rows
        return f"History({rows['measurements']} measurements, {rows['secant']} secant estimates, {rows['events']} guard events)"

    def columns(self, table: str = "measurements") -> list[str]:
        """The column names of ``table`` (one of :data:`stableopt._columns.TABLES`:
        "measurements", "secant", "events", "directional", "tracking", "density",
        "density_nodes")."""
        if table not in _TABLES:
            raise ValueError(f"table must be one of {_TABLES}, got {table!r}")
        names = list(self._t.cols[table])
        if table == "measurements":
            fixed = [n for n in names if not is_dynamic(n)]
            return fixed + sorted((n for n in names if is_dynamic(n)), key=dynamic_order)
        return names

    def column(self, name: str) -> np.ndarray:
        """One column as a new NumPy array (int64, float64 or bool).

        Raises:
            KeyError: no column of that name (the message lists the names there are).
        """
        t = self._t
        table = table_of(name)
        col = t.cols[table].get(name)
        if col is None:
            known = [n for tb in _TABLES for n in self.columns(tb)]
            raise KeyError(f"no column {name!r}; the columns are {known}")
        n = t.rows[table]
        if not n:
            return np.zeros(0, dtype=_NP[col.typecode])
        raw: np.ndarray = np.frombuffer(col, dtype=np.int8 if col.typecode == "b" else _NP[col.typecode], count=n)
        return raw.astype(_NP[col.typecode])  # a copy: the history stays append-only

    def hvp_backends(self) -> list[str]:
        """The Hessian-vector-product backend of each measurement (``"autograd"``, ``"fd"``,
        ``"forward"``; ``"unknown"`` in a file saved before it was recorded): the names of the
        ``hvp_backend`` column's codes (:data:`stableopt._columns.HVP_BACKEND_CODES`)."""
        names = {code: name for name, code in HVP_BACKEND_CODES.items()}
        return [names.get(int(c), "unknown") for c in self.column("hvp_backend")]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.column(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(name in self._t.cols[t] for t in _TABLES)

    def to_dict(self, table: str = "measurements") -> dict[str, np.ndarray]:
        """``{column: array}`` of one table, all the same length (``pandas.DataFrame(...)``)."""
        return {name: self.column(name) for name in self.columns(table)}

    def directional(self, direction: str | None = None) -> dict[str, np.ndarray]:
        """The directional measurements (of one ``direction`` only, if given): the columns of
        the ``directional`` table."""
        cols = self.to_dict("directional")
        if direction is None:
            return cols
        keep = cols["directional_kind"] == DIRECTIONAL_KINDS.index(direction)
        return {name: values[keep] for name, values in cols.items()}

    def tracking(self) -> dict[str, np.ndarray]:
        """The tracked estimates: ``{"track_step", "track", "track_ratio", "track_residual", "track_hvps"}``."""
        return self.to_dict("tracking")

    def densities(self) -> list[Any]:
        """The recorded spectral densities (``opt.spectral_density()`` calls), oldest first, as
        :class:`stableopt.DensityReport` objects equal to the ones the calls returned.

        Example:
            >>> import torch, stableopt
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
            >>> opt = stableopt.SGD([w], lr=0.1)
            >>> rep = opt.spectral_density(lambda: 2.0 * w[0] ** 2 + 0.5 * w[1] ** 2, probes=2, iters=5)
            >>> opt.history.densities() == [rep]
            True
        """
        from .density import DensityReport

        runs = self.to_dict("density")
        nodes = self.to_dict("density_nodes")
        backends = {code: name for name, code in HVP_BACKEND_CODES.items()}
        dtypes = {code: name for name, code in DTYPE_CODES.items()}
        # the node rows of density i are a contiguous slice (node_density never decreases)
        bounds = np.searchsorted(nodes["node_density"], np.arange(len(runs["density_step"]) + 1))
        out = []
        for i in range(len(runs["density_step"])):
            part = slice(int(bounds[i]), int(bounds[i + 1]))
            probe = nodes["node_probe"][part]
            out.append(
                DensityReport(
                    int(runs["density_step"][i]),
                    _by_probe(nodes["node"][part], probe),
                    _by_probe(nodes["node_weight"][part], probe),
                    int(runs["density_probes"][i]),
                    int(runs["density_iters"][i]),
                    int(runs["density_hvps"][i]),
                    preconditioned=bool(runs["density_preconditioned"][i]),
                    size=int(runs["density_size"][i]),
                    seconds=float(runs["density_seconds"][i]),
                    loss=float(runs["density_loss"][i]),
                    dtype=dtypes.get(int(runs["density_dtype"][i]), "unknown"),
                    hvp_backend=backends.get(int(runs["density_hvp_backend"][i]), "unknown"),
                    threshold=float(runs["density_threshold"][i]),
                )
            )
        return out

    def secant(self) -> dict[str, np.ndarray]:
        """The per-step secant estimates: ``{"secant_step", "secant", "secant_ratio"}``."""
        return self.to_dict("secant")

    def _event_reasons(self) -> list[str]:
        t = self._t
        return t.reasons[: t.rows["events"]]

    def events(self) -> list[GuardEvent]:
        """The guard's actions, oldest first."""
        cols = self.to_dict("events")
        reasons = self._event_reasons()
        return [
            GuardEvent(
                step=int(cols["event_step"][i]),
                group=int(cols["event_group"][i]),
                old_factor=float(cols["event_old_factor"][i]),
                new_factor=float(cols["event_new_factor"][i]),
                ratio=float(cols["event_ratio"][i]),
                reason=reasons[i],
            )
            for i in range(len(reasons))
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
        return sum(1 for n in self._t.cols["measurements"] if n.startswith("lr_"))

    # -- optimizer description -------------------------------------------------------------------
    def describe(self) -> dict[str, str]:
        """The string metadata a saved file carries (format, schema, optimizer, versions)."""
        meta = dict(self.metadata)
        opt = self._optimizer() if self._optimizer is not None else None
        if opt is not None:
            groups = [{k: _history_file.jsonable(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
            meta["optimizer"] = _history_file.safe_name(type(opt).__name__)
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
        meta["event_reasons"] = json.dumps(self._event_reasons(), ensure_ascii=False)
        meta["elapsed"] = repr(max(self.elapsed(), 0.0))
        return meta

    @property
    def optimizer_name(self) -> str:
        return self.describe()["optimizer"]

    def hyperparameters(self) -> list[dict[str, Any]]:
        """Per param group hyper-parameters of the optimizer (from the file for a loaded one)."""
        try:
            value = json.loads(self.describe()["hyperparameters"])
        except (ValueError, RecursionError):
            return []
        return value if isinstance(value, list) else []
