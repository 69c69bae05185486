"""Choosing how Hessian-vector products are computed: ``hvp="auto" | "autograd" | "fd" | "forward"``.

* ``"autograd"`` — double backward through a reused gradient graph (:func:`stableopt.make_hvp`):
  exact and the fastest where it works (1.1–1.3 gradients per product on CPU).
* ``"fd"`` — Richardson-extrapolated central differences of gradients with an adaptive step
  (:mod:`stableopt.finite_difference`): four ordinary backward passes per product, so it works
  through flash/efficient attention, ``torch.compile``, activation checkpointing, custom kernels
  and FSDP2; λ_max within 1e-4 in float32 on LayerNorm/attention models and ~1e-9 in float64,
  with an a-posteriori error estimate in every report (``hvp_error``).
* ``"forward"`` — forward-over-reverse with ``torch.func`` (:mod:`stableopt.forward_ad`): exact,
  where the model supports forward-mode AD; never chosen by ``"auto"``.
* ``"auto"`` (the default) — ``"autograd"`` when double backward works on this model, otherwise
  ``"fd"``. The probe is real, not a guess from the model's type: the autograd graph is built and
  the first product of the measurement is computed with it; if torch cannot differentiate the
  gradient (:class:`~stableopt.hvp.DoubleBackwardError`), that product and every later one is
  computed with ``"fd"``. The outcome is remembered per optimizer (:class:`BackendChoice`), so
  a model without double backward pays for the failed probe once. FSDP2 (DTensor) parameters
  go straight to ``"fd"``. It is never silent: ``SharpnessReport.hvp_backend`` says which
  backend measured, and the switch to ``"fd"`` warns once per optimizer with torch's reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .finite_difference import make_fd_hvp
from .forward_ad import make_forward_hvp
from .hvp import HVP, DoubleBackwardError, make_hvp

__all__ = ["BACKENDS", "HVP_OPTIONS", "BackendChoice", "build_product", "check_backend"]

#: the backends a measurement can really use (``SharpnessReport.hvp_backend``)
BACKENDS = ("autograd", "fd", "forward")
#: what ``hvp=`` accepts
HVP_OPTIONS = ("auto", *BACKENDS)


def check_backend(hvp: Any) -> str:
    """``hvp`` if it is one of :data:`HVP_OPTIONS`, else a ValueError/TypeError listing them.

    >>> check_backend("fd")
    'fd'
    """
    if not isinstance(hvp, str):
        raise TypeError(f"hvp must be one of {HVP_OPTIONS}, got {type(hvp).__name__}")
    if hvp not in HVP_OPTIONS:
        raise ValueError(f"hvp must be one of {HVP_OPTIONS}, got {hvp!r}")
    return hvp


@dataclass
class BackendChoice:
    """What ``hvp="auto"`` decided for one model (kept by the optimizer between measurements).

    Attributes:
        backend: None until the first measurement, then ``"autograd"`` or ``"fd"``.
        reason: why ``"fd"`` was chosen (torch's error, or that parameters are sharded).
        warned: whether the switch to ``"fd"`` has been warned about.
    """

    backend: str | None = None
    reason: str = ""
    warned: bool = False

    def fall_back(self, reason: str) -> None:
        self.backend, self.reason = "fd", reason
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"stableopt: measuring with hvp='fd' (finite differences of gradients) because "
                f"double backward is not available through this model: {reason}. Pass hvp='fd' "
                "to skip the probe, or hvp='autograd' to make this an error",
                RuntimeWarning,
                stacklevel=5,
            )


class _AutoHVP:
    """``"autograd"`` until its first product proves it works; on a DoubleBackwardError, ``"fd"``.

    ``agree(*flags)`` returns, for each flag, whether it is True on any rank (identity in one
    process): at the first product every rank learns whether double backward failed anywhere
    (then all switch to ``"fd"`` together) and whether any rank's product failed otherwise (then
    all raise together instead of leaving the others in a collective).
    """

    def __init__(
        self,
        primary: HVP,
        error: DoubleBackwardError | None,
        make_fd: Callable[[], HVP],
        choice: BackendChoice,
        agree: Agree,
    ) -> None:
        self._hvp = primary
        self._error = error  # building the autograd graph already failed here: primary is "fd"
        self._make_fd = make_fd
        self._choice = choice
        self._agree = agree
        self._probed = False
        self.params = primary.params
        self.loss = primary.loss
        self.samples = primary.samples

    @property
    def backend(self) -> str:
        return self._hvp.backend

    @property
    def calls(self) -> int:
        return self._hvp.calls

    @property
    def stats(self) -> Any:
        return self._hvp.stats

    def error_pair(self, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
        return self._hvp.error_pair(vectors)

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        if self._probed:
            return self._hvp(vectors)
        self._probed = True
        error, failure, out = self._error, None, None
        try:
            out = self._hvp(vectors)
        except DoubleBackwardError as exc:
            error = exc
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            failure = exc
        any_error, any_failure = self._agree(error is not None, failure is not None)
        if failure is not None:
            raise failure
        if any_failure:
            raise RuntimeError(
                "stableopt: a Hessian-vector product failed on another rank during a distributed "
                "measurement (this rank's succeeded); see the failing rank's traceback"
            )
        if not any_error:
            self._choice.backend = "autograd"
            assert out is not None
            return out
        self._choice.fall_back(str(error.cause) if error is not None else "double backward failed on another rank")
        if self._hvp.backend != "fd":
            self._hvp = self._make_fd()
            out = self._hvp(vectors)
        assert out is not None
        return out


Agree = Callable[..., tuple[bool, ...]]


def _local_agree(*flags: bool) -> tuple[bool, ...]:
    return tuple(flags)


def build_product(
    hvp: str,
    loss_fn: Callable[..., Tensor],
    params: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None,
    before_forward: Callable[[], None],
    sharded: bool,
    max_abs: Callable[[Sequence[Tensor]], float],
    sq_norm: Callable[[Sequence[Tensor]], float] | None = None,
    suspects: Sequence[Tensor | None] | None = None,
    choice: BackendChoice | None = None,
    agree: Agree = _local_agree,
    loss_scale: float = 1.0,
) -> Any:
    """The product v ↦ H·v of ``hvp`` (see the module docs for ``"auto"``), ready to use.

    Raises:
        DoubleBackwardError: ``hvp="autograd"`` on a model without double backward.
        ForwardADError: ``hvp="forward"`` where forward-mode AD fails.
    """
    check_backend(hvp)
    choice = choice if choice is not None else BackendChoice()

    def fd() -> HVP:
        return make_fd_hvp(
            loss_fn,
            params,
            batches=batches,
            before_forward=before_forward,
            max_abs=max_abs,
            sq_norm=sq_norm,
            suspects=suspects,
            loss_scale=loss_scale,
        )

    if hvp == "fd":
        return fd()
    if sharded:  # "auto" (measure() refuses the other backends for sharded parameters)
        if choice.backend != "fd":
            choice.backend, choice.reason = "fd", "sharded (DTensor) parameters: FSDP2 has no double backward"
        return fd()
    if hvp == "forward":
        return make_forward_hvp(loss_fn, params, batches=batches, before_forward=before_forward)
    if hvp == "autograd":
        return make_hvp(loss_fn, params, batches=batches, before_forward=before_forward)
    if choice.backend == "fd":  # "auto", decided before
        return fd()
    try:
        return _AutoHVP(
            make_hvp(loss_fn, params, batches=batches, before_forward=before_forward), None, fd, choice, agree
        )
    except DoubleBackwardError as exc:  # the graph itself cannot be built: probe resolved at product 1
        return _AutoHVP(fd(), exc, fd, choice, agree)
