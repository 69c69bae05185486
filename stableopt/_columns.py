"""The columns of a history: names, types and value rules, checked the same way on every append,
on ``save()`` and on every load (file or checkpoint) so that what saves also loads, and the
storage (:class:`Tables`) that appends and loads all-or-nothing.

A name is a fixed column of one of the tables, a per-group / per-eigenvalue measurement
column ``lr_<g>``, ``threshold_<g>``, ``eig_<i>`` (ASCII digits, no leading zero, numbered from 0
without gaps) or a per-block measurement column ``block_<stem>_lmax`` / ``block_<stem>_ratio``
(a stem of ASCII letters, digits and underscores, :func:`stableopt.blocks.column_stems`).
Values follow :data:`RULES`: steps are non-negative and never decrease, counts are bounded so
that no sum of them overflows int64, times and guard factors are finite, a guard event's ratio
is a number or ``+inf`` (a threshold ≤ 0, :mod:`stableopt.thresholds`). The two density tables
are also checked against each other (:func:`check_density`): every node belongs to a recorded
density and one of its probes, and each probe's weights sum to 1.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._text import quoted

__all__ = [
    "BLOCK_COLUMN",
    "DENSITY_COLUMNS",
    "DIRECTIONAL_COLUMNS",
    "DIRECTIONAL_KINDS",
    "DTYPE_CODES",
    "DYNAMIC_PREFIXES",
    "EVENT_COLUMNS",
    "OPTIONAL_TABLES",
    "HVP_BACKEND_CODES",
    "MAX_REASON_CHARS",
    "MEASUREMENT_COLUMNS",
    "NODE_COLUMNS",
    "OPTIONAL_COLUMNS",
    "SCHEMA_VERSION",
    "SECANT_COLUMNS",
    "TABLES",
    "TRACK_COLUMNS",
    "Tables",
    "check_columns",
    "check_density",
    "check_layout",
    "check_row",
    "column_type",
    "dynamic_order",
    "table_of",
    "tables_from_state",
    "typed",
]

#: Version of the column layout; files with a larger number are refused, not misread.
SCHEMA_VERSION = 1
#: Guard reasons longer than this are cut, so that every record has a bounded size.
MAX_REASON_CHARS = 200

#: the measurement columns every row has, in order, with their types (array typecodes)
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
    "hvp_backend": "q",
    "hvp_error": "d",
}
#: codes of the ``hvp_backend`` column (the backend a measurement used; −1: not recorded, in a
#: file saved before the column existed)
HVP_BACKEND_CODES = {"autograd": 0, "fd": 1, "forward": 2}
#: fixed columns a file may lack (it was saved before they existed), with their backfill value
OPTIONAL_COLUMNS: dict[str, float] = {"hvp_backend": -1, "hvp_error": math.nan}
#: prefixes of the per-group / per-eigenvalue measurement columns (all float64)
DYNAMIC_PREFIXES = ("lr_", "threshold_", "eig_")
SECANT_COLUMNS: dict[str, str] = {"secant_step": "q", "secant": "d", "secant_ratio": "d"}
DIRECTIONAL_COLUMNS: dict[str, str] = {
    "directional_step": "q",
    "directional": "d",
    "directional_ratio": "d",
    "directional_hvps": "q",
    "directional_kind": "q",
}
#: ``directional_kind`` i is the direction DIRECTIONAL_KINDS[i]
DIRECTIONAL_KINDS = ("update", "gradient", "explicit")
#: the tracking table (one row per step of a monitor with ``budget=``, :mod:`stableopt.tracking`)
TRACK_COLUMNS: dict[str, str] = {
    "track_step": "q",
    "track": "d",
    "track_ratio": "d",
    "track_residual": "d",
    "track_hvps": "q",
}
#: the density table: one row per ``opt.spectral_density()`` call (:mod:`stableopt.density`);
#: ``density_threshold`` is τ for a preconditioned density with one common threshold, else NaN
DENSITY_COLUMNS: dict[str, str] = {
    "density_step": "q",
    "density_preconditioned": "b",
    "density_probes": "q",
    "density_iters": "q",
    "density_hvps": "q",
    "density_size": "q",
    "density_seconds": "d",
    "density_loss": "d",
    "density_threshold": "d",
    "density_hvp_backend": "q",
    "density_dtype": "q",
}
#: codes of the ``density_dtype`` column (the dtype the products were computed in; −1: unknown)
DTYPE_CODES = {"float32": 0, "float64": 1}
#: the density_nodes table: one row per Ritz node θ_j of a density (``node_density``: its row in
#: the density table; ``node_probe``: which probe; ``node``: θ_j; ``node_weight``: w_j)
NODE_COLUMNS: dict[str, str] = {"node_density": "q", "node_probe": "q", "node": "d", "node_weight": "d"}
#: how far a probe's weights may sum from 1 (Lanczos in float32 rounds them at ~1e-6)
WEIGHT_SUM_TOLERANCE = 1e-4
#: the per-block measurement columns (float64; NaN in rows measured without that block)
BLOCK_COLUMN = re.compile(r"block_[A-Za-z0-9_]{1,60}_(lmax|ratio)\Z")
#: tables a file may lack altogether (written before they existed, or empty: left out so that a
#: run without directional, tracking or density measurements writes what older versions read)
OPTIONAL_TABLES = ("directional", "tracking", "density", "density_nodes")
EVENT_COLUMNS: dict[str, str] = {
    "event_step": "q",
    "event_group": "q",
    "event_old_factor": "d",
    "event_new_factor": "d",
    "event_ratio": "d",
}
TABLES = {
    "measurements": MEASUREMENT_COLUMNS,
    "secant": SECANT_COLUMNS,
    "events": EVENT_COLUMNS,
    "directional": DIRECTIONAL_COLUMNS,
    "tracking": TRACK_COLUMNS,
    "density": DENSITY_COLUMNS,
    "density_nodes": NODE_COLUMNS,
}
_FIXED = {name: tc for fixed in TABLES.values() for name, tc in fixed.items()}
_TABLE_OF = {name: table for table, fixed in TABLES.items() for name in fixed}
_DYNAMIC = re.compile(r"(lr|threshold|eig)_(0|[1-9][0-9]{0,4})\Z")
_NUMPY = {"q": "int64", "d": "float64", "b": "bool"}
_NP = {"q": np.int64, "d": np.float64, "b": np.bool_}
_TORCH_DTYPES = {"torch.int64": "int64", "torch.float64": "float64", "torch.bool": "bool"}

# (lowest value, highest value, never decreases, must be finite); None: no bound. Counts are
# far below 2**63 / 2**32, so a column of up to 2**32 rows sums without overflow.
_COUNT = 2**31
RULES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "step": (0, None, True, True),
    "secant_step": (0, None, True, True),
    "event_step": (0, None, True, True),
    "directional_step": (0, None, True, True),
    "directional_hvps": (0, _COUNT - 1, False, True),
    "directional_kind": (0, len(DIRECTIONAL_KINDS) - 1, False, True),
    "track_step": (0, None, True, True),
    "track_hvps": (0, _COUNT - 1, False, True),
    "hvps": (0, _COUNT - 1, False, True),
    "monitor": (-1, _COUNT - 1, False, True),
    "hvp_backend": (-1, len(HVP_BACKEND_CODES) - 1, False, True),
    "hvp_error": (0.0, None, False, False),  # NaN: not recorded (a file from before the column)
    "event_group": (0, 2**20, False, True),
    "seconds": (0.0, None, False, True),
    "elapsed": (0.0, None, False, True),
    "event_old_factor": (0.0, None, False, True),
    "event_new_factor": (0.0, None, False, True),
    "event_ratio": (None, None, False, True),  # or +inf: see UP_TO_INF
    "density_step": (0, None, True, True),
    "density_probes": (1, _COUNT - 1, False, True),
    "density_iters": (1, _COUNT - 1, False, True),
    "density_hvps": (0, _COUNT - 1, False, True),
    "density_size": (0, 2**62, False, True),
    "density_seconds": (0.0, None, False, True),
    # NaN: no single threshold; +inf: lr 0; <= 0: AdamW with ηλ >= 2 (stableopt.thresholds)
    "density_threshold": (-sys.float_info.max, None, False, False),
    "density_hvp_backend": (-1, len(HVP_BACKEND_CODES) - 1, False, True),
    "density_dtype": (-1, len(DTYPE_CODES) - 1, False, True),
    "node_density": (0, _COUNT - 1, True, True),
    "node_probe": (0, _COUNT - 1, False, True),
    "node": (None, None, False, True),
    "node_weight": (0.0, 1.0, False, True),
}


#: columns whose "finite" rule also allows +inf (never NaN or -inf): a guard cut on a ratio of
#: +inf, the ratio of an update rule whose threshold is <= 0
UP_TO_INF = frozenset({"event_ratio"})


def dynamic_order(name: str) -> tuple[int, int, str]:
    """Sort key of the dynamic columns: lr_*, threshold_*, eig_* by number, then block_* by name."""
    match = _DYNAMIC.match(name)
    if match is None:
        return (len(DYNAMIC_PREFIXES), 0, name)
    return (DYNAMIC_PREFIXES.index(match.group(1) + "_"), int(match.group(2)), name)


def is_dynamic(name: str) -> bool:
    return _DYNAMIC.match(name) is not None or BLOCK_COLUMN.match(name) is not None


def table_of(name: str) -> str:
    """The table of a column name (the dynamic ones belong to "measurements")."""
    return _TABLE_OF.get(name, "measurements")


def column_type(name: str) -> str | None:
    """The array typecode of a valid column name, None for any other name.

    >>> column_type("eig_2"), column_type("lr_²"), column_type("eig_01")
    ('d', None, None)
    """
    if name in _FIXED:
        return _FIXED[name]
    return "d" if is_dynamic(name) else None


def _rule(name: str) -> tuple[float | None, float | None, bool, bool] | None:
    if name.startswith("lr_"):
        return (0.0, None, False, False)  # NaN: the group did not exist yet (backfilled)
    return RULES.get(name)


def check_row(name: str, value: float, previous: float | None) -> str | None:
    """The problem with appending ``value`` after ``previous`` to column ``name`` (None: fine)."""
    rule = _rule(name)
    if rule is None:
        return None
    low, high, monotone, finite = rule
    if math.isnan(value):
        return None if not finite else f"{name} must be a finite number, got {value!r}"
    if finite and not math.isfinite(value) and not (value == math.inf and name in UP_TO_INF):
        return f"{name} must be a finite number{' or +inf' if name in UP_TO_INF else ''}, got {value!r}"
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{name} must lie in [{low}, {'∞' if high is None else high}], got {value!r}"
    if monotone and previous is not None and value < previous:
        return f"{name} went back from {previous!r} to {value!r} (steps never decrease)"
    return None


def check_columns(columns: Mapping[str, np.ndarray], bad: Callable[[str], Exception]) -> None:
    """Raise ``bad(problem)`` for the first column whose values break :data:`RULES`."""
    for name, values in columns.items():
        rule = _rule(name)
        if rule is None or not len(values):
            continue
        low, high, monotone, finite = rule
        v = values.astype(np.float64) if values.dtype.kind == "f" else values
        present = ~np.isnan(v) if v.dtype.kind == "f" else np.ones(len(v), bool)
        if finite and v.dtype.kind == "f" and not (np.isfinite(v) | ((v == np.inf) & (name in UP_TO_INF))).all():
            expected = "finite numbers or +inf" if name in UP_TO_INF else "finite numbers"
            raise bad(f"column {quoted(name)} holds NaN or infinite values, expected {expected}")
        w = v[present]
        if len(w) and ((low is not None and w.min() < low) or (high is not None and w.max() > high)):
            raise bad(f"column {quoted(name)} holds values outside [{low}, {'∞' if high is None else high}]")
        if monotone and len(w) > 1 and bool((w[1:] < w[:-1]).any()):
            i = int(np.argmax(w[1:] < w[:-1]))
            raise bad(f"column {quoted(name)} is not in order: {int(w[i])} is followed by {int(w[i + 1])}")
    check_density(columns, bad)


def check_density(columns: Mapping[str, np.ndarray], bad: Callable[[str], Exception]) -> None:
    """Raise ``bad(problem)`` unless the density_nodes rows fit the density rows.

    Each node names a recorded density (``node_density`` < its row count, in order) and one of
    its probes (``node_probe`` < ``density_probes``, in order within the density); a density
    with nodes has every probe, none with more nodes than ``density_iters``, and the weights of
    each probe sum to 1 (within :data:`WEIGHT_SUM_TOLERANCE`). The per-column rules
    (:data:`RULES`) are checked first by :func:`check_columns`.
    """
    owner = columns.get("node_density")
    if owner is None or not len(owner):
        return
    probe, weight = columns["node_probe"], columns["node_weight"]
    probes = columns.get("density_probes", np.zeros(0, np.int64))
    if int(owner[-1]) >= len(probes):
        raise bad(f"column 'node_density' names density {int(owner[-1])} of {len(probes)} recorded")
    iters = columns["density_iters"]  # the density table is there (check_layout: all columns or none)
    if bool((probe >= probes[owner]).any()):
        i = int(np.argmax(probe >= probes[owner]))
        raise bad(
            f"column 'node_probe' names probe {int(probe[i])} of density {int(owner[i])}, "
            f"which has {int(probes[owner[i]])} probes"
        )
    same = owner[1:] == owner[:-1]
    if bool((same & (probe[1:] < probe[:-1])).any()):
        raise bad("column 'node_probe' is not in order within a density")
    # one run of rows per (density, probe): starts where either changes
    starts = np.flatnonzero(np.concatenate([[True], ~same | (probe[1:] != probe[:-1])]))
    counts = np.diff(np.append(starts, len(owner)))
    run_owner = owner[starts]
    if bool((counts > iters[run_owner]).any()):
        i = int(np.argmax(counts > iters[run_owner]))
        raise bad(f"density {int(run_owner[i])} has {int(counts[i])} nodes on one probe, more than its iters")
    per_density = np.bincount(run_owner, minlength=len(probes))
    has = per_density > 0
    if bool((per_density[has] != probes[has]).any()):
        d = int(np.flatnonzero(has & (per_density != probes))[0])
        raise bad(f"density {d} has nodes for {int(per_density[d])} of its {int(probes[d])} probes")
    sums = np.add.reduceat(weight.astype(np.float64), starts)
    if bool((np.abs(sums - 1.0) > WEIGHT_SUM_TOLERANCE).any()):
        i = int(np.argmax(np.abs(sums - 1.0)))
        raise bad(
            f"the weights of probe {int(probe[starts[i]])} of density {int(run_owner[i])} sum to {float(sums[i])!r}, not 1"
        )


def check_layout(layout: Mapping[str, tuple[str, tuple[int, ...]]], bad: Callable[[str], Exception]) -> dict[str, int]:
    """Check names, numpy dtype names and shapes of a history's columns before reading them.

    ``layout`` maps each column name to ``(dtype name, shape)``. Returns the row count of each
    table. Raises ``bad(problem)`` for an unknown name, a wrong dtype, a shape that is not 1-D,
    tables whose columns differ in length, a missing fixed column or a gap in the numbered ones.
    """
    rows: dict[str, int] = {}
    numbered: dict[str, list[int]] = {p: [] for p in DYNAMIC_PREFIXES}
    for name, (dtype, shape) in layout.items():
        expected = column_type(name)
        if expected is None:
            raise bad(f"unknown column {quoted(name)}")
        if len(shape) != 1:
            raise bad(f"column {quoted(name)} has shape {tuple(shape)}, expected a 1-D tensor")
        if dtype != _NUMPY[expected]:
            raise bad(f"column {quoted(name)} has dtype {dtype}, expected {_NUMPY[expected]}")
        table = table_of(name)
        if rows.setdefault(table, shape[0]) != shape[0]:
            raise bad(f"column {quoted(name)} has {shape[0]} rows, the other {table} columns {rows[table]}")
        order = dynamic_order(name)
        if order[0] < len(DYNAMIC_PREFIXES):
            numbered[DYNAMIC_PREFIXES[order[0]]].append(order[1])
    for table, fixed in TABLES.items():
        missing = [n for n in fixed if n not in layout and n not in OPTIONAL_COLUMNS]
        if table in OPTIONAL_TABLES and len(missing) == len(fixed):
            continue  # the whole table left out
        if missing:
            raise bad(f"stableopt history without the column(s) {missing}")
    for prefix, indices in numbered.items():
        for expected_index, index in enumerate(sorted(indices)):
            if index != expected_index:
                raise bad(f"column {prefix}{index} without {prefix}{expected_index}")
    return {table: rows.get(table, 0) for table in TABLES}


def typed(typecode: str, value: Any) -> Any:
    if typecode == "d":
        return float(value)
    if typecode == "b":
        return 1 if value else 0
    return int(value)


class Tables:
    """All rows of a history, replaced as one object: a load is all-or-nothing."""

    __slots__ = ("cols", "rows", "reasons")

    def __init__(self, cols: dict[str, dict[str, array]], rows: dict[str, int], reasons: list[str]) -> None:
        self.cols = cols
        # the committed row count of each table: an append interrupted before it updated this
        # number left at most one extra value in some columns, which the next append drops
        self.rows = rows
        self.reasons = reasons

    @classmethod
    def empty(cls) -> Tables:
        cols = {table: {name: array(tc) for name, tc in fixed.items()} for table, fixed in TABLES.items()}
        return cls(cols, {table: 0 for table in TABLES}, [])

    @classmethod
    def of(cls, columns: Mapping[str, np.ndarray], rows: Mapping[str, int], reasons: list[str]) -> Tables:
        """Tables holding already checked ``columns`` (see :mod:`stableopt._columns`)."""
        tables = cls.empty()
        for name, values in columns.items():
            tc = "d" if is_dynamic(name) else TABLES[table_of(name)][name]
            col = array(tc)
            col.frombytes(np.ascontiguousarray(values, dtype=np.int8 if tc == "b" else _NP[tc]).tobytes())
            tables.cols[table_of(name)][name] = col
        for name, value in OPTIONAL_COLUMNS.items():  # a file from before the column: backfill
            if name not in columns:
                tc = TABLES[table_of(name)][name]
                tables.cols[table_of(name)][name] = array(tc, [typed(tc, value)]) * int(rows.get(table_of(name), 0))
        tables.rows = {table: int(rows.get(table, 0)) for table in TABLES}  # absent: an empty table
        tables.reasons = list(reasons)
        return tables


def tables_from_state(state: Any, bad: Callable[[str], ValueError]) -> Tables:
    """The tables of a history state dict, after checking every key, tensor and value."""
    import torch

    if not isinstance(state, Mapping):
        raise bad(f"expected a dict, got {type(state).__name__}")
    unknown = sorted(str(k) for k in state if k not in ("schema", "columns", "event_reasons", "elapsed"))
    if unknown:
        raise bad(f"unknown entries {unknown[:5]}")
    schema = state.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise bad(f"schema must be an int, got {type(schema).__name__}")
    if schema > SCHEMA_VERSION:
        raise bad(
            f"the checkpoint's history has schema {schema}, newer than this stableopt reads ({SCHEMA_VERSION}); upgrade stableopt"
        )
    if schema < 1:
        raise bad(f"invalid schema {schema}")
    columns = state.get("columns")
    if not isinstance(columns, Mapping):
        raise bad(f"columns must be a dict of tensors, got {type(columns).__name__}")
    layout = {}
    for name, value in columns.items():
        if not isinstance(name, str):
            raise bad(f"column names must be strings, got {type(name).__name__}")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.device.type == "meta":
            raise bad(
                f"column {name[:60]!r} must be a dense tensor with data, got {type(value).__name__}"
                f"{'' if not isinstance(value, torch.Tensor) else f' ({value.layout}, {value.device})'}"
            )
        layout[name] = (_TORCH_DTYPES.get(str(value.dtype), str(value.dtype).replace("torch.", "")), tuple(value.shape))
    rows = check_layout(layout, bad)
    arrays = {name: t.detach().cpu().numpy() for name, t in columns.items()}
    check_columns(arrays, bad)
    reasons = state.get("event_reasons", [])
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) for r in reasons):
        raise bad("event_reasons must be a list of strings")
    if len(reasons) != rows["events"]:
        raise bad(f"{len(reasons)} event reasons for {rows['events']} event rows")
    if any(len(r) > MAX_REASON_CHARS for r in reasons):
        raise bad(f"an event reason is over {MAX_REASON_CHARS} characters")
    legacy = state.get("elapsed", 0.0)  # the clock earlier versions saved; no longer used
    if isinstance(legacy, bool) or not isinstance(legacy, (int, float)) or not math.isfinite(legacy):
        raise bad(f"elapsed must be a finite number, got {legacy!r}")
    return Tables.of(arrays, rows, list(reasons))
