"""Drop-in ``torch.optim`` subclasses that can measure their own edge of stability.

Each class is the torch optimizer of the same name plus :class:`StabilityMixin`; the update maths
is never rewritten, so with no measurement taken ``step()`` is torch's step bit for bit and
``state_dict()`` is interchangeable with the torch class in both directions.
"""

from __future__ import annotations

import inspect
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import _checkpoint
from . import directional as _directional
from . import rules as _rules
from ._state import scaled_lr as _scaled_lr
from .backends import BackendChoice
from .guard import LRGuard
from .measuring import START_VECTOR_SEED as START_VECTOR_SEED  # re-exported: it was defined here
from .measuring import MeasuringMixin
from .rules import StabilityRule
from .sharpness import SharpnessReport

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "StabilityMixin"]


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


@dataclass(frozen=True)
class _LegacyRule(StabilityRule):
    """A rule assembled from the deprecated subclass hooks ``_preconditioner_fn`` and
    ``_needs_state``; everything else comes from the rule the class inherited."""

    base: StabilityRule = field(default_factory=StabilityRule)
    fn: Any = None

    def preconditioner(self, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
        if self.fn is None:
            return self.base.preconditioner(param, state, group)
        return self.fn(param, state, group)

    def threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return self.base.threshold(group, lr)

    def coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        return self.base.coupled_weight_decay(group)

    def sign(self, group: Mapping[str, Any]) -> float:
        return self.base.sign(group)

    def transient_steps(self, group: Mapping[str, Any]) -> int:
        return self.base.transient_steps(group)

    def floor(self, group: Mapping[str, Any]) -> float:
        return self.base.floor(group)


_LEGACY_HOOKS = ("_preconditioner_fn", "_needs_state")


class StabilityMixin(MeasuringMixin):
    """Adds ``preconditioner()``, ``stability_threshold()``, ``sharpness()`` and ``measure()``
    (and ``hessian_trace()``, ``spectral_density()``, :mod:`stableopt.estimators`) to a torch
    optimizer.

    A subclass names its torch base class and its :class:`~stableopt.rules.StabilityRule`
    explicitly (nothing is guessed from the MRO)::

        class Adam(StabilityMixin, torch.optim.Adam, torch_class=torch.optim.Adam, rule=AdamRule()):
            ...

    and further subclasses (a user's ``class MyAdam(stableopt.Adam)``) inherit both.
    """

    param_groups: list[dict[str, Any]]
    state: Any
    #: the update rule's stability facts (preconditioner, threshold, decay, sign, transient)
    stability_rule: StabilityRule
    #: the ``torch.optim`` class whose ``step()`` this class runs unchanged
    torch_class: type
    #: torch_class.step without torch's hook-running wrapper (set per class)
    _torch_step: Callable[..., Any]

    def __init_subclass__(
        cls, torch_class: type | None = None, rule: StabilityRule | None = None, **kwargs: Any
    ) -> None:
        super().__init_subclass__(**kwargs)
        if rule is not None:
            if not isinstance(rule, StabilityRule):
                raise TypeError(f"rule must be a stableopt.rules.StabilityRule, got {type(rule).__name__}")
            cls.stability_rule = rule
        elif any(h in cls.__dict__ for h in _LEGACY_HOOKS):
            warnings.warn(
                f"{cls.__name__}: overriding _preconditioner_fn/_needs_state is deprecated; pass "
                "rule=stableopt.rules.StabilityRule subclass instance in the class statement "
                f"(class {cls.__name__}(..., rule=MyRule()))",
                DeprecationWarning,
                stacklevel=2,
            )
            base = getattr(cls, "stability_rule", StabilityRule())
            cls.stability_rule = _LegacyRule(
                needs_state=bool(getattr(cls, "_needs_state", base.needs_state)),
                base=base,
                fn=cls.__dict__["_preconditioner_fn"].__func__
                if isinstance(cls.__dict__.get("_preconditioner_fn"), staticmethod)
                else getattr(cls, "_preconditioner_fn", None),
            )
        if torch_class is None:
            if not hasattr(cls, "torch_class"):
                raise TypeError(
                    f"{cls.__name__} mixes in StabilityMixin without naming its torch optimizer: "
                    f"class {cls.__name__}(StabilityMixin, torch.optim.X, torch_class=torch.optim.X, rule=...)"
                )
            return  # a subclass of a stableopt optimizer: same torch class, same __init__
        if not (
            isinstance(torch_class, type)
            and issubclass(torch_class, torch.optim.Optimizer)
            and issubclass(cls, torch_class)
        ):
            raise TypeError(
                f"torch_class must be a torch.optim.Optimizer base class of {cls.__name__}, got {torch_class!r}"
            )
        if not hasattr(cls, "stability_rule"):
            raise TypeError(f"{cls.__name__}: pass rule=... (a stableopt.rules.StabilityRule) with torch_class")
        cls.torch_class = torch_class
        base_step = torch_class.step
        while getattr(base_step, "hooked", False):  # torch's hook-running wrapper, see step()
            base_step = base_step.__wrapped__  # type: ignore[attr-defined]
        cls._torch_step = base_step

        def __init__(self: StabilityMixin, *args: Any, guard: bool | LRGuard | None = None, **kw: Any) -> None:
            torch_class.__init__(self, *args, **kw)  # type: ignore[arg-type]
            self._stableopt_init()
            self._stableopt_set_guard(guard)

        # torch's signature plus one keyword-only ``guard`` (off by default)
        signature = inspect.signature(torch_class.__init__)
        guard_param = inspect.Parameter(
            "guard", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=bool | LRGuard | None
        )
        __init__.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*signature.parameters.values(), guard_param]
        )
        __init__.__doc__ = (
            f"Same arguments and defaults as :class:`torch.optim.{torch_class.__name__}`, plus "
            "``guard``: ``True`` or a :class:`stableopt.LRGuard` scales the lr when the measured "
            "edge ratio runs above the edge (off by default; see :mod:`stableopt.guard`)."
        )
        __init__.__qualname__ = f"{cls.__name__}.__init__"
        cls.__init__ = __init__  # type: ignore[method-assign,assignment]

    # -- bookkeeping -------------------------------------------------------------------------
    def _stableopt_init(self) -> None:
        self._stableopt_step = 0
        self._stableopt_measurements = 0
        self._stableopt_warm: dict[str, Tensor] = {}
        #: what hvp="auto" decided for this optimizer's model (see stableopt.backends)
        self._stableopt_backend = BackendChoice()
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
        self._stableopt_directional_hooks: OrderedDict[int, Callable[[Any, Any], None]] = OrderedDict()
        self.register_directional_hook(_directional.record_directional)
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

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """torch's ``step()``, with any lr scale (the guard's) applied to this step only.

        torch wraps ``cls.step`` once with the code that runs step pre/post hooks; this method is
        that ``cls.step`` and calls torch's *unwrapped* step, so hooks run exactly once, around
        the whole step, and see ``group["lr"]`` as the scheduler left it. The scheduler's values
        come back even when a ``KeyboardInterrupt`` arrives during the step or during their
        restore (:class:`stableopt._state.scaled_lr`).
        """
        scale = self._stableopt_lr_scale
        if scale is None:
            loss = self._torch_step(closure)
        elif not torch.compiler.is_compiling():
            with _scaled_lr(self.param_groups, scale):  # restored even if interrupted twice
                loss = self._torch_step(closure)
        else:  # dynamo traces a plain try/finally, not the interrupt-safe context manager
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
        if self.guard is not None:  # groups added after a cut get the cut (LRGuard.factors)
            scale = self.guard.factors
        else:
            scale = list(self._stableopt_lr_scale or [])
            scale += [1.0] * (len(self.param_groups) - len(scale))
        return [_float(group["lr"]) * f for group, f in zip(self.param_groups, scale)]

    def register_measurement_hook(self, hook: Callable[[Any, SharpnessReport], None]) -> RemovableHandle:
        """Call ``hook(optimizer, report)`` after every ``sharpness()`` measurement.

        Monitors, the history and the guard listen here. Returns a handle with ``.remove()``.
        """
        handle = RemovableHandle(self._stableopt_measurement_hooks)
        self._stableopt_measurement_hooks[handle.id] = hook
        return handle

    def register_directional_hook(self, hook: Callable[[Any, Any], None]) -> RemovableHandle:
        """Call ``hook(optimizer, report)`` after every ``directional_sharpness()`` measurement
        (the history and a guard with ``signal="directional"`` listen here). Returns a handle."""
        handle = RemovableHandle(self._stableopt_directional_hooks)
        self._stableopt_directional_hooks[handle.id] = hook
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
        hvp: str | None = None,
        log: Callable[[dict[str, float], int], Any] | None = None,
        directional: str | None = None,
        directional_every: int | None = None,
        budget: int | None = None,
    ) -> Any:
        """Measure ``sharpness(loss_fn, ...)`` after every ``every``-th ``step()``.

        Uses a torch step post hook; measurements land in :attr:`history`. ``every``, ``raw``,
        ``k`` and ``tol`` default to 1, False, 1 and 1e-3, or, right after ``load_state_dict``
        of a checkpoint that had monitors, to that checkpoint's schedule. ``live=True`` shows a
        rich panel on a terminal (plain lines otherwise, to ``console`` if given);
        ``secant=True`` records the per-step secant estimate (:mod:`stableopt.monitor`);
        ``hvp`` is the Hessian-vector-product backend of its measurements (default
        ``"auto"`` or the checkpoint's, see :meth:`sharpness`).
        ``log=fn`` calls ``fn(metrics, step)`` after each measurement (:mod:`stableopt.loggers`).
        ``directional="update"`` or ``"gradient"`` also measures :meth:`directional_sharpness`
        (one product) after every ``directional_every``-th step (default 1), into the history's
        ``directional`` table.
        ``budget=b`` makes it a tracking monitor: instead of solving, it
        spends at most ``b`` Hessian-vector products per measured step continuing one warm
        iteration across steps and records the estimate and its residual bound in
        ``history.tracking()`` (:mod:`stableopt.tracking`; the trade against full
        measurements is in benchmarks/README.md).

        Returns:
            A :class:`stableopt.monitor.Monitor` handle with ``.remove()``.
        """
        return self._stableopt_components["monitors"].add(
            loss_fn,
            every=every,
            batches=batches,
            raw=raw,
            k=k,
            tol=tol,
            max_iters=max_iters,
            live=live,
            secant=secant,
            console=console,
            hvp=hvp,
            log=log,
            directional=directional,
            directional_every=directional_every,
            budget=budget,
        )

    def report(self, console: Any = None) -> None:
        """Print the rich report panel of :attr:`history` (see :func:`stableopt.render_report`)."""
        from .report import print_report

        print_report(self._stableopt_history, console=console)


class Adam(StabilityMixin, torch.optim.Adam, torch_class=torch.optim.Adam, rule=_rules.AdamRule()):
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


class AdamW(Adam, torch.optim.AdamW, torch_class=torch.optim.AdamW, rule=_rules.AdamRule(decoupled=True)):
    """``torch.optim.AdamW`` that knows its edge: threshold (1 + β1)(2 − ηλ)/((1 − β1)η)."""


class RMSprop(StabilityMixin, torch.optim.RMSprop, torch_class=torch.optim.RMSprop, rule=_rules.RMSpropRule()):
    """``torch.optim.RMSprop`` that knows its edge: P = √v + ε, threshold 2/η ((2 + 2μ)/η)."""


class SGD(StabilityMixin, torch.optim.SGD, torch_class=torch.optim.SGD, rule=_rules.SGDRule()):
    """``torch.optim.SGD`` that knows its edge: P = I, threshold 2/η or its momentum variant.

    Unlike the adaptive optimizers, ``sharpness()`` works before the first step (P = I).
    """
