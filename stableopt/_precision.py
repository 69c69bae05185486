"""Measure in float32 when the model trains in bfloat16/float16 or under autocast.

Hessian-vector products in half precision carry 2–3 significant digits, not enough for Lanczos
to reach its tolerance: the measurement would be noise presented as a number. Inside
:func:`float32_measurement`

* every bfloat16/float16 parameter is temporarily given a float32 copy of its values
  (``p.data = p.data.float()``); on exit the original storage is put back, so parameters are
  bitwise what they were and ``p.grad`` is never touched;
* every module that runs gets its half-precision floating-point buffers (BatchNorm statistics)
  as float32 copies and its half-precision positional tensor inputs upcast to float32;
* autocast is switched off for the measurement (an enclosing ``torch.autocast`` block must not
  cast Lanczos' algebra down) and again while a module runs, even inside an autocast block of
  ``loss_fn``, so its matmuls are not cast down; the thread's autocast state is restored
  exactly on exit.

The Hessian is then the Hessian of the same function evaluated in float32, which is what the
report's ``dtype`` says. Code outside modules that mixes half-precision tensors with the
upcast parameters can fail with a dtype error; that error is re-raised with an explanation
instead of measuring in half precision silently.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

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


@contextlib.contextmanager
def float32_measurement(params: Sequence[Tensor]) -> Iterator[bool]:
    """Run the block with low-precision ``params`` upcast and autocast off inside modules.

    Yields whether any parameter was upcast.
    """
    swapped: list[tuple[Tensor, Tensor]] = []
    for p in params:
        if p.dtype in LOW_PRECISION:
            original = p.data
            swapped.append((p, original))
    autocast0 = _autocast_state()
    stack: list[dict[str, bool]] = []

    def pre(module: nn.Module, args: Any) -> Any:
        for name, buf in module._buffers.items():
            if buf is not None and buf.dtype in LOW_PRECISION:
                # _state's recorder (registered earlier, so called first) has already saved the
                # original buffer object; it is put back when the measurement ends.
                module._buffers[name] = buf.float()
        stack.append(_autocast_state())
        _set_autocast({dev: False for dev in autocast0})
        low = any(isinstance(a, Tensor) and a.dtype in LOW_PRECISION for a in tree_leaves(args))
        return tree_map(_up, args) if low else None

    def post(module: nn.Module, args: Any, output: Any) -> None:
        if stack:
            _set_autocast(stack.pop())

    try:
        for p, original in swapped:
            p.data = original.float()
        _set_autocast({dev: False for dev in autocast0})  # Lanczos' own algebra in full precision
        h1 = nn.modules.module.register_module_forward_pre_hook(pre)
        h2 = nn.modules.module.register_module_forward_hook(post)
        try:
            yield bool(swapped)
        finally:
            h1.remove()
            h2.remove()
    finally:
        for p, original in swapped:
            p.data = original
        _set_autocast(autocast0)


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
