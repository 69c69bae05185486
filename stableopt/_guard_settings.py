"""The settings of :class:`stableopt.LRGuard`, checked and resolved (mode-dependent defaults)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, cast

__all__ = ["MODES", "SIGNALS", "GuardSettings", "check_tol", "resolve"]

MODES = ("protect", "edge")
#: what a guard reacts to: the edge ratio of λ_max measurements, or the directional ratio
SIGNALS = ("ratio", "directional")


class GuardSettings(NamedTuple):
    """What :func:`resolve` returns: every LRGuard setting, validated, defaults filled in."""

    signal: str
    mode: str
    trigger: float
    target: float
    recovery: float
    patience: int
    relax_rate: float
    floor: float
    cap: float
    warmup: int | None
    every: int | None


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"LRGuard: {name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"LRGuard: {name} must be a positive finite number, got {value!r}")
    return float(value)


def check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
        raise ValueError(f"LRGuard: tol must be a number in (0, 1), got {tol!r}")
    return float(tol)


def _check_count(name: str, value: Any, *, allow_none: bool, minimum: int) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LRGuard: {name} must be an int{' or None' if allow_none else ''}, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"LRGuard: {name} must be >= {minimum}, got {value!r}")
    return value


def resolve(
    *,
    signal: Any,
    mode: Any,
    trigger: Any,
    target: Any,
    recovery: Any,
    patience: Any,
    relax_rate: Any,
    floor: Any,
    cap: Any,
    warmup: Any,
    every: Any,
) -> GuardSettings:
    """Check LRGuard's arguments and fill in the defaults that depend on ``mode``.

    Raises:
        TypeError, ValueError: an argument of the wrong type or out of range (the message names it).
    """
    if not isinstance(signal, str):
        raise TypeError(f"LRGuard: signal must be one of {SIGNALS}, got {type(signal).__name__}")
    if signal not in SIGNALS:
        raise ValueError(f"LRGuard: signal must be one of {SIGNALS}, got {signal!r}")
    if signal == "directional" and every is not None:
        raise ValueError(
            "LRGuard: signal='directional' reacts to directional measurements, and the guard's own "
            "(every=) are λ_max measurements; drop every= and add opt.monitor(loss_fn, every=N, "
            "directional='update') (or 'gradient')"
        )
    if mode not in MODES:
        raise ValueError(f"LRGuard: mode must be one of {MODES}, got {mode!r}")
    edge = mode == "edge"
    trigger = _check_positive("trigger", trigger)
    target = _check_positive("target", 1.0 if edge else 0.9) if target is None else _check_positive("target", target)
    recovery = (0.9 if edge else 0.7) if recovery is None else _check_positive("recovery", recovery)
    patience = (
        (1 if edge else 3)
        if patience is None
        else cast(int, _check_count("patience", patience, allow_none=False, minimum=1))
    )
    relax_rate = _check_positive("relax_rate", relax_rate)
    floor = _check_positive("floor", floor)
    if cap is not None and not edge and cap != 1.0:
        raise ValueError(
            f"LRGuard: cap={cap!r} is only used with mode='edge'; mode='protect' never raises the "
            "lr above the one you set (cap 1.0). Pass mode='edge' to allow raising it."
        )
    cap = (10.0 if edge else 1.0) if cap is None else _check_positive("cap", cap)
    if not target < trigger:
        raise ValueError(f"LRGuard: target ({target}) must be below trigger ({trigger})")
    if not recovery < target:
        raise ValueError(f"LRGuard: recovery ({recovery}) must be below target ({target})")
    if relax_rate <= 1.0:
        raise ValueError(f"LRGuard: relax_rate must be > 1, got {relax_rate!r}")
    if not floor <= 1.0 <= cap:
        raise ValueError(f"LRGuard: need floor <= 1 <= cap, got floor={floor}, cap={cap}")
    warmup = _check_count("warmup", warmup, allow_none=True, minimum=0)
    every = _check_count("every", every, allow_none=True, minimum=1)
    return GuardSettings(signal, mode, trigger, target, recovery, patience, relax_rate, floor, cap, warmup, every)
