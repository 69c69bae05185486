"""The ``"stableopt"`` entry of an optimizer's state dict, and pickling/copying an optimizer.

:func:`load` makes ``opt.load_state_dict(sd)`` all-or-nothing: the whole entry — step count,
warm-start vectors, history, monitor schedules, guard state — is checked and prepared first,
torch's own ``load_state_dict`` runs next, and only then are the prepared parts put in place
(plain assignments that cannot fail). A tampered entry raises ``ValueError`` naming the field
and leaves the optimizer exactly as it was. The entry holds only tensors and plain Python
values, so ``torch.load(..., weights_only=True)`` reads it.

:func:`getstate` / :func:`setstate` make ``pickle`` and ``copy.deepcopy`` of an optimizer keep
what its state dict keeps (history, step count, the guard with its lr cut, the monitors'
schedules). User callables are not kept: a copy's monitors come back with
``opt.monitor(loss_fn)`` as after ``load_state_dict``, and a guard that measures on its own
(``every=``) needs ``opt.guard.attach(loss_fn)`` again — the old ``loss_fn`` evaluates the old
model, not the copy.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .history import MAX_REASON_CHARS, GuardEvent

__all__ = [
    "check_guard_state",
    "check_monitor_state",
    "check_secant_state",
    "getstate",
    "load",
    "setstate",
    "state_entry",
]

_ENTRY_KEYS = ("step", "measurements", "warm", "components")
#: step counts and counters are below 2**53 (exact as float64; 285 years of 1-µs steps)
MAX_COUNT = 2**53
#: monitor ids (the history's monitor column) are below this
MAX_MONITOR_ID = 2**31
#: the largest param group index (the history's event_group column holds at most this)
MAX_GROUP = 2**20
_PICKLE_KEY = "_stableopt"


def state_entry(opt: Any) -> dict[str, Any]:
    """The ``"stableopt"`` entry of ``opt.state_dict()``."""
    return {
        "step": opt._stableopt_step,
        "measurements": opt._stableopt_measurements,
        "warm": {k: v.detach().clone() for k, v in opt._stableopt_warm.items()},
        "components": {k: c.state_dict() for k, c in opt._stableopt_components.items()},
    }


def _bad(problem: str) -> ValueError:
    return ValueError(f"optimizer state dict 'stableopt' entry: {problem}")


def _count(name: str, value: Any) -> int:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise _bad(f"{name} must be a non-negative integer, got {value!r}"[:200])
    if int(value) >= MAX_COUNT:
        raise _bad(f"{name} must be below 2**53, got {value!r}"[:200])
    return int(value)


def _warm(value: Any) -> dict[str, torch.Tensor]:
    if not isinstance(value, Mapping):
        raise _bad(f"warm must be a dict of tensors, got {type(value).__name__}")
    warm = {}
    for key, vecs in value.items():
        if not isinstance(key, str) or len(key) > 64:
            raise _bad(f"warm-start keys must be short strings, got {str(key)[:60]!r}")
        if (
            not isinstance(vecs, torch.Tensor)
            or vecs.layout != torch.strided
            or vecs.device.type == "meta"
            or not vecs.is_floating_point()
            or vecs.dim() != 2
        ):
            detail = (
                f"{vecs.dtype}, {vecs.dim()}-D, {vecs.layout}, {vecs.device}"
                if isinstance(vecs, torch.Tensor)
                else type(vecs).__name__
            )
            raise _bad(f"warm-start vectors {key!r} must be a dense 2-D floating-point tensor with data, got {detail}")
        if not bool(torch.isfinite(vecs).all()):
            raise _bad(f"warm-start vectors {key!r} hold NaN or infinite values")
        warm[key] = vecs.detach().clone()
    return warm


def _prepare(opt: Any, extra: Any) -> Callable[[], None]:
    """Check the whole entry (None: a plain torch state dict); returns the commit."""
    components = opt._stableopt_components
    if extra is None or (isinstance(extra, Mapping) and not extra):
        resets = [c.reset for c in components.values() if hasattr(c, "reset")]

        def commit_plain() -> None:
            opt._stableopt_step = opt._step_from_state()  # torch's per-parameter step
            opt._stableopt_warm = {}
            opt._stableopt_lr_scale = None
            for reset in resets:
                reset()

        return commit_plain
    if not isinstance(extra, Mapping):
        raise _bad(f"expected a dict, got {type(extra).__name__}")
    unknown = sorted(str(k) for k in extra if k not in _ENTRY_KEYS)
    if unknown:
        raise _bad(f"unknown fields {unknown[:5]} (known: {list(_ENTRY_KEYS)})")
    step = _count("step", extra["step"]) if "step" in extra else None
    measurements = _count("measurements", extra.get("measurements", opt._stableopt_measurements))
    warm = _warm(extra.get("warm", {}))
    saved = extra.get("components", {})
    if not isinstance(saved, Mapping):
        raise _bad(f"components must be a dict, got {type(saved).__name__}")
    known = {"history", "monitors", "guard", *components}
    unknown = sorted(str(k) for k in saved if k not in known)
    if unknown:
        raise _bad(f"unknown components {unknown[:5]} (known: {sorted(known)})")
    commits = []
    for name, component in components.items():
        if name in saved:
            prepare = getattr(component, "prepare_load", None)
            commits.append(
                prepare(saved[name]) if prepare else (lambda c=component, s=saved[name]: c.load_state_dict(s))
            )
        elif hasattr(component, "reset"):  # a dict saved before the component existed
            commits.append(component.reset)
    if "guard" in saved and "guard" not in components:
        # checked all the same; an optimizer without a guard trains at the scheduler's lr
        # rather than keep a cut that nothing would ever relax
        check_guard_state(saved["guard"])
    if step is not None:  # (without one the step comes from torch's state, loaded later)
        _check_steps(saved, step)

    def commit() -> None:
        opt._stableopt_step = step if step is not None else opt._step_from_state()
        opt._stableopt_measurements = measurements
        opt._stableopt_warm = warm
        opt._stableopt_lr_scale = None  # the guard's commit below sets its factors back
        for c in commits:
            c()

    return commit


#: the history's tables whose steps are the optimizer's step count when they were recorded
_STEP_COLUMNS = ("step", "secant_step", "directional_step", "track_step", "density_step")


def _check_steps(saved: Mapping[str, Any], step: int) -> None:
    """What the components recorded happened at or before ``step`` (the entry's own step count):
    the history's measurements, the secant snapshot (taken before the step that followed it).
    The components passed their own checks already."""
    history = saved.get("history")
    columns = history.get("columns", {}) if isinstance(history, Mapping) else {}
    for name in _STEP_COLUMNS:
        values = columns.get(name)
        if isinstance(values, torch.Tensor) and values.numel() and int(values.max()) > step:
            raise _bad(
                f"the history's {name} column reaches step {int(values.max())}, after the optimizer's "
                f"step {step}: a history from another run?"
            )
    monitors = saved.get("monitors")
    secant = monitors.get("secant") if isinstance(monitors, Mapping) else None
    if isinstance(secant, Mapping) and not secant.get("step", -1) < step:
        raise _bad(
            f"the secant snapshot was taken at step {secant.get('step')!r}, not before the optimizer's step {step}"
        )


def load(opt: Any, state_dict: Any, torch_load: Callable[[Any], None]) -> None:
    """``opt.load_state_dict(state_dict)``, all-or-nothing (see the module docstring)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"load_state_dict expects a dict (from state_dict()), got {type(state_dict).__name__}")
    commit = _prepare(opt, state_dict.get("stableopt"))
    torch_load(state_dict)
    commit()


def getstate(opt: Any, torch_state: dict[str, Any]) -> dict[str, Any]:
    """What pickling ``opt`` keeps: torch's state plus the stableopt entry and the guard."""
    state = dict(torch_state)
    guard = copy.copy(opt.guard) if opt.guard is not None else None  # detached (LRGuard.__getstate__)
    state[_PICKLE_KEY] = {"entry": state_entry(opt), "guard": guard}
    return state


def setstate(opt: Any, state: dict[str, Any], torch_setstate: Callable[[dict[str, Any]], None]) -> None:
    """Restore what :func:`getstate` kept (torch's own ``load_state_dict`` calls this too,
    with torch state only, on an optimizer that is already set up)."""
    state = dict(state)
    extra = state.pop(_PICKLE_KEY, None)
    torch_setstate(state)
    if extra is None:
        if "_stableopt_step" not in opt.__dict__:  # pickled by torch or an older stableopt
            opt._stableopt_init()
            opt._stableopt_step = opt._step_from_state()
        return
    opt._stableopt_init()
    if extra.get("guard") is not None:
        opt._stableopt_set_guard(extra["guard"])
    _prepare(opt, extra["entry"])()


def check_guard_state(
    state: Any, *, floor: float | None = None, cap: float | None = None, groups: int | None = None
) -> dict[str, Any]:
    """The checked contents of ``LRGuard.state_dict()`` (``ValueError`` naming the field).

    With the loading guard's ``floor`` and ``cap`` the factors (and the factor of groups added
    later) must lie within them, as that guard's own actions keep them; with ``groups`` (its
    optimizer's param groups) there are at most that many factors. Counters are non-negative,
    below 2**53, and consistent (``below`` counts measurements, so it is at most
    ``measurements``).
    """

    def bad(problem: str) -> ValueError:
        return ValueError(f"optimizer state dict guard: {problem}"[:400])

    def count(key: str) -> int:
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{key} must be a non-negative integer, got {value!r}")
        if value >= MAX_COUNT:
            raise bad(f"{key} must be below 2**53, got {value!r}")
        return value

    def factor(where: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise bad(f"{where} must be a positive finite number, got {value!r}")
        return float(value)

    def bounded(where: str, value: Any) -> float:
        f = factor(where, value)
        if floor is not None and f < floor:
            raise bad(
                f"{where} {f!r} is below this guard's floor ({floor!r}): a checkpoint of a guard with "
                "other settings? Create the LRGuard with the settings of the run that saved it"
            )
        if cap is not None and f > cap:
            raise bad(
                f"{where} {f!r} is above this guard's cap ({cap!r}): a checkpoint of a guard with "
                "other settings? Create the LRGuard with the settings of the run that saved it"
            )
        return f

    if not isinstance(state, dict):
        raise bad(f"expected a dict, got {type(state).__name__}")
    unknown = sorted(
        str(k) for k in state if k not in ("factors", "common", "measurements", "skipped", "below", "events")
    )
    if unknown:
        raise bad(f"unknown fields {unknown[:5]}")
    factors = state.get("factors", [])
    if not isinstance(factors, (list, tuple)):
        raise bad(f"factors must be a list, got {type(factors).__name__}")
    if groups is not None and len(factors) > groups:
        raise bad(f"{len(factors)} factors for an optimizer with {groups} param groups")
    checked: dict[str, Any] = {
        "factors": [bounded("a factor", f) for f in factors],
        "measurements": count("measurements"),
        "skipped": count("skipped"),
        "below": count("below"),
    }
    if checked["below"] > checked["measurements"]:
        raise bad(
            f"below ({checked['below']}) counts measurements below the recovery level, so it cannot "
            f"exceed measurements ({checked['measurements']})"
        )
    checked["common"] = (
        bounded("common", state["common"]) if "common" in state else min(checked["factors"], default=1.0)
    )
    events = state.get("events", [])
    if not isinstance(events, (list, tuple)):
        raise bad(f"events must be a list, got {type(events).__name__}")
    checked["events"] = []
    for e in events:
        if not isinstance(e, (list, tuple)) or len(e) != 6:
            raise bad("each event must be (step, group, old factor, new factor, ratio, reason)")
        step, group, old, new, ratio, why = e
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in (step, group)):
            raise bad(f"an event's step and group must be non-negative integers, got {step!r}, {group!r}")
        if step >= MAX_COUNT or group > MAX_GROUP:
            raise bad(f"an event's step must be below 2**53 and its group at most 2**20, got {step!r}, {group!r}")
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not (math.isfinite(ratio) or ratio == math.inf)
        ):  # +inf: a cut on a threshold <= 0
            raise bad(f"an event's ratio must be a finite number or +inf, got {ratio!r}")
        if not isinstance(why, str) or len(why) > MAX_REASON_CHARS:
            raise bad(f"an event's reason must be a string of at most {MAX_REASON_CHARS} characters")
        checked["events"].append(
            GuardEvent(
                step, group, factor("an event's factor", old), factor("an event's factor", new), float(ratio), why
            )
        )
    return checked


_SCHEDULE = {
    "id": int,
    "every": int,
    "raw": bool,
    "k": int,
    "tol": float,
    "secant": bool,
    "live": bool,
    "hvp": str,
    "directional": str,
    "directional_every": int,
    "budget": int,
}
#: optional schedule fields and their values when a checkpoint predates them
_SCHEDULE_DEFAULTS = {
    "secant": False,
    "live": False,
    "hvp": "auto",
    "directional": None,
    "directional_every": 1,
    "budget": None,
}


def check_monitor_state(state: Any) -> tuple[list[dict[str, Any]], int]:
    """The checked schedules and next id of ``MonitorSet.state_dict()``."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"optimizer state dict monitors: {problem}"[:400])

    if not isinstance(state, Mapping) or set(state) - {"schedules", "next_id", "secant"}:
        raise bad("expected a dict with 'schedules' and 'next_id' (and 'secant')")
    next_id = state.get("next_id", 0)
    if isinstance(next_id, bool) or not isinstance(next_id, int) or not 0 <= next_id < MAX_MONITOR_ID:
        raise bad(f"next_id must be an integer in [0, 2**31), got {next_id!r}"[:200])
    saved = state.get("schedules", [])
    if not isinstance(saved, (list, tuple)):
        raise bad(f"schedules must be a list, got {type(saved).__name__}")
    schedules = []
    for s in saved:
        if not isinstance(s, Mapping) or set(s) - set(_SCHEDULE) or not {"id", "every", "raw", "k", "tol"} <= set(s):
            raise bad(
                f"a schedule must hold id, every, raw, k, tol (and secant, live, hvp), got {sorted(map(str, s)) if isinstance(s, Mapping) else type(s).__name__}"
            )
        for key, value in s.items():
            kind = _SCHEDULE[key]
            if kind is str:
                from .backends import HVP_OPTIONS
                from .directional import DIRECTIONS

                allowed = HVP_OPTIONS if key == "hvp" else (None, *DIRECTIONS)
                if value not in allowed:
                    raise bad(f"schedule field {key} must be one of {allowed}, got {str(value)[:40]!r}")
                continue
            if key == "budget" and value is None:  # a monitor that solves (no tracking)
                continue
            ok = (
                isinstance(value, bool)
                if kind is bool
                else (not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int))
            )
            if not ok:
                raise bad(f"schedule field {key} must be {kind.__name__}, got {value!r}")
        if (
            s["id"] < 0
            or s["every"] < 1
            or s["k"] < 1
            or not 0.0 < s["tol"] < 1.0
            or s.get("directional_every", 1) < 1
            or (s.get("budget") is not None and s["budget"] < 1)
        ):
            raise bad(f"schedule out of range (id >= 0, every >= 1, k >= 1, 0 < tol < 1): {dict(s)}")
        if s["id"] >= next_id:
            raise bad(f"schedule id {s['id']} is not below next_id {next_id} (ids are handed out in order)")
        # in the order Monitor.schedule() writes, so a loaded state dict gives itself back
        schedules.append({key: s[key] if key in s else _SCHEDULE_DEFAULTS[key] for key in _SCHEDULE})
    return schedules, next_id


def check_secant_state(state: Any, params: Sequence[torch.Tensor]) -> dict[str, Any] | None:
    """The checked secant snapshot of ``MonitorSet.state_dict()`` (None: there is none):
    ``{"step", "theta", "grad"}``, one dense floating-point tensor per parameter in ``theta``
    and ``grad``, each shaped like its parameter, and the step the snapshot was taken at."""

    def bad(problem: str) -> ValueError:
        return ValueError(f"optimizer state dict monitors: secant {problem}"[:400])

    if state is None:
        return None
    if not isinstance(state, Mapping) or set(state) != {"step", "theta", "grad"}:
        raise bad("must be a dict with step, theta and grad")
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < MAX_COUNT:
        raise bad(f"step must be an integer in [0, 2**53), got {step!r}"[:200])
    checked: dict[str, Any] = {"step": step}
    for key in ("theta", "grad"):
        tensors = state[key]
        if not isinstance(tensors, (list, tuple)) or len(tensors) != len(params):
            count = len(tensors) if isinstance(tensors, (list, tuple)) else type(tensors).__name__
            raise bad(f"{key} must be a list of {len(params)} tensors (one per parameter), got {count}")
        for i, (t, p) in enumerate(zip(tensors, params)):
            if (
                not isinstance(t, torch.Tensor)
                or t.layout != torch.strided
                or t.device.type == "meta"
                or not t.is_floating_point()
            ):
                detail = f"{t.dtype}, {t.layout}, {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
                raise bad(f"{key}[{i}] must be a dense floating-point tensor with data, got {detail}")
            if t.shape != p.shape:
                raise bad(f"{key}[{i}] has shape {tuple(t.shape)}, its parameter {tuple(p.shape)}")
        checked[key] = [t.detach() for t in tensors]
    return checked
