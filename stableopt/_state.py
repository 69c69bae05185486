"""Snapshot and restore of everything a measurement could disturb: RNG streams and module buffers.

A measurement runs the user's ``loss_fn`` several times. Dropout draws from the global RNG and
BatchNorm in training mode updates its running statistics; both would leak into training. While
:func:`preserved_training_state` is active a global forward pre-hook records the buffers of every
module that runs, and on exit they are written back bit for bit and every RNG stream (torch CPU,
CUDA, Python ``random``, NumPy) is restored.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import torch
from torch import nn

try:  # NumPy is a core dependency, but keep the guard usable without it.
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None


class RNGSnapshot:
    """The state of every global random stream, restorable any number of times."""

    def __init__(self) -> None:
        self.torch_cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized()
            else None
        )
        self.python = random.getstate()
        self.numpy = _np.random.get_state() if _np is not None else None

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            _np.random.set_state(self.numpy)


class _BufferRecorder:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        # (module, buffer name, the tensor object, a copy of its values)
        self.saved: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]] = []

    def __call__(self, module: nn.Module, args: Any) -> None:
        if id(module) in self.seen:
            return
        self.seen.add(id(module))
        for name, buf in module._buffers.items():
            copy = None if buf is None else buf.detach().clone()
            self.saved.append((module, name, buf, copy))

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buf, copy in reversed(self.saved):
                module._buffers[name] = buf
                if buf is not None and copy is not None:
                    buf.copy_(copy)


@contextlib.contextmanager
def preserved_training_state() -> Iterator[RNGSnapshot]:
    """Restore RNG streams and the buffers of every module run inside the block.

    Yields the :class:`RNGSnapshot` taken on entry, so that a caller evaluating the same loss
    several times can replay identical dropout masks with ``snapshot.restore()``.
    """
    rng = RNGSnapshot()
    recorder = _BufferRecorder()
    handle = nn.modules.module.register_module_forward_pre_hook(recorder)
    try:
        yield rng
    finally:
        handle.remove()
        recorder.restore()
        rng.restore()
