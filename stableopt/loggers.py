"""Measurements as ``{name: float}`` metrics, and adapters that send them to TensorBoard and W&B.

``opt.monitor(loss_fn, every=N, log=fn)`` calls ``fn(metrics, step)`` after each of its
measurements, with ``step`` the optimizer's step count and ``metrics`` the dict of
:func:`metrics`: names under a ``stableopt/`` prefix, so that they group together in a
dashboard. Any callable of that shape works (``wandb.log`` itself does); :func:`tensorboard` and
:func:`wandb` build one for a ``SummaryWriter`` and a W&B run. Neither library is imported until
an adapter is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["PREFIX", "LogFn", "metrics", "tensorboard", "wandb"]

#: The namespace of every metric name.
PREFIX = "stableopt/"

#: What ``opt.monitor(..., log=fn)`` accepts: ``fn(metrics, step)``.
LogFn = Callable[[dict[str, float], int], Any]


def metrics(report: Any, guard: Any = None) -> dict[str, float]:
    """The metrics of one measurement.

    ``stableopt/ratio`` (1 = the edge), ``stableopt/preconditioned`` (λ_max(P⁻¹H)),
    ``stableopt/threshold``, ``stableopt/raw`` (λ_max(H), only when measured),
    ``stableopt/hvps``, ``stableopt/seconds`` (wall time of the measurement) and, with a guard,
    ``stableopt/guard_factor_<g>`` for each param group ``g`` (after the guard reacted to this
    measurement).

    Args:
        report: a :class:`~stableopt.SharpnessReport`.
        guard: the optimizer's :class:`~stableopt.LRGuard`, or None.

    >>> from stableopt import SharpnessReport
    >>> r = SharpnessReport(step=10, preconditioned=380.0, threshold=380.0, ratio=1.0, raw=None,
    ...                     eigenvalues=(380.0,), hvps=7, residual=1e-4, converged=True, seconds=0.5)
    >>> metrics(r)
    {'stableopt/ratio': 1.0, 'stableopt/preconditioned': 380.0, 'stableopt/threshold': 380.0, 'stableopt/hvps': 7.0, 'stableopt/seconds': 0.5}
    """
    out = {
        PREFIX + "ratio": float(report.ratio),
        PREFIX + "preconditioned": float(report.preconditioned),
        PREFIX + "threshold": float(report.threshold),
    }
    if report.raw is not None:
        out[PREFIX + "raw"] = float(report.raw)
    out[PREFIX + "hvps"] = float(report.hvps)
    out[PREFIX + "seconds"] = float(report.seconds)
    if guard is not None:
        for g, factor in enumerate(guard.factors):
            out[f"{PREFIX}guard_factor_{g}"] = float(factor)
    return out


def check_log_fn(log: Any) -> LogFn | None:
    """``log`` if it is None or callable, else a TypeError that says what to pass."""
    if log is not None and not callable(log):
        raise TypeError(
            f"log must be None or a callable fn(metrics: dict[str, float], step: int), got "
            f"{type(log).__name__}; e.g. log=stableopt.loggers.tensorboard(writer)"
        )
    return log


def tensorboard(writer: Any) -> LogFn:
    """A ``log=`` callable that writes every metric with ``writer.add_scalar(name, value, step)``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (``pip install "stableopt[tensorboard]"``),
            or anything with its ``add_scalar(tag, value, global_step)``.

    Raises:
        TypeError: ``writer`` has no ``add_scalar``.

    >>> class Writer:  # a SummaryWriter stand-in that keeps what it is given
    ...     def __init__(self): self.rows = []
    ...     def add_scalar(self, tag, value, global_step): self.rows.append((tag, value, global_step))
    >>> w = Writer(); tensorboard(w)({"stableopt/ratio": 0.5}, 3); w.rows
    [('stableopt/ratio', 0.5, 3)]
    """
    add_scalar = getattr(writer, "add_scalar", None)
    if not callable(add_scalar):
        raise TypeError(
            f"tensorboard(writer) needs a torch.utils.tensorboard.SummaryWriter (something with "
            f"add_scalar), got {type(writer).__name__}"
        )

    def log(values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            add_scalar(name, value, step)

    return log


def wandb(run: Any = None, *, step: bool = True) -> LogFn:
    """A ``log=`` callable that sends the metrics to a Weights & Biases run.

    Args:
        run: the run of ``wandb.init(...)``; None (the default) uses whichever run is active
            (``wandb.run``) at each measurement.
        step: pass the optimizer's step count as W&B's ``step`` (W&B drops rows whose step goes
            backwards: with ``step=False`` the metrics are logged at W&B's own step counter and
            carry the optimizer's step as ``stableopt/step``).

    Raises:
        ImportError: ``run`` is None and wandb is not installed (``pip install wandb``).
        RuntimeError: at a measurement, when ``run`` is None and no run is active.

    >>> class Run:  # a W&B run stand-in that keeps what it is given
    ...     def __init__(self): self.rows = []
    ...     def log(self, data, step=None): self.rows.append((data, step))
    >>> run = Run(); wandb(run)({"stableopt/ratio": 0.5}, 3); run.rows
    [({'stableopt/ratio': 0.5}, 3)]
    """
    if run is None:
        try:
            import wandb as _wandb
        except ImportError:
            raise ImportError("stableopt.loggers.wandb() needs wandb: pip install wandb") from None
    elif not callable(getattr(run, "log", None)):
        raise TypeError(f"wandb(run) needs a wandb run (something with .log), got {type(run).__name__}")

    def log(values: dict[str, float], optimizer_step: int) -> None:
        target = run if run is not None else _wandb.run
        if target is None:
            raise RuntimeError("stableopt.loggers.wandb(): no active W&B run; call wandb.init() before training")
        if step:
            target.log(dict(values), step=optimizer_step)
        else:
            target.log({**values, PREFIX + "step": float(optimizer_step)})

    return log
