"""Measure in float32 when the model trains in bfloat16/float16 or under autocast.

Hessian-vector products in half precision carry 2–3 significant digits, not enough for Lanczos
to reach its tolerance: the measurement would be noise presented as a number. Inside
:func:`float32_measurement`

* every bfloat16/float16 parameter is temporarily given a float32 copy of its values
  (``p.data = p.data.float()``); on exit the original storage is put back, so parameters are
  bitwise what they were and ``p.grad`` is never touched;
* every module that runs (in the measuring thread) gets its half-precision floating-point buffers (BatchNorm statistics)
  as float32 copies and its half-precision positional tensor inputs upcast to float32;
* autocast is switched off for the measurement (an enclosing ``torch.autocast`` block must not
  cast Lanczos' algebra down) and again while a module runs, even inside an autocast block of
  ``loss_fn``, so its matmuls are not cast down; the thread's autocast state is restored
  exactly on exit, also when an interrupt arrives during the restore (hooks are removed
  first, each restore step runs even if another fails; :func:`stableopt._state.run_all`).

The Hessian is then the Hessian of the same function evaluated in float32, which is what the
report's ``dtype`` says. Code outside modules that mixes half-precision tensors with the
upcast parameters can fail with a dtype error; that error is re-raised with an explanation
instead of measuring in half precision silently.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from ._state import RestoringContext, remove_global_hook, run_all

T = TypeVar("T")

__all__ = ["LOW_PRECISION", "explained", "float32_measurement", "upcast_note"]

LOW_PRECISION = (torch.bfloat16, torch.float16)

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _autocast_state() -> dict[str, bool]:
    state = {}
    for dev in _AUTOCAST_DEVICES:
        try:
            state[dev] = torch.is_autocast_enabled(dev)
        except (RuntimeError, TypeError):  # pragma: no cover - device type unknown to this build
            continue
    return state


def _set_autocast(state: dict[str, bool]) -> None:
    for dev, on in state.items():
        torch.set_autocast_enabled(dev, on)


def _up(x: Any) -> Any:
    if isinstance(x, Tensor) and x.dtype in LOW_PRECISION:
        return x.float()
    return x


class _Upcast:
    """What :class:`float32_measurement` changed and how to put it back."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.thread = threading.get_ident()
        self.swapped: list[tuple[Tensor, Tensor]] = []
        self.buffers: list[tuple[nn.Module, str, Tensor]] = []
        self.autocast0: dict[str, bool] | None = None
        self.stack: list[dict[str, bool]] = []
        self.handles: list[Any] = []
        self.pre_hook, self.post_hook = self.pre, self.post  # one object each, for removal
        self.watch: Any = None  # set by RestoringContext.__exit__'s lookup
        self.done = False

    def enter(self) -> bool:
        self.autocast0 = _autocast_state()
        self.swapped = [(p, p.data) for p in self.params if p.dtype in LOW_PRECISION]
        for p, original in self.swapped:
            p.data = original.float()
        _set_autocast({dev: False for dev in self.autocast0})  # Lanczos' own algebra in full precision
        self.handles.append(nn.modules.module.register_module_forward_pre_hook(self.pre_hook))
        self.handles.append(nn.modules.module.register_module_forward_hook(self.post_hook))
        return bool(self.swapped)

    def pre(self, module: nn.Module, args: Any) -> Any:
        if (not torch.compiler.is_compiling() and threading.get_ident() != self.thread) or self.autocast0 is None:
            return None  # another thread's module (see stableopt._state: refused there)
        for name, buf in module._buffers.items():
            if buf is not None and buf.dtype in LOW_PRECISION:
                self.buffers.append((module, name, buf))
                module._buffers[name] = buf.float()
        self.stack.append(_autocast_state())
        _set_autocast({dev: False for dev in self.autocast0})
        low = any(isinstance(a, Tensor) and a.dtype in LOW_PRECISION for a in tree_leaves(args))
        return tree_map(_up, args) if low else None

    def post(self, module: nn.Module, args: Any, output: Any) -> None:
        if (torch.compiler.is_compiling() or threading.get_ident() == self.thread) and self.stack:
            _set_autocast(self.stack.pop())

    def exit(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        if self.done:
            return

        def params() -> None:
            for p, original in self.swapped:
                p.data = original

        def buffers() -> None:
            for module, name, buf in reversed(self.buffers):
                module._buffers[name] = buf

        run_all(
            [
                lambda: remove_global_hook(
                    self.pre_hook, self.handles[0] if self.handles else None, "_global_forward_pre_hooks"
                ),
                lambda: remove_global_hook(
                    self.post_hook, self.handles[1] if len(self.handles) > 1 else None, "_global_forward_hooks"
                ),
                params,
                buffers,
                lambda: _set_autocast(self.autocast0) if self.autocast0 is not None else None,
                self.finish,  # last: interrupted before here, it all runs again
            ]
        )

    def finish(self) -> None:
        """Done: drop the references that make a cycle, so that the float32 copies are freed now."""
        self.done = True
        self.pre_hook = self.post_hook = self.watch = None  # type: ignore[assignment]


class float32_measurement(RestoringContext):  # noqa: N801 - used like a function
    """Run the block with low-precision ``params`` upcast and autocast off inside modules.

    ``with float32_measurement(params) as upcast:`` — ``upcast`` says whether any parameter
    was upcast. The hooks act in the entering thread only. On exit the hooks are removed
    first, then parameters, buffers and autocast are put back, also when interrupted
    (:class:`stableopt._state.RestoringContext`).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._restorer = _Upcast(params)


def upcast_note(exc: BaseException) -> str:
    return (
        "stableopt measures bfloat16/float16 models in float32: the parameters were upcast to "
        "float32 copies for the measurement and loss_fn failed with them "
        f"({type(exc).__name__}: {exc}). Make loss_fn dtype-agnostic outside modules (e.g. "
        "x.to(p.dtype) instead of a fixed half-precision tensor), or keep half-precision "
        "tensors inside nn.Modules, whose inputs are upcast automatically"
    )


def explained(upcast: bool, build: Callable[[], T]) -> T:
    """``build()``; a dtype error raised while parameters are upcast gets :func:`upcast_note`."""
    try:
        return build()
    except RuntimeError as exc:
        if upcast and "type" in str(exc).lower():
            raise RuntimeError(upcast_note(exc)) from exc
        raise
