"""The learning-rate guard: a per-group lr factor that reacts to the measured edge ratio.

:class:`LRGuard` is pure policy. It listens to every sharpness measurement of the optimizer it is
attached to (``stableopt.Adam(..., guard=True)``), and when the dimensionless ratio
(λ_max(P⁻¹H) over the stability threshold, 1 = the edge; see docs/science.md) crosses a trigger it
lowers a multiplicative factor on the learning rate of the param groups. The factor lives next to
``group["lr"]``, never in it: the optimizer multiplies ``group["lr"]`` by the factor inside
``step()`` and puts the scheduler's value back on the way out, even when interrupted during
that restore (:class:`stableopt._state.scaled_lr`), so any torch lr scheduler keeps owning
``group["lr"]`` and scheduler and guard compose as the product of the two.

Why the rule is linear in the ratio: every threshold in the docs/science.md table is ∝ 1/η (Adam
(2+2β1)/((1−β1)η), RMSprop and SGD 2/η or their momentum variants; AdamW's (1+β1)(2−ηλ)/((1−β1)η)
up to the tiny ηλ term), while the preconditioned Hessian P⁻¹H does not contain η. At fixed
parameters and preconditioner the ratio is therefore proportional to the effective learning
rate, and multiplying the factor by ``target / ratio`` puts the ratio exactly on ``target``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import astuple
from typing import Any

from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import _guard_settings as _settings
from . import _hooks
from ._checkpoint import check_guard_state
from ._guard_settings import SIGNALS as SIGNALS  # re-exported: it was defined here
from .backends import check_backend

# One event type for the guard, the history and the report (step, group, old/new factor, ratio,
# reason). Reasons written by the guard: "cut" (ratio above the trigger), "relax" (back toward
# 1 after the ratio stayed below the recovery level), "raise" (mode="edge", factor above 1).
from .history import GuardEvent
from .rules import ADAM_TRANSIENT  # noqa: F401 - re-exported (it lived here before 0.2)

__all__ = ["GuardEvent", "LRGuard"]


class LRGuard:
    """Keeps training from running away above its edge of stability by scaling the lr.

    The guard acts on every measurement of the optimizer it is attached to — one taken by a
    monitor, by a manual ``opt.sharpness(loss_fn)`` call, or by the guard itself when
    ``every`` is set — and on nothing else. With ratio ρ (1 = the edge) and per-group factor f:

    * **cut** — ρ > ``trigger``: f ← max(``floor``, f · ``target``/ρ). The ratio is ∝ the
      effective lr (module docstring), so this puts the measured state back at ``target``.
    * **relax** — ρ < ``recovery`` for ``patience`` measurements in a row:
      f ← min(``cap``, f · min(``relax_rate``, ``target``/ρ)). Gradual (at most ×``relax_rate``
      per action) and never past what would put the ratio above ``target``.
    * nothing otherwise. A measurement whose ratio is NaN, or that did not converge, never
      changes the factor (and restarts the recovery count: the guard never raises the lr
      across a failed measurement).
    * a ratio of ``+inf`` — a threshold ≤ 0, e.g. AdamW with ηλ ≥ 2, whose decay alone is
      unstable (:mod:`stableopt.thresholds`) — is a cut to ``floor`` (``target``/ρ = 0), also
      during ``warmup`` and from an unconverged solve: that verdict needs neither.

    Defaults and why:

    * ``trigger=1.2``: the central-flows picture (docs/science.md) is that training *at* the edge is
      normal and acts as an implicit regulariser; holding the ratio below 1 slows training. So
      the guard ignores the hovering at 1 and reacts to excursions above it. Runs at the edge
      read up to 1.12 (RMSprop and GD on the docs/science.md problem), and Adam's ratio measured
      every step there is a sawtooth between ≈ 0.85 and 1.06 at lr 1e-3 as at 1e-1 (it climbs
      past 1, a small loss spike grows v, it drops), hence 1.2 and not 1.0 or 1.05: a trigger
      inside the normal band ratchets the lr down at every cycle, because at the edge the
      ratio returns to ≈ 1 whatever the lr (self-stabilisation).
    * ``target=0.9`` (``mode="protect"``): land a little below the edge so that the next
      measurement is not an immediate second cut; progressive sharpening brings the run back to
      the edge at the new lr.
    * ``recovery=0.7``, ``patience=3``, ``relax_rate=1.25``: the lr comes back only when the
      run has clearly left the edge (sharpness fell, e.g. after a catapult) for several
      measurements, and then by at most 25% per measurement, so a cut is undone over a few
      measurements instead of re-creating the instability in one jump.
    * ``floor=0.01``: the guard corrects excursions, it does not replace choosing an lr; at the
      floor it warns once (the lr is ≥ 100× too large or the problem is not at an edge).
    * ``cap=1.0`` in ``mode="protect"``: the guard never trains faster than the user asked.

    ``mode="edge"`` (train at the edge on purpose) steers ρ toward ``target`` (default 1.0) from
    both sides: the same cut above ``trigger``, and with ``recovery=0.9``, ``patience=1`` it
    raises the factor whenever ρ < 0.9, up to ``cap`` (default 10).

    **Param groups.** A measurement gives one ratio for the whole model (the ratio of
    λ_max(D^{1/2}HD^{1/2}) with per-group D, docs/science.md). The guard does not apportion it among
    groups: every action multiplies the factor of *every* group by the same amount (each clipped
    to its own floor and cap), which scales D uniformly and so moves the ratio exactly as
    computed. Each group keeps its own factor and gets its own event. A group added with
    ``add_param_group`` after an action starts, from its first step, at the factor a group
    present from the start has (``opt.effective_lr()`` shows it from that step on).

    **Adam's bias-correction transient.** During the first ~3/(1−β1) steps (30 at β1 = 0.9)
    Adam's bias-corrected momentum is not yet the EMA the 38/η threshold assumes (at step 1 the
    update is preconditioned GD, threshold 2/η), so a ratio against the long-run threshold is
    not a stability verdict there. The guard deliberately *ignores* measurements taken before
    step ``warmup`` (default ⌈3/(1−β1)⌉ for groups with ``betas``, the largest over groups;
    0 for RMSprop and SGD). This is safe because Adam's per-coordinate step is bounded (about η for
    steady gradients) in that window, so no runaway can build up, and a state that is truly above the long-run edge
    is still above it at the first measurement after the transient. Ignored measurements are
    counted in ``skipped``.

    **Schedulers.** The factor multiplies whatever ``group["lr"]`` is when ``step()`` runs;
    ``group["lr"]`` itself is never written, so StepLR, CosineAnnealingLR, OneCycleLR,
    ReduceLROnPlateau... see exactly the values they would see without the guard, and
    ``opt.effective_lr()`` is scheduler lr × factor. Since the measured ratio already uses the
    effective lr, a scheduler decay that moves the run away from the edge shows up as a low ratio.

    **Signal.** ``signal="ratio"`` (default) reacts to the edge ratio of λ_max measurements
    (``opt.sharpness``, monitors, its own). ``signal="directional"`` reacts instead to the
    directional ratio uᵀHu / Σ_g τ_g·u_gᵀP_gu_g of ``opt.directional_sharpness`` (a monitor with
    ``directional="update"`` or ``"gradient"``, or manual calls) and ignores λ_max
    measurements; the levels (``trigger``, ``target``, ``recovery``) mean the same, 1 = the
    edge. The directional ratio is a lower bound on the edge ratio (:mod:`stableopt.directional`),
    so a trigger fires on it no earlier than on the ratio, and a cut by ``target/ρ`` may leave the
    true ratio above ``target``; it costs one product per measurement instead of 10–20 and with
    mini-batches it is noisy. The guard's own measurements (``every``) are λ_max measurements, so
    ``signal="directional"`` takes its measurements from a monitor instead.

    **Own measurements.** With ``every=N`` the guard measures after every N-th ``step()`` (a
    torch step post-hook); it needs the loss: ``opt.guard.attach(loss_fn)`` (or pass
    ``loss_fn=`` here). Without ``every`` it only reacts to measurements that something else
    takes (``opt.sharpness(...)`` or ``opt.monitor(...)``); using both doubles the cost.

    Args:
        mode: ``"protect"`` (default) or ``"edge"``.
        trigger: cut when the ratio exceeds this (> ``target``).
        target: where a change puts the ratio (default 0.9, or 1.0 with ``mode="edge"``).
        recovery: ratio below which measurements count toward relaxing (< ``target``; default
            0.7, or 0.9 with ``mode="edge"``).
        patience: consecutive measurements below ``recovery`` before each relax (default 3,
            or 1 with ``mode="edge"``).
        relax_rate: the largest multiplicative increase of a factor per action (> 1).
        floor: smallest factor (0 < floor ≤ 1).
        cap: largest factor: 1.0 with ``mode="protect"`` (may not be changed), default 10 with
            ``mode="edge"``.
        warmup: ignore measurements taken before this step (default: Adam's transient, above).
        every: measure after every ``every``-th step (None: only react to others' measurements).
        signal: ``"ratio"`` (default) or ``"directional"`` (see **Signal** above).
        loss_fn: passed to ``opt.sharpness`` for the guard's own measurements (see :meth:`attach`).
        batches: likewise.
        tol: likewise; defaults to 1e-2, not ``sharpness``'s 1e-3: the policy compares the
            ratio with levels 10–30% apart, and the looser tolerance needs about 2.5× fewer
            Hessian-vector products per measurement.
        max_iters: likewise.
        hvp: likewise: the Hessian-vector-product backend (default ``"auto"``).

    Examples:
        >>> import torch, stableopt
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> loss_fn = lambda: 0.5 * (100.0 * w[0] ** 2 + w[1] ** 2)  # λ_max(H) = 100
        >>> opt = stableopt.SGD([w], lr=0.03, guard=True)  # threshold 2/0.03 ≈ 67 < 100
        >>> loss_fn().backward(); opt.step()
        >>> round(opt.sharpness(loss_fn).ratio, 3)
        1.5
        >>> round(opt.guard.factors[0], 3), round(opt.effective_lr()[0], 3)
        (0.6, 0.018)
        >>> opt.param_groups[0]["lr"]  # the user's (or the scheduler's) lr is untouched
        0.03
    """

    def __init__(
        self,
        *,
        mode: str = "protect",
        trigger: float = 1.2,
        target: float | None = None,
        recovery: float | None = None,
        patience: int | None = None,
        relax_rate: float = 1.25,
        floor: float = 0.01,
        cap: float | None = None,
        warmup: int | None = None,
        every: int | None = None,
        loss_fn: Callable[..., Tensor] | None = None,
        batches: Iterable[Any] | None = None,
        tol: float = 1e-2,
        max_iters: int | None = None,
        hvp: str = "auto",
        signal: str = "ratio",
    ) -> None:
        (
            self.signal,
            self.mode,
            self.trigger,
            self.target,
            self.recovery,
            self.patience,
            self.relax_rate,
            self.floor,
            self.cap,
            self.warmup,
            self.every,
        ) = _settings.resolve(
            signal=signal,
            mode=mode,
            trigger=trigger,
            target=target,
            recovery=recovery,
            patience=patience,
            relax_rate=relax_rate,
            floor=floor,
            cap=cap,
            warmup=warmup,
            every=every,
        )
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"LRGuard: loss_fn must be callable, got {type(loss_fn).__name__}")
        self._loss_fn = loss_fn
        self._sharpness_kwargs: dict[str, Any] = {
            "batches": batches,
            "tol": _settings.check_tol(tol),
            "max_iters": max_iters,
            "hvp": check_backend(hvp),
        }

        #: every action, in order
        self.events: list[GuardEvent] = []
        #: measurements acted on / ignored (transient, non-finite or not converged)
        self.measurements = 0
        self.skipped = 0
        self._below = 0  # consecutive measurements below ``recovery``
        self._common = 1.0  # the factor of a group present from the start (for added groups)
        self._warned_floor = False
        self._optimizer: Any = None
        self._handles: list[RemovableHandle] = []

    # -- wiring --------------------------------------------------------------------------
    def bind(self, optimizer: Any) -> LRGuard:
        """Attach to a stableopt optimizer (done by its ``guard=`` argument).

        Registers a measurement hook, the guard's state under ``"guard"`` in the optimizer's
        state dict, and with ``every`` a step post-hook that measures.

        Raises:
            RuntimeError: the guard is already bound to an optimizer.
            TypeError: ``optimizer`` is not a stableopt optimizer.
        """
        if self._optimizer is not None:
            raise RuntimeError(
                "LRGuard: this guard is already attached to an optimizer; create one guard per optimizer"
            )
        if not hasattr(optimizer, "register_measurement_hook"):
            raise TypeError(
                f"LRGuard needs a stableopt optimizer (stableopt.Adam, ...), got {type(optimizer).__name__}"
            )
        self._optimizer = optimizer
        if self.signal == "directional":
            self._handles.append(optimizer.register_directional_hook(self._on_measurement))
        else:
            self._handles.append(optimizer.register_measurement_hook(self._on_measurement))
        self._handles.append(_hooks.register_step_pre_hook(optimizer, self._before_step))
        optimizer._stableopt_components["guard"] = self
        if self.every is not None:
            self._handles.append(_hooks.register_step_post_hook(optimizer, self._after_step))
        return self

    def attach(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        batches: Iterable[Any] | None = None,
        tol: float | None = None,
        max_iters: int | None = None,
        hvp: str | None = None,
    ) -> LRGuard:
        """Give the guard the loss its own measurements (``every=``) evaluate. Returns self.

        ``hvp`` sets the Hessian-vector-product backend of those measurements (default
        ``"auto"``, see :meth:`stableopt.Adam.sharpness`)."""
        if not callable(loss_fn):
            raise TypeError(f"LRGuard.attach: loss_fn must be callable, got {type(loss_fn).__name__}")
        self._loss_fn = loss_fn
        self._sharpness_kwargs["batches"] = batches
        if tol is not None:
            self._sharpness_kwargs["tol"] = _settings.check_tol(tol)
        if max_iters is not None:
            self._sharpness_kwargs["max_iters"] = max_iters
        if hvp is not None:
            self._sharpness_kwargs["hvp"] = check_backend(hvp)
        return self

    def remove(self) -> None:
        """Detach from the optimizer; the factor goes back to 1 (the scheduler's lr)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        opt = self._optimizer
        if opt is not None:
            opt._stableopt_components.pop("guard", None)
            opt._stableopt_lr_scale = None
            if getattr(opt, "guard", None) is self:
                opt.guard = None
        self._optimizer = None

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """A param group added since the last action starts at the common factor (the factor
        of a group that was there from the start), not at 1: the cut applies to it too."""
        scale = optimizer._stableopt_lr_scale
        if scale is not None and len(scale) < len(optimizer.param_groups):
            optimizer._stableopt_lr_scale = self.factors

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.every is None or optimizer.steps_taken % self.every != 0:
            return
        if self._loss_fn is None:
            raise RuntimeError(
                f"LRGuard(every={self.every}) measures on its own and needs the loss: call "
                "opt.guard.attach(loss_fn) before training (or pass LRGuard(loss_fn=...))"
            )
        optimizer.sharpness(self._loss_fn, **self._sharpness_kwargs)

    # -- policy --------------------------------------------------------------------------
    @property
    def factors(self) -> list[float]:
        """The lr factor of each param group (1.0 = the scheduler's lr unchanged)."""
        opt = self._optimizer
        if opt is None:
            return []
        scale = opt._stableopt_lr_scale or []
        return [float(f) for f in scale] + [self._common] * (len(opt.param_groups) - len(scale))

    def warmup_steps(self) -> int:
        """Measurements before this step are ignored (Adam's bias-correction transient)."""
        if self.warmup is not None:
            return self.warmup
        opt = self._optimizer
        if opt is None:
            return 0
        rule = opt.stability_rule
        return max((rule.transient_steps(g) for g in opt.param_groups), default=0)

    def _on_measurement(self, optimizer: Any, report: Any) -> None:
        self.observe(report.ratio, step=report.step, converged=getattr(report, "converged", True))

    def observe(self, ratio: float, *, step: int, converged: bool = True) -> list[GuardEvent]:
        """Apply the policy to one measured ratio; returns the events it caused (maybe none).

        Called by the optimizer after every measurement; call it directly to feed a ratio
        measured some other way.
        """
        if self._optimizer is None:
            raise RuntimeError("LRGuard.observe: the guard is not attached to an optimizer (pass it as guard= to one)")
        # +inf: a threshold <= 0, unstable at any curvature (stableopt.thresholds): no transient,
        # no solve decides that verdict, so it cuts (to the floor) in any case
        unstable = ratio == math.inf
        if not unstable and (step < self.warmup_steps() or not converged or not math.isfinite(ratio)):
            self.skipped += 1
            if step >= self.warmup_steps():
                self._below = 0
            return []
        self.measurements += 1
        old = self.factors
        if ratio > self.trigger:
            self._below = 0
            new = [max(self.floor, f * self.target / ratio) for f in old]
            common = max(self.floor, self._common * self.target / ratio)
            reason = "cut"
        elif ratio < self.recovery:
            self._below += 1
            if self._below < self.patience:
                return []
            self._below = 0
            up = min(self.relax_rate, self.target / ratio) if ratio > 0 else self.relax_rate
            new = [max(f, min(self.cap, f * up)) for f in old]
            common = max(self._common, min(self.cap, self._common * up))
            reason = "relax"
        else:
            self._below = 0
            return []
        events = [
            GuardEvent(step, i, o, n, float(ratio), "raise" if reason == "relax" and n > 1.0 else reason)
            for i, (o, n) in enumerate(zip(old, new))
            if n != o
        ]
        self._common = common
        if not events:
            return []
        self._optimizer._stableopt_lr_scale = new
        self.events.extend(events)
        history = getattr(self._optimizer, "history", None)
        if history is not None and hasattr(history, "append_event"):
            for e in events:
                history.append_event(e.step, e.group, e.old_factor, e.new_factor, e.ratio, e.reason)
        if reason == "cut" and not self._warned_floor and any(n <= self.floor for n in new):
            self._warned_floor = True
            why = (
                "a stability threshold <= 0: the update is unstable at any curvature (AdamW: lr × weight_decay >= 2)"
                if unstable
                else "the learning rate is far above the edge of stability"
            )
            warnings.warn(
                f"stableopt LRGuard: the lr factor reached its floor ({self.floor:g}) at step {step} "
                f"(ratio {ratio:.3g}); {why} — lower it",
                RuntimeWarning,
                stacklevel=2,
            )
        return events

    # -- persistence ---------------------------------------------------------------------
    def reset(self) -> None:
        """Forget events and counters (the optimizer calls it when it loads a plain torch state
        dict, which also puts every factor back to 1)."""
        self.events = []
        self.measurements = self.skipped = self._below = 0
        self._common = 1.0
        self._warned_floor = False

    def state_dict(self) -> dict[str, Any]:
        """Factors, counters and events (plain Python values)."""
        return {
            "factors": self.factors,
            "common": self._common,
            "measurements": self.measurements,
            "skipped": self.skipped,
            "below": self._below,
            "events": [astuple(e) for e in self.events],
        }

    def prepare_load(self, state: Any) -> Callable[[], None]:
        """Check a :meth:`state_dict`; returns the commit that loads it (and cannot fail)."""
        opt = self._optimizer
        groups = len(opt.param_groups) if opt is not None else None
        checked = check_guard_state(state, floor=self.floor, cap=self.cap, groups=groups)
        factors = checked["factors"]

        def commit() -> None:
            self.measurements, self.skipped, self._below = checked["measurements"], checked["skipped"], checked["below"]
            self.events, self._common = checked["events"], checked["common"]
            if self._optimizer is not None:
                self._optimizer._stableopt_lr_scale = factors if any(f != 1.0 for f in factors) else None

        return commit

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (also sets the optimizer's factors).

        Raises:
            ValueError: a field is missing its type or range (nothing is changed).
        """
        self.prepare_load(state)()

    def __getstate__(self) -> dict[str, Any]:
        """A pickled or copied guard is detached and forgets the user's ``loss_fn`` and
        batches (they belong to the original model); the optimizer's copy re-binds it."""
        state = dict(self.__dict__)
        state.update(_optimizer=None, _handles=[], _loss_fn=None)
        state["_sharpness_kwargs"] = {**self._sharpness_kwargs, "batches": None}
        return state

    def __repr__(self) -> str:
        return (
            f"LRGuard(mode={self.mode!r}, signal={self.signal!r}, trigger={self.trigger}, target={self.target}, recovery={self.recovery}, "
            f"patience={self.patience}, relax_rate={self.relax_rate}, floor={self.floor}, cap={self.cap}, "
            f"every={self.every}, factors={[round(f, 4) for f in self.factors]})"
        )
