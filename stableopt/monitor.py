"""Scheduled measurements during training: ``opt.monitor(loss_fn, every=N)``.

A monitor is a torch step post hook (``optimizer.register_step_post_hook``): after every
``step()`` whose step count ``opt.steps_taken`` is a multiple of ``every`` it calls
``opt.sharpness(...)``, which records the measurement in ``opt.history``. Steps in between cost
one integer modulo. With ``log=fn`` the monitor calls ``fn(metrics, step)`` after each of its
measurements (:mod:`stableopt.loggers`: TensorBoard, W&B). Several monitors coexist (a cheap frequent one and an occasional one with
``raw=True``); each returns a :class:`Monitor` handle whose ``remove()`` detaches it. Because the
schedule is the optimizer's own step count, a run resumed from ``opt.state_dict()`` keeps it.

The secant estimate
-------------------
With ``secant=True`` the monitor also records, every step, the curvature along the update the
optimizer took, from gradients the training loop computes anyway (:mod:`stableopt.secant`).

Tracking
--------
With ``budget=b`` a monitor does not solve: after each of its steps it spends at most ``b``
Hessian-vector products continuing one iteration across steps (:mod:`stableopt.tracking`) and
records the estimate and its residual bound in the history's tracking table. Those estimates
are not measurements: they do not reach measurement hooks (the guard acts on full
measurements only).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from . import _hooks
from ._live import ABOVE as ABOVE  # re-exported: the zone bounds were defined here
from ._live import BELOW as BELOW
from ._live import LiveView as _LiveView
from ._live import plain_line, zone
from .backends import check_backend
from .directional import DIRECTIONS, update_tracker
from .secant import SecantTracker

__all__ = ["Monitor", "MonitorSet", "SecantTracker", "plain_line", "zone"]


class Monitor:
    """Handle of one scheduled measurement; ``remove()`` detaches it (also on ``with`` exit).

    Attributes:
        every, raw, k, tol, secant, live: the schedule and its options.
        log: ``fn(metrics, step)`` called after each measurement (:mod:`stableopt.loggers`), or None.
        directional, directional_every: the direction of the directional measurement
            (``"update"``, ``"gradient"`` or None) and its schedule.
        budget: with tracking, the most Hessian-vector products per step (else None).
        id: the value of the history's ``monitor`` column for its measurements.
        last: the latest :class:`~stableopt.SharpnessReport` it took (None before).
        fired: the step counts it measured at.
    """

    def __init__(
        self,
        owner: MonitorSet,
        monitor_id: int,
        loss_fn: Callable[..., Tensor],
        *,
        every: int,
        batches: Iterable[Any] | None,
        raw: bool,
        k: int,
        tol: float,
        max_iters: int | None,
        live: bool,
        secant: bool,
        hvp: str = "auto",
        log: Callable[[dict[str, float], int], Any] | None = None,
        directional: str | None = None,
        directional_every: int = 1,
        budget: int | None = None,
    ) -> None:
        self._owner = owner
        self.budget = budget
        self._tracker: Any = None
        self.id = monitor_id
        self.loss_fn = loss_fn
        self.every = every
        self.batches = batches
        self.raw = raw
        self.k = k
        self.tol = tol
        self.max_iters = max_iters
        self.live = live
        self.secant = secant
        self.hvp = hvp
        self.log = log
        self.directional = directional
        self.directional_every = directional_every
        self.last: Any = None
        self.fired: list[int] = []
        self._attached = True
        owner._attach(self)
        if directional == "update":  # θ_{t−1} is kept only while a monitor needs it
            self._tracking = update_tracker(owner.optimizer).acquire()

    @property
    def active(self) -> bool:
        return self.id in self._owner.monitors

    def schedule(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "every": self.every,
            "raw": self.raw,
            "k": self.k,
            "tol": self.tol,
            "secant": self.secant,
            "live": self.live,
            "hvp": self.hvp,
            "directional": self.directional,
            "directional_every": self.directional_every,
            "budget": self.budget,
        }

    def measure_directional(self) -> Any:
        """Measure the directional sharpness now (recorded in the history's directional table)."""
        return self._owner.optimizer.directional_sharpness(
            self.loss_fn, self.directional, batches=self.batches, hvp=self.hvp
        )

    def measure(self) -> Any:
        """Measure now (what the schedule does after every ``every``-th step)."""
        opt = self._owner.optimizer
        history = opt.history
        view = self._owner.view if self.live else None
        if view is not None:
            view.measuring(opt.steps_taken)
        previous, history.source = history.source, self.id
        try:
            if self.budget is not None:
                return self._track(opt, view)
            report = opt.sharpness(
                self.loss_fn,
                batches=self.batches,
                raw=self.raw,
                k=self.k,
                tol=self.tol,
                max_iters=self.max_iters,
                hvp=self.hvp,
            )
        finally:
            history.source = previous
        self.last = report
        self.fired.append(report.step)
        if view is not None:
            view.measured(report)
        if self.log is not None:  # after the guard has reacted, so its factors are current
            from .loggers import metrics

            self.log(metrics(report, opt.guard), report.step)
        return report

    def _track(self, opt: Any, view: Any) -> Any:
        from .tracking import TRACK_SEED, Tracker, track

        if self._tracker is None:
            self._tracker = Tracker(self.budget, generator=torch.Generator().manual_seed(TRACK_SEED + self.id))  # type: ignore[arg-type]
        report = track(
            opt, self.loss_fn, self._tracker, batches=self.batches, hvp=self.hvp, tol=self.tol, key=f"track:{self.id}"
        )
        self.last = report
        self.fired.append(report.step)
        if view is not None:
            view.measured(report)
        if self.log is not None:
            from .loggers import metrics

            self.log(metrics(report, opt.guard), report.step)
        return report

    def remove(self) -> None:
        """Stop measuring (idempotent; also from inside a measurement: its ``loss_fn`` or a
        measurement hook)."""
        if not self._attached:
            return
        self._attached = False
        if self.directional == "update":
            self._tracking.remove()
        self._owner._removed(self)

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"Monitor(id={self.id}, every={self.every}, raw={self.raw}, k={self.k}, secant={self.secant}, {state})"


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class MonitorSet:
    """The optimizer's monitors; its state dict is their schedules (a resumed run's
    ``opt.monitor(loss_fn)`` with no ``every``/``raw``/``k``/``tol`` takes them back)."""

    DEFAULTS = {"every": 1, "raw": False, "k": 1, "tol": 1e-3}

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self.monitors: dict[int, Monitor] = {}
        self.restored: list[dict[str, Any]] = []
        self._next_id = 0
        self._view: _LiveView | None = None
        self.console: Any = None
        self._secant_users = 0
        self._secant_hook: Any = None
        self._secant: SecantTracker | None = None  # while a monitor with secant=True is active
        #: a checkpoint's secant snapshot, kept for the next tracker (monitors come back after
        #: load_state_dict), in state-dict form
        self._secant_saved: dict[str, Any] | None = None
        self._step_hook: Any = None  # one torch step post hook runs every monitor
        self._dispatching = False  # True while monitors measure inside step()

    @property
    def view(self) -> _LiveView:
        if self._view is None:
            self._view = _LiveView(self.optimizer.history, self.console)
        return self._view

    def add(
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
    ) -> Monitor:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if hvp is not None:
            check_backend(hvp)
        from .loggers import check_log_fn

        check_log_fn(log)
        given = {"every": every, "raw": raw, "k": k, "tol": tol}
        base = dict(self.DEFAULTS)
        monitor_id = self._next_id
        if all(v is None for v in given.values()) and self.restored:
            schedule = self.restored.pop(0)
            base.update({key: schedule[key] for key in self.DEFAULTS})
            if secant is None:
                secant = bool(schedule.get("secant", False))
            if hvp is None:
                hvp = str(schedule.get("hvp", "auto"))
            if directional is None and directional_every is None:
                directional, directional_every = schedule.get("directional"), schedule.get("directional_every")
            if budget is None:
                budget = schedule.get("budget")
            if schedule.get("id") not in self.monitors:
                monitor_id = int(schedule.get("id", monitor_id))
        opts: dict[str, Any] = {key: base[key] if value is None else value for key, value in given.items()}
        _check_positive_int("every", opts["every"])
        _check_positive_int("k", opts["k"])
        if not isinstance(opts["raw"], bool):
            raise TypeError(f"raw must be a bool, got {type(opts['raw']).__name__}")
        tol_value = opts["tol"]
        if isinstance(tol_value, bool) or not isinstance(tol_value, (int, float)) or not 0.0 < tol_value < 1.0:
            raise ValueError(f"tol must be a number in (0, 1), got {tol_value!r}")
        if directional is not None and directional not in DIRECTIONS:
            raise ValueError(f"directional must be one of {DIRECTIONS} or None, got {directional!r}")
        directional_every = _check_positive_int(
            "directional_every", 1 if directional_every is None else directional_every
        )
        if budget is not None:
            _check_positive_int("budget", budget)
            if opts["raw"] or opts["k"] != 1:
                raise ValueError(
                    f"a tracking monitor (budget={budget}) follows λ_max(P⁻¹H) only; raw=True and k > 1 need full measurements (a monitor without budget)"
                )
        if console is not None:
            if self._view is not None and self._view.console is not console:
                self._view.stop()
                self._view = None
            self.console = console
        monitor = Monitor(
            self,
            monitor_id,
            loss_fn,
            batches=batches,
            max_iters=max_iters,
            live=bool(live),
            secant=bool(secant),
            hvp=hvp or "auto",
            log=log,
            directional=directional,
            directional_every=directional_every,
            budget=budget,
            **opts,
        )
        self.monitors[monitor.id] = monitor
        self._next_id = max(self._next_id, monitor_id + 1)
        return monitor

    def _attach(self, monitor: Monitor) -> None:
        opt = self.optimizer
        if self._step_hook is None:
            self._step_hook = _hooks.register_step_post_hook(opt, self._after_step)
        if monitor.secant:
            self._secant_users += 1
            if self._secant_hook is None:  # one tracker however many monitors ask for it
                tracker = SecantTracker(opt)
                tracker.load_state_dict(self._secant_saved)  # a resumed run's snapshot
                self._secant, self._secant_saved = tracker, None
                self._secant_hook = _hooks.register_step_pre_hook(opt, tracker)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Run the monitors due at this step. Iterates over a copy, so that a monitor removed
        (or added) by a measurement's ``loss_fn`` or hook changes nothing mid-loop."""
        if self._dispatching:
            raise RuntimeError(
                "optimizer.step() was called inside a monitor's measurement (from its loss_fn or a "
                "measurement hook); a measurement must not train. Step in the training loop only"
            )
        step = optimizer._stableopt_step
        self._dispatching = True
        try:
            for monitor in list(self.monitors.values()):
                if monitor.active and step % monitor.every == 0:
                    monitor.measure()
                if monitor.active and monitor.directional is not None and step % monitor.directional_every == 0:
                    monitor.measure_directional()
        finally:
            self._dispatching = False

    def _removed(self, monitor: Monitor) -> None:
        self.monitors.pop(monitor.id, None)
        if monitor.secant:
            self._secant_users -= 1
            if self._secant_users == 0 and self._secant_hook is not None:
                self._secant_hook.remove()  # a pre hook: torch is not iterating those now
                self._secant_hook = self._secant = None
        # torch iterates the post hooks while monitors measure: removing ours from inside would
        # break that loop, so a dormant hook stays until a monitor is added or removed outside
        self._prune()
        if self._view is not None and not any(m.live for m in self.monitors.values()):
            self._view.stop()

    def _prune(self) -> None:
        if not self.monitors and not self._dispatching and self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    # -- the optimizer's state dict ------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        schedules = [m.schedule() for m in self.monitors.values()] + [dict(s) for s in self.restored]
        state: dict[str, Any] = {"schedules": schedules, "next_id": self._next_id}
        secant = self._secant.state_dict() if self._secant is not None else self._secant_saved
        if secant is not None:  # θ_{t−1}, g_{t−1}: the first step after a resume records too
            state["secant"] = {
                "step": secant["step"],
                "theta": [t.detach().clone() for t in secant["theta"]],
                "grad": [g.detach().clone() for g in secant["grad"]],
            }
        return state

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.prepare_load(state)()

    def prepare_load(self, state: dict[str, Any] | None) -> Callable[[], None]:
        """Check saved schedules (``ValueError`` naming the field); returns the commit."""
        if not state:
            return self.reset
        from ._checkpoint import check_monitor_state, check_secant_state

        schedules, next_id = check_monitor_state(state)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        secant = check_secant_state(state.get("secant"), params)

        def commit() -> None:
            self.restored = [s for s in schedules if s["id"] not in self.monitors]
            self._next_id = max(self._next_id, next_id)
            self._load_secant(secant)

        return commit

    def _load_secant(self, secant: dict[str, Any] | None) -> None:
        if self._secant is not None:
            self._secant.load_state_dict(secant)
        else:
            self._secant_saved = secant

    def reset(self) -> None:
        self.restored = []
        self._load_secant(None)
