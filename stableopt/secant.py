"""The secant estimate: the curvature along the update the optimizer took, every step, for free.

With ``secant=True`` the monitor also records, for every step, the curvature along the update
the optimizer actually took, from gradients the training loop computes anyway:

    s_t = Δθᵀ(g_t − g_{t−1}) / ΔθᵀPΔθ,     Δθ = θ_t − θ_{t−1},

with P the preconditioner of the step that made Δθ (plus the sign of ``maximize`` and λ‖Δθ‖²
for coupled weight decay, as in the measured Hessian). ``secant_ratio`` divides by
Σ_g τ_g·Δθ_gᵀP_gΔθ_g instead, so that 1 is the edge (``+inf`` when the step moved a group whose
threshold is ≤ 0, :mod:`stableopt.thresholds`). It is an *estimate*: for a full-batch loss,
Δg = H̄Δθ with H̄ the Hessian averaged along the step, so s_t is a Rayleigh quotient of P⁻¹H̄
and a lower bound on λ_max(P⁻¹H) (exact for a quadratic; near the edge the update oscillates
along the top eigenvector and the bound is tight). With mini-batches g_t and g_{t−1} come from
different batches and the difference is dominated by gradient noise: the numbers are then not
curvature and should not be read as such. Steps whose gradients are missing, sparse, computed
inside a ``step(closure)``, or not one step apart are skipped. It costs two copies of the
parameters and a few vector operations per step, so it is opt-in.

:class:`SecantTracker` is the step pre hook that ``opt.monitor(..., secant=True)`` registers; it
writes ``secant`` and ``secant_ratio`` into ``opt.history``. Its snapshot (θ_{t−1}, g_{t−1} and
the step it was taken at) is part of the optimizer's state dict, so a resumed run records the
first step after the resume as the uninterrupted run did.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._state import grad_disabled

__all__ = ["SecantTracker"]


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

    def state_dict(self) -> dict[str, Any] | None:
        """The snapshot (copies), or None before the first one: ``{"step", "theta", "grad"}``."""
        if self._theta is None or self._grad is None:
            return None
        return {
            "step": self._at,
            "theta": [t.detach().clone() for t in self._theta],
            "grad": [g.detach().clone() for g in self._grad],
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Take a snapshot back (checked by :func:`stableopt._checkpoint.check_secant_state`;
        None: forget it). Tensors are copied to each parameter's device and dtype."""
        if state is None:
            self._theta = self._grad = None
            self._at = -1
            return
        params = self._params()
        with torch.no_grad():
            self._theta = [t.to(device=p.device, dtype=p.dtype, copy=True) for t, p in zip(state["theta"], params)]
            self._grad = [g.to(device=p.device, dtype=p.dtype, copy=True) for g, p in zip(state["grad"], params)]
        self._at = state["step"]

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
        if not dtheta:
            return
        zero = torch.zeros((), dtype=torch.float64, device=dtheta[0].device)
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
                if tau == math.inf:  # lr 0: the group did not move (inf · 0 would be NaN)
                    tpden = torch.where(pden > 0, pden.double() * tau, zero)
                    sums.append(torch.stack([num.double(), pden.double(), tpden, zero]))
                elif tau > 0:
                    sums.append(torch.stack([num.double(), pden.double(), pden.double() * tau, zero]))
                else:  # a threshold <= 0 (τ·ΔθᵀPΔθ would be 0 or negative): its share of ΔθᵀPΔθ
                    sums.append(torch.stack([num.double(), pden.double(), zero, pden.double()]))
                i += 1
        num, den, tden, unstable = torch.stack(sums).sum(0).tolist()  # one device sync per step
        if den > 0 and math.isfinite(den) and math.isfinite(num):
            # the step moved a group with threshold <= 0: unstable at any curvature, ratio +inf
            ratio = math.inf if unstable > 0 else (num / tden if tden > 0 else math.nan)
            optimizer.history.append_secant(step, num / den, ratio)
