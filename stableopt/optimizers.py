"""Drop-in ``torch.optim`` subclasses that can measure their own edge of stability.

Each class is the torch optimizer of the same name plus :class:`StabilityMixin`; the update maths
is never rewritten, so with no measurement taken ``step()`` is torch's step bit for bit and
``state_dict()`` is interchangeable with the torch class in both directions.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import _checkpoint
from . import preconditioner as _pre
from . import thresholds as _thr
from .guard import LRGuard
from .sharpness import SharpnessGroup, SharpnessReport, estimate_sharpness

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "StabilityMixin"]

PreconditionerFn = Callable[[Tensor, Mapping[str, Any], Mapping[str, Any]], Tensor]

#: Seed of the private generator that draws cold Lanczos start vectors: measurements are
#: reproducible and never touch the global RNG.
START_VECTOR_SEED = 20220729  # arXiv:2207.14484 submission date


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class StabilityMixin:
    """Adds ``preconditioner()``, ``stability_threshold()`` and ``sharpness()`` to an optimizer.

    Subclasses name their preconditioner function and implement :meth:`_group_threshold` and
    :meth:`_coupled_weight_decay` from the table in SCIENCE.md.
    """

    _preconditioner_fn: PreconditionerFn
    param_groups: list[dict[str, Any]]
    state: Any

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        torch_cls = next(c for c in cls.__mro__ if c.__module__.startswith("torch.optim"))
        base_step = torch_cls.step
        while getattr(base_step, "hooked", False):  # torch's hook-running wrapper, see below
            base_step = base_step.__wrapped__
        cls._torch_step = base_step

        def __init__(self: StabilityMixin, *args: Any, guard: bool | LRGuard | None = None, **kw: Any) -> None:
            torch_cls.__init__(self, *args, **kw)
            self._stableopt_init()
            self._stableopt_set_guard(guard)

        # torch's signature plus one keyword-only ``guard`` (off by default)
        signature = inspect.signature(torch_cls.__init__)
        guard_param = inspect.Parameter(
            "guard", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=bool | LRGuard | None
        )
        __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*signature.parameters.values(), guard_param]
        )
        __init__.__doc__ = (
            f"Same arguments and defaults as :class:`torch.optim.{torch_cls.__name__}`, plus "
            "``guard``: ``True`` or a :class:`stableopt.LRGuard` scales the lr when the measured "
            "edge ratio runs above the edge (off by default; see :mod:`stableopt.guard`)."
        )
        __init__.__qualname__ = f"{cls.__name__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign]

    # -- bookkeeping -------------------------------------------------------------------------
    def _stableopt_init(self) -> None:
        self._stableopt_step = 0
        self._stableopt_measurements = 0
        self._stableopt_warm: dict[str, Tensor] = {}
        #: per-group multiplier applied to ``group["lr"]`` inside ``step()`` only (the guard's)
        self._stableopt_lr_scale: list[float] | None = None
        self._stableopt_measurement_hooks: OrderedDict[int, Callable[[Any, SharpnessReport], None]] = OrderedDict()
        #: named components (history, guard, ...) whose ``state_dict()``/``load_state_dict()``
        #: travel inside the optimizer's state dict under the "stableopt" key
        self._stableopt_components: dict[str, Any] = {}
        from .history import History
        from .monitor import MonitorSet

        self._stableopt_history = History(self)
        self.register_measurement_hook(self._stableopt_history.record)
        self._stableopt_components["history"] = self._stableopt_history
        self._stableopt_components["monitors"] = MonitorSet(self)

    #: the :class:`~stableopt.LRGuard` attached by ``guard=``, or None
    guard: LRGuard | None = None

    def _stableopt_set_guard(self, guard: bool | LRGuard | None) -> None:
        if guard is None or guard is False:
            return
        if guard is True:
            guard = LRGuard()
        elif not isinstance(guard, LRGuard):
            raise TypeError(
                f"guard must be None, a bool or a stableopt.LRGuard, got {type(guard).__name__}; "
                "e.g. guard=True or guard=stableopt.LRGuard(trigger=1.5)"
            )
        self.guard = guard.bind(self)

    def step(self, closure: Callable[[], float] | None = None) -> Any:  # type: ignore[override]
        """torch's ``step()``, with any lr scale (the guard's) applied to this step only.

        torch wraps ``cls.step`` once with the code that runs step pre/post hooks; this method is
        that ``cls.step`` and calls torch's *unwrapped* step, so hooks run exactly once, around
        the whole step, and see ``group["lr"]`` as the scheduler left it.
        """
        scale = self._stableopt_lr_scale
        if scale is None:
            loss = self._torch_step(closure)
        else:
            saved = [group["lr"] for group in self.param_groups]
            try:
                for group, lr, f in zip(self.param_groups, saved, scale):
                    if f != 1.0:
                        group["lr"] = lr * f if not isinstance(lr, Tensor) else lr.mul(f)
                loss = self._torch_step(closure)
            finally:
                for group, lr in zip(self.param_groups, saved):
                    group["lr"] = lr
        self._stableopt_step += 1
        return loss

    def effective_lr(self) -> list[float]:
        """The learning rate each param group's ``step()`` really uses (scheduler × guard)."""
        scale = list(self._stableopt_lr_scale or [])
        scale += [1.0] * (len(self.param_groups) - len(scale))  # groups added after the guard acted
        return [_float(group["lr"]) * f for group, f in zip(self.param_groups, scale)]

    def register_measurement_hook(self, hook: Callable[[Any, SharpnessReport], None]) -> RemovableHandle:
        """Call ``hook(optimizer, report)`` after every ``sharpness()`` measurement.

        Monitors, the history and the guard listen here. Returns a handle with ``.remove()``.
        """
        handle = RemovableHandle(self._stableopt_measurement_hooks)
        self._stableopt_measurement_hooks[handle.id] = hook
        return handle

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus a ``"stableopt"`` entry (step count, warm-start vectors and
        the components: history, monitors, guard) of tensors and plain values only, a pure
        function of the training state. torch's ``load_state_dict`` ignores the extra entry, so
        the dict still loads into the torch class."""
        sd = super().state_dict()  # type: ignore[misc]
        sd["stableopt"] = _checkpoint.state_entry(self)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a stableopt or a plain torch state dict (then the step count comes from
        torch's per-parameter ``step`` where there is one, and there is no warm start).

        All or nothing: the ``"stableopt"`` entry is checked whole before anything changes.

        Raises:
            ValueError: a tampered or malformed ``"stableopt"`` entry (the message names the
                field), or torch's own checks.
        """
        _checkpoint.load(self, state_dict, super().load_state_dict)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        # pickle / copy.deepcopy keep what the state dict keeps, and the guard (_checkpoint)
        return _checkpoint.getstate(self, super().__getstate__())  # type: ignore[misc]

    def __setstate__(self, state: dict[str, Any]) -> None:
        _checkpoint.setstate(self, state, super().__setstate__)  # type: ignore[misc]

    def _step_from_state(self) -> int:
        steps = [_float(s["step"]) for s in self.state.values() if "step" in s]
        return int(max(steps)) if steps else 0

    @property
    def steps_taken(self) -> int:
        """Number of ``step()`` calls so far (restored by ``load_state_dict``)."""
        return self._stableopt_step

    # -- monitoring (stableopt.monitor, stableopt.history, stableopt.report) --------------------
    @property
    def history(self) -> Any:
        """Every measurement so far, manual or scheduled: a :class:`stableopt.History`."""
        return self._stableopt_history

    def monitor(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        every: int | None = None,
        batches: Iterable[Any] | None = None,
        raw: bool | None = None,
        k: int | None = None,
        tol: float | None = None,
        max_iters: int | None = None,
        live: bool = False,
        secant: bool | None = None,
        console: Any = None,
    ) -> Any:
        """Measure ``sharpness(loss_fn, ...)`` after every ``every``-th ``step()``.

        Uses a torch step post hook; measurements land in :attr:`history`. ``every``, ``raw``,
        ``k`` and ``tol`` default to 1, False, 1 and 1e-3, or, right after ``load_state_dict``
        of a checkpoint that had monitors, to that checkpoint's schedule. ``live=True`` shows a
        rich panel on a terminal (plain lines otherwise, to ``console`` if given);
        ``secant=True`` records the per-step secant estimate (:mod:`stableopt.monitor`).

        Returns:
            A :class:`stableopt.monitor.Monitor` handle with ``.remove()``.
        """
        return self._stableopt_components["monitors"].add(
            loss_fn, every=every, batches=batches, raw=raw, k=k, tol=tol, max_iters=max_iters,
            live=live, secant=secant, console=console,
        )

    def report(self, console: Any = None) -> None:
        """Print the rich report panel of :attr:`history` (see :func:`stableopt.render_report`)."""
        from .report import print_report

        print_report(self._stableopt_history, console=console)

    # -- the rule ----------------------------------------------------------------------------
    def _group_threshold(self, group: Mapping[str, Any], lr: float) -> float:
        """The threshold of ``group`` when its step uses learning rate ``lr``."""
        raise NotImplementedError

    def _coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        return _float(group.get("weight_decay", 0.0))

    def preconditioner(self) -> list[Tensor]:
        """The diagonal P that the last step divided the gradient by, one tensor per parameter.

        In param-group order. A parameter the optimizer has never updated (no gradient yet)
        gets ``inf`` (P⁻¹ = 0: it does not move).

        Raises:
            RuntimeError: before the first ``step()``.
        """
        if self._stableopt_step == 0 and not any(self.state.values()):
            raise RuntimeError(
                f"{type(self).__name__}.preconditioner() is defined by the optimizer state of the "
                "last step; call step() first"
            )
        return [
            type(self)._preconditioner_fn(p, self.state.get(p, {}), group)
            for group in self.param_groups
            for p in group["params"]
        ]

    def stability_threshold(self) -> list[float]:
        """The stability threshold on λ_max(P⁻¹H) of each param group (SCIENCE.md table).

        >>> opt = Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        >>> [round(t) for t in opt.stability_threshold()]
        [38000]
        """
        return [self._group_threshold(group, lr) for group, lr in zip(self.param_groups, self.effective_lr())]

    def _sharpness_groups(self) -> list[SharpnessGroup]:
        if self._stableopt_step == 0 and self._needs_state:
            raise RuntimeError(
                f"{type(self).__name__}.sharpness() pairs the Hessian with the preconditioner of "
                "the last step; call step() first"
            )
        groups = []
        for group, lr in zip(self.param_groups, self.effective_lr()):
            params = [p for p in group["params"] if p.requires_grad]
            groups.append(
                SharpnessGroup(
                    params=params,
                    preconditioner=[
                        type(self)._preconditioner_fn(p, self.state.get(p, {}), group) for p in params
                    ],
                    threshold=self._group_threshold(group, lr),
                    sign=-1.0 if group.get("maximize", False) else 1.0,
                    weight_decay=self._coupled_weight_decay(group),
                )
            )
        return groups

    _needs_state = True

    def sharpness(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        batches: Iterable[Any] | None = None,
        raw: bool = False,
        k: int = 1,
        tol: float = 1e-3,
        max_iters: int | None = None,
    ) -> SharpnessReport:
        """Measure λ_max(P⁻¹H), the edge ratio and optionally λ_max(H) at the current parameters.

        Lanczos on P^{-1/2}·H·P^{-1/2} with Hessian-vector products by double backward through a
        reused gradient graph, warm-started from the previous measurement's top Ritz vectors.
        Parameters, ``.grad``, optimizer state, RNG streams and module buffers are left exactly
        as they were.

        Args:
            loss_fn: ``loss_fn()`` returns the scalar loss through the model whose parameters
                this optimizer holds; with ``batches``, ``loss_fn(batch)`` per batch.
            batches: re-iterable of batches; the Hessian is the batch-size-weighted mean.
            raw: also measure λ_max(H) (one more Lanczos solve).
            k: how many top eigenvalues of P⁻¹H to report.
            tol: relative accuracy of each reported eigenvalue. The first (cold) measurement
                stops when each Ritz value θ has relative residual ‖Ax − θx‖/|θ| ≤ tol, which
                guarantees *an* eigenvalue within tol·|θ| of it (in practice the error is far
                smaller, ~1e-5 at the default); warm-started ones stop when the quadratic
                estimate ‖r‖²/gap is ≤ tol·|θ| and the residual ≤ 2·tol·|θ| (benchmarked errors
                ≤ 3e-5 at the default). Being the top eigenvalue relies on the Krylov space
                having found it (see :mod:`stableopt.eigen`).
            max_iters: Lanczos steps per solve (default min(#parameters, 100)).

        Returns:
            A :class:`~stableopt.SharpnessReport`.

        Raises:
            RuntimeError: an adaptive optimizer before its first ``step()``.
            TypeError / ValueError: bad ``loss_fn`` results or arguments (the message says which).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
            raise ValueError(f"max_iters must be None or a positive integer, got {max_iters!r}")
        if not isinstance(raw, bool):
            raise TypeError(f"raw must be a bool, got {type(raw).__name__}")
        groups = self._sharpness_groups()
        generator = torch.Generator().manual_seed(START_VECTOR_SEED + self._stableopt_measurements)
        self._stableopt_measurements += 1
        report = estimate_sharpness(
            loss_fn, groups, batches=batches, raw=raw, k=k, tol=tol, max_iters=max_iters,
            step=self._stableopt_step, generator=generator, warm=self._stableopt_warm,
        )
        for hook in list(self._stableopt_measurement_hooks.values()):
            hook(self, report)
        return report


class Adam(StabilityMixin, torch.optim.Adam):
    """``torch.optim.Adam`` that knows its edge: P = √v̂ + ε, threshold (2 + 2β1)/((1 − β1)η).

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = Adam(model.parameters(), lr=1e-2)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss_fn = lambda: ((model(x) - y) ** 2).mean()
        >>> loss_fn().backward(); opt.step()
        >>> report = opt.sharpness(loss_fn)
        >>> round(report.threshold, 6)
        3800.0
    """

    _preconditioner_fn = staticmethod(_pre.adam_preconditioner)

    def _decoupled(self, group: Mapping[str, Any]) -> bool:
        return bool(group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW)))

    def _group_threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.adam_threshold(
            lr, _float(group["betas"][0]),
            weight_decay=_float(group["weight_decay"]), decoupled=self._decoupled(group),
        )

    def _coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        return 0.0 if self._decoupled(group) else _float(group["weight_decay"])


class AdamW(Adam, torch.optim.AdamW):
    """``torch.optim.AdamW`` that knows its edge: threshold (1 + β1)(2 − ηλ)/((1 − β1)η)."""


class RMSprop(StabilityMixin, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` that knows its edge: P = √v + ε, threshold 2/η ((2 + 2μ)/η)."""

    _preconditioner_fn = staticmethod(_pre.rmsprop_preconditioner)

    def _group_threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.rmsprop_threshold(lr, _float(group["momentum"]))


class SGD(StabilityMixin, torch.optim.SGD):
    """``torch.optim.SGD`` that knows its edge: P = I, threshold 2/η or its momentum variant.

    Unlike the adaptive optimizers, ``sharpness()`` works before the first step (P = I).
    """

    _preconditioner_fn = staticmethod(_pre.identity_preconditioner)
    _needs_state = False

    def _group_threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.sgd_threshold(
            lr, _float(group["momentum"]), _float(group["dampening"]),
            bool(group["nesterov"]),
        )
