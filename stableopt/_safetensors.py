"""Reading and writing the safetensors files of a history, header checked before any data.

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
N, N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the tensors' bytes. :func:`read_header` checks all of it against the real
file size — the length field, the JSON's size and nesting, every dtype, shape and offset, and
that the tensors tile the data exactly — before a single tensor byte is read, so a file that
declares a 2 GiB tensor costs a few kilobytes to reject. :func:`read_array` then reads one
tensor with exactly the declared number of bytes. The files :func:`write` produces are
ordinary safetensors files (``safetensors.safe_open`` reads them).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO

import numpy as np

from ._text import loads_json, quoted

__all__ = ["Header", "read_array", "read_header", "write"]

#: the largest header read (safetensors' own limit); headers are also bounded by the file size
MAX_HEADER_BYTES = 100 * 2**20
# safetensors dtype -> (numpy dtype name, bytes per element)
_DTYPES = {
    "BOOL": ("bool", 1),
    "U8": ("uint8", 1),
    "I8": ("int8", 1),
    "I16": ("int16", 2),
    "U16": ("uint16", 2),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I32": ("int32", 4),
    "U32": ("uint32", 4),
    "F32": ("float32", 4),
    "I64": ("int64", 8),
    "U64": ("uint64", 8),
    "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}
_CODES = {"int64": "I64", "float64": "F64", "bool": "BOOL"}


@dataclass(frozen=True)
class Entry:
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    metadata: dict[str, str]
    entries: dict[str, Entry]
    data_start: int


def read_header(f: IO[bytes], size: int, bad: Callable[[str], Exception]) -> Header:
    """Parse and check the header of the open file ``f`` of ``size`` bytes.

    Raises ``bad("not a readable safetensors file ...: <what>")`` for anything wrong.
    """

    def corrupt(problem: str) -> Exception:
        return bad(f"not a readable safetensors file (truncated or corrupt?): {problem}")

    if size < 8:
        raise corrupt(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", f.read(8))
    if n == 0 or n > size - 8:
        raise corrupt(f"the header length field says {n} bytes, the file has {size - 8} after it")
    if n > MAX_HEADER_BYTES:
        raise corrupt(f"a {n}-byte header (at most {MAX_HEADER_BYTES} read)")
    raw = f.read(n)
    if len(raw) != n:
        raise corrupt("the file ended inside its header")
    try:
        document = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise corrupt("the header is not UTF-8") from None
    try:
        header = loads_json(document, max_depth=3, what="the header")
    except ValueError as exc:
        raise corrupt(str(exc)) from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise corrupt("__metadata__ is not a map of strings to strings")
    data = size - 8 - n
    entries: dict[str, Entry] = {}
    for name, spec in header.items():
        shown = quoted(name, 60)
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
            raise corrupt(f"tensor {shown} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise corrupt(f"tensor {shown} has an unknown dtype {quoted(dtype, 20)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
            raise corrupt(f"tensor {shown} has an invalid shape")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise corrupt(f"tensor {shown} has invalid data_offsets")
        begin, end = offsets
        numpy_name, itemsize = _DTYPES[dtype]
        if not begin <= end <= data or end - begin != math.prod(shape) * itemsize:
            raise corrupt(
                f"tensor {shown} declares {math.prod(shape) * itemsize} bytes at [{begin}, {end}), "
                f"the file holds {data} bytes of data"
            )
        entries[name] = Entry(numpy_name, tuple(shape), begin, end)
    position = 0
    for entry in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if entry.begin != position:
            raise corrupt("the tensors overlap or leave gaps in the data")
        position = entry.end
    if position != data:
        raise corrupt(f"the tensors cover {position} of the {data} data bytes")
    return Header(metadata, entries, 8 + n)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def read_array(f: IO[bytes], header: Header, name: str, bad: Callable[[str], Exception]) -> np.ndarray:
    """Read one tensor of a checked header (int64, float64 or bool) as a 1-D NumPy array."""
    entry = header.entries[name]
    f.seek(header.data_start + entry.begin)
    raw = f.read(entry.end - entry.begin)
    if len(raw) != entry.end - entry.begin:
        raise bad("not a readable safetensors file (truncated or corrupt?): the data ends early")
    if entry.dtype == "bool":
        codes = np.frombuffer(raw, dtype=np.uint8)
        if codes.size and codes.max() > 1:
            raise bad(f"column {quoted(name, 60)} holds booleans other than 0 and 1")
        return codes.astype(np.bool_)
    return np.frombuffer(raw, dtype=np.dtype(entry.dtype).newbyteorder("<")).astype(entry.dtype)


def write(f: IO[bytes], arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write 1-D int64/float64/bool ``arrays`` and string ``metadata`` as a safetensors file."""
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, values in arrays.items():
        nbytes = values.size * values.dtype.itemsize
        header[name] = {
            "dtype": _CODES[values.dtype.name],
            "shape": list(values.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors does
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for values in arrays.values():
        little = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        f.write(memoryview(little.view(np.uint8) if little.dtype.kind == "b" else little).cast("B"))  # type: ignore[arg-type]
