"""The step hooks stableopt registers on an optimizer, made safe under ``torch.compile``.

Monitors, the secant tracker, the update tracker and the guard are torch step pre/post hooks.
When a user compiles the step (``torch.compile(opt.step)``), torch's hook-running wrapper is
traced by dynamo, and with it every hook: a monitor's measurement (Lanczos, Hessian-vector
products, the restore of RNG streams and buffers) would be traced into dozens of graphs with as
many graph breaks (35 graphs, 51 breaks and 18 s of CPU for four steps of a tiny MLP measured
every other step, with the ``eager`` backend, against 0.6 s), and parts of it cannot be traced
at all (the interrupt-safe context managers of :mod:`stableopt._state`). Every hook is therefore registered
through :func:`torch.compiler.disable`: dynamo calls it as an ordinary Python function, the
measurement runs eagerly on the eager model (exact double-backward products, the same numbers
as an uncompiled run), and the compiled step keeps its own graph. In eager mode the wrapper
costs well under a microsecond per call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["eager", "register_step_post_hook", "register_step_pre_hook"]


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, called as plain Python (never traced) from code that ``torch.compile`` traces."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def register_step_pre_hook(optimizer: Any, hook: Callable[..., Any]) -> RemovableHandle:
    """``optimizer.register_step_pre_hook(hook)``, with ``hook`` run eagerly under compile."""
    return optimizer.register_step_pre_hook(eager(hook))


def register_step_post_hook(optimizer: Any, hook: Callable[..., Any]) -> RemovableHandle:
    """``optimizer.register_step_post_hook(hook)``, with ``hook`` run eagerly under compile."""
    return optimizer.register_step_post_hook(eager(hook))
