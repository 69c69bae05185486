"""Snapshot and restore of everything a measurement could disturb: RNG streams, module buffers,
grad mode — robust to interrupts, and refused where threads would make it wrong.

A measurement runs the user's ``loss_fn`` several times. Dropout draws from the global RNG and
BatchNorm in training mode updates its running statistics; both would leak into training. While
:class:`preserved_training_state` is active a global forward pre-hook records the buffers of every
module that runs, and on exit they are written back bit for bit, every RNG stream (torch CPU,
CUDA, Python ``random``, NumPy) is restored and so is grad mode.

**Interrupts.** The restore runs through :func:`run_all`: the hook is removed first, then
every other step runs even if an exception (a second ``KeyboardInterrupt``, say) arrives in the
middle of one; an interrupted step runs again (each is idempotent) and the first exception is
re-raised once all are done. Entering is protected the same way, so an interrupt at any moment
leaves no hook registered and nothing half-restored.

**The guard's lr scale.** :class:`scaled_lr` multiplies each param group's ``lr`` by a factor
for the duration of one ``step()`` and puts the scheduler's values back on exit, through the
same machinery: the values are saved before any is changed, and the restore is a
:func:`run_all` step (a second interrupt in the middle of it runs it again), with the weak-reference
fallback of :class:`RestoringContext` for an interrupt that keeps ``__exit__`` from starting.

**Threads.** RNG streams and module buffers are process-wide, so a measurement can only restore
them correctly if nothing else runs meanwhile. One measurement at a time: a measurement started
while another thread is measuring raises ``RuntimeError`` before it changes anything (the same
thread may nest them). A module forward pass in *another* thread during a measurement (training
in the main thread while a second thread measures) is detected by the same hook: the
measurement then does not rewind what that thread did — it leaves the RNG streams and the
buffers of the modules that thread ran as they are — and raises ``RuntimeError`` when it ends.
Measure from the thread that trains (a monitor does), or pause training while measuring.
"""

from __future__ import annotations

import random
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.optim.optimizer as _optimizer_module
from torch import nn

try:  # NumPy is a core dependency, but keep the guard usable without it.
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None  # type: ignore[assignment]

__all__ = [
    "RNGSnapshot",
    "RestoringContext",
    "grad_disabled",
    "grads_aside",
    "overwritten",
    "preserved_training_state",
    "remove_global_hook",
    "run_all",
    "scaled_lr",
]

#: attempts per cleanup step before :func:`run_all` gives up on it and moves on
_ATTEMPTS = 3
#: the measurement in progress (a :class:`preserved_training_state`), claimed with one atomic
#: ``dict.setdefault``: no lock that an interrupt could leave held
_ACTIVE: dict[str, Any] = {}


def run_all(steps: Sequence[Callable[[], object]]) -> None:
    """Run every step even if exceptions arrive meanwhile; then re-raise the first one.

    A step that raised (or was interrupted) runs again, up to three times, so steps must be
    idempotent. Used for every restore, so that a ``KeyboardInterrupt`` arriving in the middle
    of one still leaves the rest restored.

    >>> done = []
    >>> def fail(): raise KeyError("x")
    >>> try:
    ...     run_all([lambda: done.append(1), fail, lambda: done.append(3)])
    ... except KeyError:
    ...     done
    [1, 3]
    """
    first: BaseException | None = None
    i = attempts = 0
    while i < len(steps):
        try:
            attempts += 1
            steps[i]()
            i, attempts = i + 1, 0
        except BaseException as exc:  # KeyboardInterrupt too: finish restoring first
            if first is None:
                first = exc
            if attempts >= _ATTEMPTS:
                i, attempts = i + 1, 0
    if first is not None:
        raise first


class RNGSnapshot:
    """The state of every global random stream, restorable any number of times."""

    def __init__(self) -> None:
        self.torch_cpu = torch.get_rng_state()
        self.cuda = (
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
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
    """Global forward pre-hook: saves the buffers of each module the measuring thread runs,
    and notes modules that any other thread runs meanwhile."""

    def __init__(self, thread: int) -> None:
        self.thread = thread
        self.seen: set[int] = set()
        # (module, buffer name, the tensor object, a copy of its values)
        self.saved: list[tuple[nn.Module, str, torch.Tensor | None, torch.Tensor | None]] = []
        self.foreign: dict[int, str] = {}  # id(module) -> "thread name (module type)"

    def __call__(self, module: nn.Module, args: Any) -> None:
        # under torch.compile this hook is traced into the graph, in the calling thread:
        # dynamo cannot trace get_ident (it would break the graph), and need not
        if not torch.compiler.is_compiling() and threading.get_ident() != self.thread:
            self.foreign.setdefault(id(module), f"{threading.current_thread().name!r} ran {type(module).__name__}")
            return
        if id(module) in self.seen:
            return
        saved = [
            (module, name, buf, None if buf is None else buf.detach().clone()) for name, buf in module._buffers.items()
        ]
        self.saved.extend(saved)  # one call: all of the module's buffers or none
        self.seen.add(id(module))

    def restore(self) -> None:
        with torch.no_grad():
            for module, name, buf, copy in reversed(self.saved):
                if id(module) in self.foreign:
                    continue  # another thread's training changed it too: do not rewind that
                module._buffers[name] = buf
                if buf is not None and copy is not None:
                    buf.copy_(copy)


def remove_global_hook(hook: Any, handle: Any, registry: str = "_global_forward_pre_hooks") -> None:
    """Remove a global module hook by its handle and, should an interrupt have come between
    registering it and keeping the handle, by identity from torch's registry."""
    if handle is not None:
        handle.remove()
    hooks = getattr(nn.modules.module, registry, {})
    for key in [k for k, v in hooks.items() if v is hook]:
        hooks.pop(key, None)


def _remove_step_hook(hook: Any, handle: Any) -> None:
    if handle is not None:
        handle.remove()
    hooks = getattr(_optimizer_module, "_global_optimizer_pre_hooks", {})
    for key in [k for k, v in hooks.items() if v is hook]:
        hooks.pop(key, None)


class _Measurement:
    """What one measurement saved (the restorer of :class:`preserved_training_state`)."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.grad: bool | None = None
        self.rng: RNGSnapshot | None = None
        self.recorder: _BufferRecorder | None = None
        self.handle: Any = None
        self.step_handle: Any = None
        self.step_hook: Any = self.refuse_step  # one object, for removal by identity
        self.watch: Any = None  # set by RestoringContext.__exit__'s lookup
        self.done = False

    @property
    def name(self) -> str:
        return next((t.name for t in threading.enumerate() if t.ident == self.thread), str(self.thread))

    def enter(self) -> RNGSnapshot:
        owner = _ACTIVE.setdefault("measurement", self)
        if owner.thread != self.thread:
            raise RuntimeError(
                f"a stableopt measurement is already running in thread {owner.name!r}; measurements "
                "save and restore process-wide state (RNG streams, module buffers) and cannot overlap. "
                "Measure from one thread (the one that trains: opt.monitor does), one at a time"
            )
        self.grad = torch.is_grad_enabled()
        self.rng = RNGSnapshot()
        self.recorder = _BufferRecorder(self.thread)
        self.handle = nn.modules.module.register_module_forward_pre_hook(self.recorder)
        self.step_handle = _optimizer_module.register_optimizer_step_pre_hook(self.step_hook)
        return self.rng

    def refuse_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if threading.get_ident() != self.thread:
            if self.recorder is not None:
                self.recorder.foreign.setdefault(
                    id(optimizer), f"{threading.current_thread().name!r} stepped {type(optimizer).__name__}"
                )
            return
        raise RuntimeError(
            f"{type(optimizer).__name__}.step() was called inside a stableopt measurement (from loss_fn, "
            "e.g. a monitor's); a measurement must not train, and a monitor's loss_fn that steps "
            "would measure again inside its own step. Compute the loss only; step in the training loop"
        )

    def exit(self, *exc: object) -> None:
        self.restore()
        foreign = self.recorder.foreign if self.recorder is not None else {}
        if foreign:
            raise RuntimeError(
                "stableopt: modules ran in another thread during this measurement "
                f"({'; '.join(list(foreign.values())[:3])}); a measurement cannot restore process-wide "
                "state while another thread trains, so it left the RNG streams and those modules' "
                "buffers as they are. Measure from the thread that trains (opt.monitor does), or "
                "pause training while measuring"
            )

    def restore(self) -> None:
        """Put everything back (idempotent; hooks first; see :func:`run_all`)."""
        if self.done:
            return
        recorder = self.recorder

        def rng() -> None:  # after the hook is gone, so ``foreign`` is final
            if self.rng is not None and not (recorder is not None and recorder.foreign):
                self.rng.restore()

        run_all(
            [
                lambda: remove_global_hook(recorder, self.handle) if recorder is not None else None,
                lambda: _remove_step_hook(self.step_hook, self.step_handle),
                lambda: recorder.restore() if recorder is not None else None,
                rng,
                lambda: torch.set_grad_enabled(self.grad) if self.grad is not None else None,
                lambda: _ACTIVE.pop("measurement", None) if _ACTIVE.get("measurement") is self else None,
                self.finish,  # last: interrupted before here, it all runs again
            ]
        )

    def finish(self) -> None:
        """Done: drop the references that make a cycle (hook and watch), so that what the
        measurement saved (buffer copies, RNG states) is freed now, not at the next GC."""
        self.done = True
        self.step_hook = self.watch = None


class _ExitDescriptor:
    """``__exit__`` of a :class:`RestoringContext`: the restorer's own ``exit``, watched.

    The ``with`` statement looks ``__exit__`` up on entry and holds the returned callable until
    it has called it. Should an interrupt arrive at the very start of that call — before any
    line of ``exit`` ran, a moment no ``try`` can cover — the statement drops the callable
    while the exception unwinds, and a weak-reference callback on it restores instead. After a
    normal exit the callback finds the restore done and does nothing.
    """

    def __get__(self, cm: Any, owner: Any = None) -> Any:
        if cm is None:  # ``type(cm).__exit__`` (contextlib.ExitStack): a plain function
            return _class_exit
        restorer = cm._restorer
        exit = restorer.exit
        restorer.watch = weakref.ref(exit, lambda _: restorer.restore())
        return exit


def _class_exit(cm: Any, *exc: object) -> Any:
    return cm._restorer.exit(*exc)


class RestoringContext:
    """A context manager whose ``_restorer`` has ``enter()`` and an idempotent ``restore()``
    that survives interrupts (:func:`run_all`): entering restores if interrupted half-way, and
    exiting restores even if an interrupt keeps ``__exit__`` from starting."""

    _restorer: Any
    __exit__ = _ExitDescriptor()

    def __enter__(self) -> Any:
        try:
            return self._restorer.enter()  # inside the try: an interrupt even at its return restores
        except BaseException:
            self._restorer.restore()
            raise


class preserved_training_state(RestoringContext):  # noqa: N801 - used like a function
    """Restore RNG streams, grad mode and the buffers of every module run inside the block.

    ``with preserved_training_state() as rng:`` yields the :class:`RNGSnapshot` taken on
    entry, so that a caller evaluating the same loss several times can replay identical dropout
    masks with ``rng.restore()``.

    Raises:
        RuntimeError: on entry, when another thread is measuring; on exit, when another thread
            ran modules during the measurement (see the module docstring).
    """

    def __init__(self) -> None:
        self._restorer = _Measurement()


class _GradOff:
    def __init__(self) -> None:
        self.previous: bool | None = None
        self.watch: Any = None
        self.done = False

    def enter(self) -> None:
        self.previous = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def restore(self) -> None:
        if not self.done:
            run_all(
                [
                    lambda: torch.set_grad_enabled(self.previous) if self.previous is not None else None,
                    self.finish,
                ]
            )

    def finish(self) -> None:
        self.done = True
        self.watch = None  # the weak reference's callback refers back to this object

    def exit(self, *exc: object) -> None:
        self.restore()


class grad_disabled(RestoringContext):  # noqa: N801 - a context manager like torch.no_grad
    """``torch.no_grad()`` whose exit restores grad mode even when interrupted."""

    def __init__(self) -> None:
        self._restorer = _GradOff()


class _ScaledLR:
    """The restorer of :class:`scaled_lr`: the lrs it saved, put back idempotently."""

    def __init__(self, groups: Sequence[dict[str, Any]], scale: Sequence[float]) -> None:
        self.groups = groups
        self.scale = scale
        self.saved: list[Any] = []
        self.watch: Any = None
        self.done = False

    def enter(self) -> None:
        saved = self.saved
        for group in self.groups:  # every lr saved before any is changed
            saved.append(group["lr"])
        for group, lr, f in zip(self.groups, saved, self.scale):
            if f != 1.0:
                group["lr"] = lr.mul(f) if isinstance(lr, torch.Tensor) else lr * f

    def put_back(self) -> None:
        for group, lr in zip(self.groups, self.saved):
            group["lr"] = lr  # the very object the scheduler left there

    def restore(self) -> None:
        if not self.done:
            run_all([self.put_back, self.finish])

    def finish(self) -> None:
        self.done = True
        self.watch = None  # the weak reference's callback refers back to this object

    def exit(self, *exc: object) -> None:
        self.restore()


class scaled_lr(RestoringContext):  # noqa: N801 - a context manager used like a function
    """Within the block each ``groups[i]["lr"]`` is multiplied by ``scale[i]`` (the guard's
    factors); on exit the saved values are put back, even when interrupts arrive during the
    restore (see the module docstring). A tensor lr is scaled out of place, so the scheduler's
    tensor itself is never written.

    >>> groups = [{"lr": 0.5}, {"lr": 0.25}]
    >>> with scaled_lr(groups, [0.1, 1.0]):
    ...     [g["lr"] for g in groups]
    [0.05, 0.25]
    >>> [g["lr"] for g in groups]
    [0.5, 0.25]
    """

    def __init__(self, groups: Sequence[dict[str, Any]], scale: Sequence[float]) -> None:
        self._restorer = _ScaledLR(groups, scale)


class _Overwrite:
    """The restorer of :class:`overwritten`: ``write()`` on entry, the originals copied back."""

    def __init__(self, tensors: Sequence[torch.Tensor], originals: Sequence[torch.Tensor], write: Any) -> None:
        self.tensors, self.originals, self.write = tensors, originals, write
        self.watch: Any = None
        self.done = False

    def enter(self) -> None:
        self.write()

    def put_back(self) -> None:
        for t, t0 in zip(self.tensors, self.originals):
            t.detach().copy_(t0)  # detached: no grad mode to switch (and to leave switched)

    def restore(self) -> None:
        if not self.done:
            run_all([self.put_back, self.finish])

    def finish(self) -> None:
        self.done = True
        self.watch = None  # the weak reference's callback refers back to this object

    def exit(self, *exc: object) -> None:
        self.restore()


class overwritten(RestoringContext):  # noqa: N801 - a context manager used like a function
    """Within the block ``write()`` has overwritten ``tensors`` in place; on exit each is copied
    back from ``originals`` (snapshots of the same shapes), bit for bit, even when interrupts
    arrive during the write or the copy back (see the module docstring). The ``"fd"`` backend
    perturbs the parameters this way.

    >>> w = torch.zeros(2)
    >>> with overwritten([w], [w.clone()], lambda: w.add_(1.0)):
    ...     w.tolist()
    [1.0, 1.0]
    >>> w.tolist()
    [0.0, 0.0]
    """

    def __init__(self, tensors: Sequence[torch.Tensor], originals: Sequence[torch.Tensor], write: Any) -> None:
        self._restorer = _Overwrite(tensors, originals, write)


class _GradsAside:
    """The restorer of :class:`grads_aside`: every ``.grad`` set aside on entry, put back."""

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = params
        self.saved = [p.grad for p in params]
        self.watch: Any = None
        self.done = False

    def enter(self) -> None:
        for p in self.params:
            p.grad = None

    def put_back(self) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g

    def restore(self) -> None:
        if not self.done:
            run_all([self.put_back, self.finish])

    def finish(self) -> None:
        self.done = True
        self.watch = None

    def exit(self, *exc: object) -> None:
        self.restore()


class grads_aside(RestoringContext):  # noqa: N801 - a context manager used like a function
    """Within the block every ``p.grad`` of ``params`` is None (a ``backward()`` there fills
    them afresh); on exit the tensors that were there are put back, even when interrupted.

    >>> w = torch.ones(1, requires_grad=True); w.grad = torch.full((1,), 7.0)
    >>> with grads_aside([w]):
    ...     w.grad is None
    True
    >>> w.grad.item()
    7.0
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self._restorer = _GradsAside(params)
