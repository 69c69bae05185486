"""A history's file: what its metadata may hold, and opening, checking and writing it.

Everything in a history file is untrusted. :func:`read` refuses anything that is not a regular
file (a FIFO would block, a device never end) and then, in order: the safetensors header
(:mod:`stableopt._safetensors`), the metadata (:data:`METADATA_FIELDS`: known keys only, each
with its form and a length bound, versions that look like versions, JSON of bounded nesting),
the column layout and finally the column values (:mod:`stableopt._columns`). Every problem is
a one-line ``ValueError`` that names the file and the field.
"""

from __future__ import annotations

import errno
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _safetensors
from ._columns import MAX_REASON_CHARS, SCHEMA_VERSION, check_columns, check_layout
from ._text import literal, loads_json, quoted

__all__ = ["FORMAT", "METADATA_FIELDS", "check_metadata", "read", "safe_name"]

FORMAT = "stableopt.history"
_VERSION = r"(unknown|[0-9][0-9A-Za-z.+!_-]{0,63})"
_NAME = r"[A-Za-z_][A-Za-z0-9_.]{0,99}"
#: the metadata keys a history file may carry: a regular expression for the value (None: JSON
#: checked by its reader) and the most characters it may have
METADATA_FIELDS: dict[str, tuple[str | None, int]] = {
    "format": (re.escape(FORMAT), len(FORMAT)),
    "schema": (r"[0-9]{1,6}", 6),
    "optimizer": (_NAME, 100),
    "stableopt_version": (_VERSION, 64),
    "torch_version": (_VERSION, 64),
    "elapsed": (r"[0-9]+(\.[0-9]*)?([eE][+-]?[0-9]+)?", 40),
    "hyperparameters": (None, 2**22),
    "event_reasons": (None, 2**26),
}


def safe_name(name: str) -> str:
    """An optimizer class name as the ``optimizer`` field can hold it.

    >>> safe_name("Adam"), safe_name("my\\x1bAdam")
    ('Adam', 'my_Adam')
    """
    if re.fullmatch(_NAME, name):
        return name
    cleaned = re.sub(r"[^A-Za-z0-9_.]", "_", name)[:100] or "unknown"
    return cleaned if re.fullmatch(_NAME, cleaned) else ("_" + cleaned)[:100]


def check_metadata(
    metadata: dict[str, str], bad: Callable[[str], Exception], *, events: int | None = None
) -> list[str]:
    """Check every metadata field; returns the event reasons it holds.

    The ``format`` and ``schema`` fields are checked by :func:`read` before this runs.
    """
    for key, value in metadata.items():
        if key not in METADATA_FIELDS:
            raise bad(f"unknown metadata field {quoted(key, 60)} (known: {sorted(METADATA_FIELDS)})")
        pattern, limit = METADATA_FIELDS[key]
        if len(value) > limit:
            raise bad(f"metadata field {key!r} is {len(value)} characters long (at most {limit})")
        if pattern is not None and not re.fullmatch(pattern, value):
            raise bad(f"metadata field {key!r} is not a valid {key.replace('_', ' ')}: {quoted(value, 60)}")
    try:
        groups = loads_json(
            metadata.get("hyperparameters", "[]"), max_depth=32, what="metadata field 'hyperparameters'"
        )
        reasons = loads_json(metadata.get("event_reasons", "[]"), max_depth=1, what="metadata field 'event_reasons'")
    except ValueError as exc:
        raise bad(str(exc)) from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("metadata field 'hyperparameters' is not a list of param groups")
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise bad("metadata field 'event_reasons' is not a list of strings")
    if events is not None and len(reasons) != events:
        raise bad(f"metadata field 'event_reasons' holds {len(reasons)} reasons for {events} event rows")
    if any(len(r) > MAX_REASON_CHARS for r in reasons):
        raise bad(f"metadata field 'event_reasons' holds a reason over {MAX_REASON_CHARS} characters")
    return reasons


def _open_regular(name: str, bad: Callable[[str], Exception]) -> tuple[int, int]:
    """A read-only descriptor and size of the regular file ``name``; ValueError otherwise."""
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise bad("no such file") from None
    except IsADirectoryError:
        raise bad("is a directory, not a stableopt history file") from None
    except PermissionError:
        raise bad("permission denied (the file is not readable)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise bad("a loop of symbolic links, not a file") from None
        raise bad(f"cannot open: {literal(exc.strerror or exc, 80)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device or socket"
        )
        raise bad(f"is {kind}, not a stableopt history file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return fd, st.st_size


def read(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """The checked columns, metadata (without the reasons) and event reasons of a history file."""
    shown = literal(os.fspath(path), 300)

    def bad(problem: str) -> ValueError:
        return ValueError(f"{shown}: {problem}")

    fd, size = _open_regular(os.fspath(path), bad)
    if size == 0:
        os.close(fd)
        raise bad("empty file, not a stableopt history (safetensors) file")
    with os.fdopen(fd, "rb") as f:
        header = _safetensors.read_header(f, size, bad)
        meta = header.metadata
        if meta.get("format") != FORMAT:
            raise bad(
                f"a safetensors file but not a stableopt history (its metadata has no 'format: {FORMAT}')"
                if header.entries or meta
                else "a safetensors file with nothing in it, not a stableopt history"
            )
        schema = meta.get("schema", "")
        if not re.fullmatch(r"[0-9]{1,6}", schema):
            raise bad(f"stableopt history without a valid schema version ({quoted(schema, 20)})")
        if int(schema) > SCHEMA_VERSION:
            raise bad(
                f"written with history schema {int(schema)}, newer than this stableopt reads "
                f"(schema {SCHEMA_VERSION}); upgrade stableopt to read it"
            )
        if int(schema) < 1:
            raise bad(f"invalid history schema {int(schema)}")
        rows = check_layout({k: (e.dtype, e.shape) for k, e in header.entries.items()}, bad)
        reasons = check_metadata(meta, bad, events=rows["events"])
        columns = {name: _safetensors.read_array(f, header, name, bad) for name in header.entries}
    check_columns(columns, bad)
    return columns, {k: v for k, v in meta.items() if k != "event_reasons"}, reasons


def write(path: str | os.PathLike[str], columns: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """Check and atomically write a history file (see :mod:`stableopt._atomic`)."""
    from ._atomic import atomic_write

    shown = literal(os.fspath(path), 300)

    def bad(problem: str) -> ValueError:
        return ValueError(f"{shown}: refusing to save an invalid history: {problem}")

    check_layout({k: (v.dtype.name, v.shape) for k, v in columns.items()}, bad)
    check_columns(columns, bad)
    events = len(columns["event_step"])
    check_metadata(metadata, bad, events=events)
    return atomic_write(path, lambda f: _safetensors.write(f, columns, metadata))


def elapsed_of(metadata: dict[str, str], columns: dict[str, Any]) -> float:
    """The wall clock a loaded file stands at: its ``elapsed`` field, else the last row's."""
    if "elapsed" in metadata:
        return float(metadata["elapsed"])
    last = columns.get("elapsed")
    return float(last[-1]) if last is not None and len(last) else 0.0


def jsonable(value: Any) -> Any:
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
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return repr(value)
