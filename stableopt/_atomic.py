"""Safe output files: a write either replaces the file whole or leaves the old one untouched.

:func:`atomic_write` is how ``History.save``, ``stableopt report --csv`` and ``--plot`` write.
The content goes to a temporary file in the target's own directory, is flushed to disk
(``fsync``) and renamed over the target, so a crash at any moment — even ``SIGKILL`` — leaves
either the old file or the new one, never a cut one. Around that:

* a symbolic link is written *through*: its target is replaced and the link stays a link;
* the new file gets the permissions (and, for root, the owner) of the file it replaces, or the
  usual ``0666 & ~umask`` for a new file — not ``mkstemp``'s ``0600``;
* a directory, FIFO, device node, socket, a symlink loop, a missing directory or a file with
  several hard links (which a rename would split from its other names) is refused with a
  ``ValueError`` naming the path, before anything is written;
* an exception (``KeyboardInterrupt`` included) removes the temporary file; the temporary file
  of a writer that was killed is removed by the next write to the same target on the same host.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import secrets
import socket
import stat
from collections.abc import Callable
from typing import IO, Any

from ._text import literal

__all__ = ["atomic_write", "same_file"]

_MAX_LINKS = 40  # symbolic links followed before calling it a loop (Linux's own limit)
_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:6]


def _resolve(path: str) -> str:
    """``path`` with symbolic links of its last component followed (the file to replace)."""
    target = path
    for _ in range(_MAX_LINKS):
        if not os.path.islink(target):
            return target
        link = os.readlink(target)
        target = link if os.path.isabs(link) else os.path.join(os.path.dirname(target), link)
    raise ValueError(f"cannot write {literal(path)}: a loop of symbolic links")


def _check_target(path: str, target: str) -> os.stat_result | None:
    """The target's stat (None for a new file); ValueError for what must not be replaced."""
    shown = literal(path) if path == target else f"{literal(path)} (-> {literal(target)})"
    try:
        st = os.stat(target)
    except FileNotFoundError:
        folder = os.path.dirname(os.path.abspath(target))
        if not os.path.isdir(folder):
            raise ValueError(f"cannot write {shown}: the directory {literal(folder)} does not exist") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"cannot write {shown}: a loop of symbolic links") from None
        raise
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise ValueError(f"cannot write {shown}: it is {kind}, not a regular file; refusing to replace it")
    if st.st_nlink > 1:
        raise ValueError(
            f"cannot write {shown}: it has {st.st_nlink} hard links; replacing it would leave the other names with "
            "the old content and writing in place could leave it cut short. Write to a new name "
            "(or remove the other links) instead"
        )
    return st


def _remove_stale(folder: str, prefix: str) -> None:
    """Delete temporary files of ``prefix`` left on this host by writers that no longer run."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[0-9a-f]+\.tmp\Z")
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # that writer is alive
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):  # alive under another user, or not a pid
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:
            pass


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[Any]], None], *, text: bool = False) -> str:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it and rename it there.

    Args:
        path: the file to create or replace (a symlink is written through to its target).
        write: writes the whole content to the open file ``f`` (binary, or UTF-8 text with
            ``text=True`` and ``newline=""``).
        text: open ``f`` in text mode.

    Returns:
        The path of the file written (the symlink's target for a symlink).

    Raises:
        ValueError: ``path`` names a directory, FIFO, device, socket or a multiply hard-linked
            file, is a symlink loop, or its directory does not exist (nothing is written).
        OSError: the write itself failed (permissions, disk full); the old file is intact.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> out = atomic_write(os.path.join(folder, "a.txt"), lambda f: f.write("hi"), text=True)
        >>> open(out).read()
        'hi'
    """
    name = os.fspath(path)
    if not name:
        raise ValueError("cannot write to an empty path")
    target = _resolve(name)
    st = _check_target(name, target)
    folder = os.path.dirname(os.path.abspath(target))
    base = os.path.basename(target)[:120]
    prefix = f".{base}.{_host_tag()}-"
    _remove_stale(folder, prefix)
    tmp = ""
    try:
        for _ in range(100):
            tmp = os.path.join(folder, f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.tmp")
            try:  # 0666 & ~umask, like any new file; O_EXCL: never reuse a name
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
                break
            except FileExistsError:
                tmp = ""
        else:  # pragma: no cover - 100 collisions of 32 random bits
            raise FileExistsError(errno.EEXIST, "no free temporary name", folder)
        with os.fdopen(fd, "wb") as raw:
            if st is not None:
                os.fchmod(raw.fileno(), stat.S_IMODE(st.st_mode))
                if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):
                    try:
                        os.fchown(raw.fileno(), st.st_uid, st.st_gid)
                    except OSError:  # pragma: no cover - e.g. a filesystem without owners
                        pass
            if text:
                wrapper = io.TextIOWrapper(raw, encoding="utf-8", newline="")
                write(wrapper)
                wrapper.flush()
                wrapper.detach()
            else:
                write(raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
        tmp = ""
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _sync_directory(folder)
    return target


def _sync_directory(folder: str) -> None:
    """Make the rename durable (best effort: not every filesystem can fsync a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether two paths name the same file (through links; by resolved path when one is
    missing).

    >>> same_file(__file__, __file__)
    True
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)
