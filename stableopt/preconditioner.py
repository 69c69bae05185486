"""The diagonal preconditioner P that an optimizer's last step divided the gradient by.

Pure functions of one parameter's optimizer state and its param group, written with the same
tensor operations as torch's single-tensor code path so that P is the denominator the step used
(docs/science.md, "Preconditioners"):

* Adam / AdamW: P = √v̂ + ε with v̂ = v/(1 − β2ᵗ), v = ``exp_avg_sq`` (``max_exp_avg_sq`` with
  amsgrad); ε sits outside the root and η is not part of P.
* RMSprop: P = √v + ε (no bias correction); centered: P = √(v − ḡ²) + ε.
* SGD: P = I.

A parameter that has no state yet (it never received a gradient) has never been moved by the
optimizer; its P is +inf so that P⁻¹ = 0 freezes it in every preconditioned operator.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["adam_preconditioner", "identity_preconditioner", "rmsprop_preconditioner"]


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _frozen(param: Tensor) -> Tensor:
    return torch.full_like(param, float("inf"), memory_format=torch.contiguous_format)


def adam_preconditioner(param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """P = √v̂ + ε for ``torch.optim.Adam``/``AdamW`` (amsgrad: v = ``max_exp_avg_sq``).

    >>> p = torch.nn.Parameter(torch.ones(2))
    >>> opt = torch.optim.Adam([p], lr=0.1)
    >>> p.grad = torch.tensor([3.0, -4.0]); opt.step()
    >>> adam_preconditioner(p, opt.state[p], opt.param_groups[0])
    tensor([3.0000, 4.0000])
    """
    if "exp_avg_sq" not in state:
        return _frozen(param)
    step = _as_float(state["step"])
    beta2 = _as_float(group["betas"][1])
    v = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    return (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])


def rmsprop_preconditioner(param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """P = √v + ε for ``torch.optim.RMSprop``; centered: P = √(v − ḡ²) + ε.

    >>> p = torch.nn.Parameter(torch.ones(1))
    >>> opt = torch.optim.RMSprop([p], lr=0.1, alpha=0.75)
    >>> p.grad = torch.tensor([2.0]); opt.step()
    >>> rmsprop_preconditioner(p, opt.state[p], opt.param_groups[0])
    tensor([1.])
    """
    if "square_avg" not in state:
        return _frozen(param)
    square_avg = state["square_avg"]
    if group.get("centered", False):
        grad_avg = state["grad_avg"]
        avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
    else:
        avg = square_avg.sqrt()
    return avg.add_(group["eps"])


def identity_preconditioner(param: Tensor, state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """P = I for SGD (its gradient is not rescaled per coordinate).

    >>> identity_preconditioner(torch.zeros(3), {}, {})
    tensor([1., 1., 1.])
    """
    return torch.ones_like(param, memory_format=torch.contiguous_format)
