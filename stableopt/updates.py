"""θ_t − θ_{t−1}: the update direction that ``directional_sharpness(direction="update")`` and
``opt.monitor(..., directional="update")`` measure along.

The optimizer keeps θ_{t−1} only while someone asks for it (``opt.track_updates()``, a monitor
with ``directional="update"``): one copy of the parameters, refreshed by a step pre-hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _hooks
from .space import local_tensor

__all__ = ["UpdateTracker", "update_tracker"]


class UpdateTracker:
    """Keeps θ_{t−1} (one copy of the parameters) while someone asks for the update direction.

    A torch step pre-hook copies the parameters before every ``step()``; after the step,
    :meth:`update` returns θ_t − θ_{t−1}. Installed by ``opt.track_updates()`` (and a monitor
    with ``directional="update"``), removed when the last user lets go: an optimizer that never
    asks pays nothing.
    """

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.users = 0
        self._hook: Any = None
        self._theta: list[Tensor] | None = None
        self._at = -1  # steps_taken when the snapshot was taken

    def acquire(self) -> _TrackerHandle:
        if self._hook is None:
            self._hook = _hooks.register_step_pre_hook(self.optimizer, self._before_step)
        self.users += 1
        return _TrackerHandle(self)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0 and self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._theta, self._at = None, -1

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        params = [local_tensor(p.detach()) for p in self._params()]
        with torch.no_grad():
            if self._theta is not None and [t.shape for t in self._theta] == [p.shape for p in params]:
                torch._foreach_copy_(self._theta, params)
            else:
                self._theta = [p.clone() for p in params]
        self._at = optimizer.steps_taken

    def update(self, params: Sequence[Tensor]) -> list[Tensor]:
        """θ_t − θ_{t−1} of ``params`` (in float32 or wider), for the last ``step()``.

        Raises:
            RuntimeError: the last step was not tracked.
        """
        opt = self.optimizer
        if self._theta is None or self._at != opt.steps_taken - 1:
            raise RuntimeError(
                f"direction='update' needs the parameters before the last step, and the last step "
                f"(step {opt.steps_taken}) was not tracked: opt.track_updates() must be active before "
                "the step() whose update you measure"
            )
        index = {id(p): i for i, p in enumerate(self._params())}
        out = []
        with torch.no_grad():
            for p in params:
                now = local_tensor(p.detach())
                dtype = torch.promote_types(torch.float32, now.dtype)
                out.append(now.to(dtype) - self._theta[index[id(p)]].to(dtype))
        return out


class _TrackerHandle:
    """What ``opt.track_updates()`` returns: ``remove()`` (or ``with`` exit) stops tracking."""

    def __init__(self, tracker: UpdateTracker) -> None:
        self._tracker: UpdateTracker | None = tracker

    def remove(self) -> None:
        if self._tracker is not None:
            self._tracker.release()
            self._tracker = None

    def __enter__(self) -> _TrackerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def update_tracker(optimizer: Any) -> UpdateTracker:
    """The optimizer's :class:`UpdateTracker` (created on first use, never in ``__init__``)."""
    tracker = optimizer.__dict__.get("_stableopt_update_tracker")
    if tracker is None:
        tracker = optimizer.__dict__["_stableopt_update_tracker"] = UpdateTracker(optimizer)
    return tracker
