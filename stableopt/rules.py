"""Stability rules: everything stableopt knows about one optimizer's update rule, in one object.

A :class:`StabilityRule` answers, for one param group of one optimizer class, the questions that
sharpness measurements, the secant tracker and the lr guard ask (docs/science.md):

* ``preconditioner(param, state, group)``: the diagonal P the last step divided the gradient by;
* ``threshold(group, lr)``: the largest stable eigenvalue of P⁻¹H for that group at that lr;
* ``coupled_weight_decay(group)``: λ of decay *added to the gradient* (the Hessian that matters
  is then H + λI; decoupled decay changes the threshold instead);
* ``sign(group)``: −1 when the group maximizes (the descended objective is −L), else +1;
* ``transient_steps(group)``: steps at the start during which the long-run threshold does not
  apply yet (Adam's bias-correction transient, ⌈3/(1 − β1)⌉), 0 for rules without one;
* ``needs_state``: whether P is only defined once the optimizer has taken a step.

Each stableopt optimizer names its torch base class and its rule explicitly::

    class Adam(StabilityMixin, torch.optim.Adam, torch_class=torch.optim.Adam, rule=AdamRule()):
        ...

and a user can do the same for their own optimizer by subclassing :class:`StabilityRule`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from . import preconditioner as _pre
from . import thresholds as _thr

__all__ = ["ADAM_TRANSIENT", "AdamRule", "RMSpropRule", "SGDRule", "StabilityRule"]

#: Bias-correction transient of Adam in units of 1/(1 − β1) (docs/science.md caveat: the first
#: ~3/(1−β1) steps behave like preconditioned GD, threshold 2/η at step 1). After 3/(1−β1) steps
#: β1ᵗ < e⁻³ ≈ 0.05, so the bias-corrected momentum is within 5% of the EMA the long-run
#: threshold assumes.
ADAM_TRANSIENT = 3.0


def _float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


@dataclass(frozen=True)
class StabilityRule:
    """The stability facts of one update rule; subclass it for a new optimizer.

    The base class is the rule of plain (preconditioned) gradient descent: P = I, threshold
    2/η, coupled decay from ``group["weight_decay"]``, ``maximize`` flips the sign.

    Attributes:
        needs_state: P is only defined after the first ``step()`` (True for adaptive rules).
    """

    needs_state: bool = False

    def preconditioner(self, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
        """The diagonal P of ``param`` (``inf`` where the optimizer has not moved it yet)."""
        return _pre.identity_preconditioner(param, state, group)

    def threshold(self, group: Mapping[str, Any], lr: float) -> float:
        """The threshold of ``group`` on λ_max(P⁻¹H) when its step uses learning rate ``lr``."""
        return _thr.gd_threshold(lr)

    def coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        """λ of the weight decay added to the gradient (the measured Hessian is H + λI)."""
        return _float(group.get("weight_decay", 0.0))

    def sign(self, group: Mapping[str, Any]) -> float:
        """−1.0 when ``group`` maximizes, else +1.0."""
        return -1.0 if group.get("maximize", False) else 1.0

    def transient_steps(self, group: Mapping[str, Any]) -> int:
        """Steps from the start during which :meth:`threshold` is not yet the rule's edge."""
        return 0

    def floor(self, group: Mapping[str, Any]) -> float:
        """The smallest P the rule can produce (Adam's and RMSprop's ``eps``; 0 for P = I).

        A coordinate whose P sits at this floor had gradients below it all along: if the loss
        does not depend on it, its P^{-1/2} would magnify the rounding noise of approximate
        (``"fd"``) products into eigenvalues, so measurements check such coordinates.
        """
        return 0.0


@dataclass(frozen=True)
class AdamRule(StabilityRule):
    """``torch.optim.Adam``/``AdamW``: P = √v̂ + ε, threshold (2 + 2β1)/((1 − β1)η).

    With decoupled decay (AdamW, or Adam's ``decoupled_weight_decay=True``) the threshold is
    (1 + β1)(2 − ηλ)/((1 − β1)η) and nothing is added to H; with coupled decay H + λI.

    Attributes:
        decoupled: the default of ``decoupled_weight_decay`` when a group does not say
            (True for AdamW).

    >>> import torch
    >>> rule = AdamRule()
    >>> round(rule.threshold({"betas": (0.9, 0.999), "weight_decay": 0.0}, 1e-3))
    38000
    >>> rule.transient_steps({"betas": (0.9, 0.999)})
    30
    """

    needs_state: bool = True
    decoupled: bool = False

    def preconditioner(self, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
        return _pre.adam_preconditioner(param, state, group)

    def is_decoupled(self, group: Mapping[str, Any]) -> bool:
        """Whether ``group``'s weight decay is decoupled (multiplies θ) rather than added to g."""
        return bool(group.get("decoupled_weight_decay", self.decoupled))

    def threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.adam_threshold(
            lr,
            _float(group["betas"][0]),
            weight_decay=_float(group.get("weight_decay", 0.0)),
            decoupled=self.is_decoupled(group),
        )

    def coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        return 0.0 if self.is_decoupled(group) else _float(group.get("weight_decay", 0.0))

    def floor(self, group: Mapping[str, Any]) -> float:
        return _float(group.get("eps", 0.0))

    def transient_steps(self, group: Mapping[str, Any]) -> int:
        beta1 = _float(group["betas"][0])
        if not beta1 < 1.0:
            return 0
        return math.ceil(ADAM_TRANSIENT / (1.0 - beta1) - 1e-9)  # 3/0.1 = 30.000000000000004


@dataclass(frozen=True)
class RMSpropRule(StabilityRule):
    """``torch.optim.RMSprop``: P = √v + ε (centered: √(v − ḡ²) + ε), threshold 2/η or
    (2 + 2μ)/η with momentum μ; coupled decay adds λI to H."""

    needs_state: bool = True

    def preconditioner(self, param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
        return _pre.rmsprop_preconditioner(param, state, group)

    def threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.rmsprop_threshold(lr, _float(group.get("momentum", 0.0)))

    def floor(self, group: Mapping[str, Any]) -> float:
        return _float(group.get("eps", 0.0))


@dataclass(frozen=True)
class SGDRule(StabilityRule):
    """``torch.optim.SGD``: P = I, threshold 2/η, heavy ball (2 + 2μ)/((1 − d)η), Nesterov
    (2 + 2μ)/((1 + 2μ)η); defined before the first step."""

    def threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return _thr.sgd_threshold(
            lr,
            _float(group.get("momentum", 0.0)),
            _float(group.get("dampening", 0.0)),
            bool(group.get("nesterov", False)),
        )
