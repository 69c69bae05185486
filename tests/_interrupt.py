"""Interrupts injected at chosen moments of chosen code: a helper of the interrupt tests.

:class:`Interrupter` raises ``KeyboardInterrupt`` at the ``at``-th *moment* of a run inside its
``targets`` — modules, functions (with the functions and lambdas nested in them), classes (their
methods) or source file paths — as a signal handler would. The moments:

* profile events (``sys.setprofile``), where CPython delivers a signal's exception: a function
  of the targets starting or returning, a function called from the targets starting or
  returning to them, and a C function called from the targets (before the call, after its
  return);
* with ``lines=True`` also every line event (``sys.settrace``) inside the targets: the start of
  each line, so an interrupt can land between any two statements of a restore loop (stricter
  than a real signal, which waits for the next call or backward jump).

Counting first (``at=0``: never fire; ``count`` tells how many moments there were) and then
firing at a seeded sample of them makes the trials deterministic and bounded::

    counter = Interrupter([stableopt.finite_difference], lines=True)
    counter.run(action)
    for at in sample_moments(counter.count, 150):
        state = setup()
        try:
            Interrupter([stableopt.finite_difference], at, lines=True).run(lambda: action(state))
        except KeyboardInterrupt:
            pass
        check(state)

``armed=False`` counts nothing until the test sets ``armed = True`` (e.g. from a ``loss_fn``
that raises first, to interrupt only the handling of that first exception).
"""

from __future__ import annotations

import inspect
import random
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

SEED = 20240611


def _codes(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _resolve(targets: Iterable[Any]) -> tuple[set[str], set[types.CodeType]]:
    files: set[str] = set()
    codes: set[types.CodeType] = set()
    for target in targets:
        if isinstance(target, str):
            files.add(target)
        elif isinstance(target, types.ModuleType):
            files.add(target.__file__)
        elif isinstance(target, type):
            for member in vars(target).values():
                fn = getattr(member, "__func__", member)
                fn = getattr(fn, "fget", fn)  # properties: their getter
                if inspect.isfunction(fn):
                    codes.update(_codes(fn.__code__))
        else:
            fn = inspect.unwrap(getattr(target, "__func__", target))
            if not inspect.isfunction(fn):
                raise TypeError(f"cannot interrupt inside {target!r}: give modules, functions, classes or file paths")
            codes.update(_codes(fn.__code__))
    return files, codes


class Interrupter:
    """Raise ``KeyboardInterrupt`` at the ``at``-th moment inside ``targets`` (see the module docs).

    Attributes:
        count: the moments seen so far (all of them after a run with ``at=0``).
        fired: whether the interrupt was raised.
        armed: whether moments are counted now.
    """

    def __init__(self, targets: Iterable[Any], at: int = 0, *, armed: bool = True, lines: bool = False) -> None:
        self.files, self.codes = _resolve(targets)
        self.at, self.armed, self.lines = at, armed, lines
        self.count, self.fired = 0, False

    def _inside(self, frame: Any) -> bool:
        return frame is not None and (frame.f_code in self.codes or frame.f_code.co_filename in self.files)

    def _moment(self) -> None:
        self.count += 1
        if self.count == self.at:
            self.fired = True
            raise KeyboardInterrupt("injected")

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if not self.armed or self.fired or event == "c_exception":
            return
        if self._inside(frame) or (event in ("call", "return") and self._inside(frame.f_back)):
            self._moment()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        # the global tracer: line events only in the targets' own frames
        return self._line if self._inside(frame) else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if event == "line" and self.armed and not self.fired:
            self._moment()
        return self._line

    def run(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the interrupt armed; the previous profile and trace functions come back."""
        profile, trace = sys.getprofile(), sys.gettrace()
        if self.lines:
            sys.settrace(self._trace)
        sys.setprofile(self._profile)
        try:
            return fn()
        finally:
            sys.setprofile(profile)
            sys.settrace(trace)


def sample_moments(total: int, count: int, seed: int = SEED) -> list[int]:
    """``count`` of the moments 1..``total`` (all of them if fewer), a seeded sample in order."""
    return sorted(random.Random(seed).sample(range(1, total + 1), min(total, count)))
