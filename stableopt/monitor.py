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
With ``secant=True`` the monitor also records, for every step, the curvature along the update
the optimizer actually took, from gradients the training loop computes anyway:

    s_t = Δθᵀ(g_t − g_{t−1}) / ΔθᵀPΔθ,     Δθ = θ_t − θ_{t−1},

with P the preconditioner of the step that made Δθ (plus the sign of ``maximize`` and λ‖Δθ‖²
for coupled weight decay, as in the measured Hessian). ``secant_ratio`` divides by
Σ_g τ_g·Δθ_gᵀP_gΔθ_g instead, so that 1 is the edge. It is an *estimate*: for a full-batch loss,
Δg = H̄Δθ with H̄ the Hessian averaged along the step, so s_t is a Rayleigh quotient of P⁻¹H̄
and a lower bound on λ_max(P⁻¹H) (exact for a quadratic; near the edge the update oscillates
along the top eigenvector and the bound is tight). With mini-batches g_t and g_{t−1} come from
different batches and the difference is dominated by gradient noise: the numbers are then not
curvature and should not be read as such. Steps whose gradients are missing, sparse, computed
inside a ``step(closure)``, or not one step apart are skipped. It costs two copies of the
parameters and a few vector operations per step, so it is opt-in.

Tracking
--------
With ``budget=b`` a monitor does not solve: after each of its steps it spends at most ``b``
Hessian-vector products continuing one iteration across steps (:mod:`stableopt.tracking`) and
records the estimate and its residual bound in the history's tracking table. Those estimates
are not measurements: they do not reach measurement hooks (the guard acts on full
measurements only).
"""

from __future__ import annotations

import atexit
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ._state import grad_disabled
from .backends import check_backend
from .directional import DIRECTIONS, update_tracker

__all__ = ["Monitor", "MonitorSet", "SecantTracker", "plain_line", "zone"]

#: ratio zones: below the edge (< BELOW), at it ([BELOW, ABOVE]), above it (> ABOVE)
BELOW, ABOVE = 0.9, 1.1


def zone(ratio: float) -> str:
    """ "below", "at" or "above" the edge of stability (or "unknown" for NaN).

    >>> zone(0.5), zone(1.05), zone(1.3)
    ('below', 'at', 'above')
    """
    if not math.isfinite(ratio):
        return "unknown"
    return "below" if ratio < BELOW else ("at" if ratio <= ABOVE else "above")


def plain_line(report: Any) -> str:
    """One plain-text line for a measurement (logs without a terminal: no control codes)."""
    raw = "" if report.raw is None else f" raw={report.raw:.6g}"
    note = "" if report.converged else " NOT converged"
    return (
        f"stableopt step {report.step}: loss={report.loss:.6g} λ_max(P⁻¹H)={report.preconditioned:.6g} "
        f"threshold={report.threshold:.6g} ratio={report.ratio:.4f} ({zone(report.ratio)} the edge)"
        f"{raw} [{report.hvps} HVPs, {report.seconds:.3f} s{note}]"
    )


class SecantTracker:
    """Step pre hook that records the secant estimate (see the module docs) into the history."""

    def __init__(self, optimizer: Any) -> None:
        self.optimizer = optimizer
        self._theta: list[Tensor] | None = None
        self._grad: list[Tensor] | None = None
        self._at = -1  # steps_taken when the snapshot was taken

    def _params(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def __call__(self, optimizer: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) > 1 or kwargs.get("closure") is not None:  # gradients come from inside step()
            self._theta = self._grad = None
            return
        params = self._params()
        if any(p.grad is None or p.grad.is_sparse for p in params):
            self._theta = self._grad = None
            return
        with grad_disabled():  # grad mode comes back even if interrupted
            theta = [p.detach() for p in params]
            grads = [p.grad.detach() for p in params]  # type: ignore[union-attr]
            step = optimizer.steps_taken
            prev_theta, prev_grad = self._theta, self._grad
            if (
                prev_theta is not None
                and prev_grad is not None
                and self._at == step - 1
                and len(prev_theta) == len(theta)
                and all(a.shape == b.shape for a, b in zip(prev_theta, theta))
            ):
                self._record(optimizer, step, theta, grads, prev_theta, prev_grad)
                torch._foreach_copy_(prev_theta, theta)
                torch._foreach_copy_(prev_grad, grads)
            else:
                self._theta = [t.clone() for t in theta]
                self._grad = [g.clone() for g in grads]
            self._at = step

    def _record(
        self,
        optimizer: Any,
        step: int,
        theta: list[Tensor],
        grads: list[Tensor],
        prev_theta: list[Tensor],
        prev_grad: list[Tensor],
    ) -> None:
        dtheta = torch._foreach_sub(theta, prev_theta)
        dgrad = torch._foreach_sub(grads, prev_grad)
        precond = optimizer.preconditioner()  # P of the step that made Δθ
        taus = optimizer.stability_threshold()
        sums = []
        i = 0
        rule = optimizer.stability_rule
        for group, tau in zip(optimizer.param_groups, taus):
            sign = rule.sign(group)
            decay = rule.coupled_weight_decay(group)
            for _ in group["params"]:
                d, dg, P = dtheta[i], dgrad[i], precond[i]
                sq = d * d
                num = sign * (d * dg).sum()
                if decay:
                    num = num + decay * sq.sum()
                pden = torch.where(sq > 0, sq * P.to(sq.dtype), torch.zeros_like(sq)).sum()
                sums.append(torch.stack([num.double(), pden.double(), pden.double() * tau]))
                i += 1
        num, den, tden = torch.stack(sums).sum(0).tolist()  # one device sync per step
        if den > 0 and math.isfinite(den) and math.isfinite(num):
            optimizer.history.append_secant(step, num / den, num / tden if tden > 0 else math.nan)


class _LiveView:
    """One rich Live panel per optimizer, or plain lines when the console is not a terminal."""

    def __init__(self, history: Any, console: Any = None) -> None:
        from rich.console import Console

        self.history = history
        self.console = console if console is not None else Console()
        self.live: Any = None
        self._atexit = False

    @property
    def interactive(self) -> bool:
        return bool(self.console.is_terminal)

    def measuring(self, step: int) -> None:
        if not self.interactive:
            return
        from rich.console import Group
        from rich.spinner import Spinner

        from .report import render_report

        if self.live is None:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=8, transient=False)
            self.live.start()
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
        spinner = Spinner("dots", text=f"measuring λ_max(P⁻¹H) at step {step}…", style="cyan")
        self.live.update(Group(render_report(self.history), spinner), refresh=True)

    def measured(self, report: Any) -> None:
        if not self.interactive:
            self.console.file.write(plain_line(report) + "\n")
            self.console.file.flush()
            return
        from .report import render_report

        if self.live is not None:
            self.live.update(render_report(self.history), refresh=True)

    def stop(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


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
            self._step_hook = opt.register_step_post_hook(self._after_step)
        if monitor.secant:
            self._secant_users += 1
            if self._secant_hook is None:  # one tracker however many monitors ask for it
                self._secant_hook = opt.register_step_pre_hook(SecantTracker(opt))

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
                self._secant_hook = None
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
        return {"schedules": schedules, "next_id": self._next_id}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.prepare_load(state)()

    def prepare_load(self, state: dict[str, Any] | None) -> Callable[[], None]:
        """Check saved schedules (``ValueError`` naming the field); returns the commit."""
        if not state:
            return self.reset
        from ._checkpoint import check_monitor_state

        schedules, next_id = check_monitor_state(state)

        def commit() -> None:
            self.restored = [s for s in schedules if s["id"] not in self.monitors]
            self._next_id = max(self._next_id, next_id)

        return commit

    def reset(self) -> None:
        self.restored = []
