"""Untrusted text: rendering it literally (no markup, no control codes) and parsing bounded JSON.

Strings that come from a file, a checkpoint or a user (optimizer names, versions, event
reasons, file names, error messages quoting them) reach a terminal through rich. Two things
could make such a string act instead of being shown: rich markup (``[link=...]``, ``[blink]``),
which :func:`text` avoids by building a :class:`rich.text.Text` that is never parsed, and
terminal control codes (ESC sequences clear the screen or set the window title, BEL, C1
controls such as CSI U+009B, DEL, and the bidirectional overrides that reorder what is shown),
which :func:`literal` replaces by a visible escape such as ``\\x1b``. Lengths are bounded.

:func:`loads_json` parses JSON from a file without the recursion (and the ``RecursionError``)
that a document nested 100 000 levels deep costs :func:`json.loads`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

__all__ = ["MAX_DISPLAY_CHARS", "literal", "loads_json", "quoted", "text"]

#: strings shown in a report or an error message are cut to this many characters
MAX_DISPLAY_CHARS = 200

# C0 controls (tab and newline included: every field shown is one line), DEL, C1 controls, and
# the Unicode format characters that reorder or hide text (bidi embeddings/overrides/isolates,
# line and paragraph separators, the BOM)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def literal(value: Any, limit: int | None = MAX_DISPLAY_CHARS) -> str:
    """``str(value)`` with control characters made visible and at most ``limit`` characters.

    >>> literal("ok\\x1b[2J\\x07")
    'ok\\\\x1b[2J\\\\x07'
    >>> literal("x" * 10, limit=4)
    'xxx…'
    """
    s = _UNSAFE.sub(_visible, str(value))
    if limit is not None and len(s) > limit:
        s = s[: max(limit - 1, 0)] + "…"
    return s


def quoted(value: Any, limit: int | None = 60) -> str:
    """:func:`literal` in single quotes, for naming a value in an error message.

    >>> print(quoted("a\\x07b"))
    'a\\x07b'
    """
    return f"'{literal(value, limit)}'"


def text(value: Any, style: str = "", limit: int | None = MAX_DISPLAY_CHARS) -> Any:
    """A rich ``Text`` showing :func:`literal` of ``value`` exactly (markup is not interpreted).

    >>> text("[bold]x[/]").plain
    '[bold]x[/]'
    """
    from rich.text import Text

    return Text(literal(value, limit), style=style)


def json_depth(document: str) -> int:
    """How deeply the arrays and objects of a JSON document nest (strings skipped), without
    recursion: a linear scan in NumPy.

    >>> json_depth('{"a": [1, [2, "]]]"]]}')
    3
    """
    skeleton = _STRING.sub("", document).encode("utf-8", "replace")
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.zeros(len(codes), dtype=np.int64)
    steps[(codes == ord("[")) | (codes == ord("{"))] = 1
    steps[(codes == ord("]")) | (codes == ord("}"))] = -1
    return int(np.cumsum(steps).max(initial=0))


def loads_json(document: str, *, max_depth: int, what: str) -> Any:
    """``json.loads(document)`` for untrusted input: nesting beyond ``max_depth`` and non-JSON
    both raise ``ValueError("<what> ...")``; ``NaN``/``Infinity`` literals are refused.

    >>> loads_json("[1, 2]", max_depth=1, what="x")
    [1, 2]
    """
    depth = json_depth(document)
    if depth > max_depth:
        raise ValueError(f"{what} nests {depth} levels deep (at most {max_depth} expected)")

    def constant(name: str) -> Any:
        raise ValueError(f"{what} holds {name}, which is not JSON")

    try:
        return json.loads(document, parse_constant=constant)
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise ValueError(f"{what} nests too deeply") from None
    except ValueError as exc:
        raise ValueError(f"{what} is not valid JSON ({literal(exc, 80)})") from None
