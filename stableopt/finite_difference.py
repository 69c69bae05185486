"""Hessian-vector products by central differences of gradients: the ``"fd"`` backend.

    H·x ≈ (∇L(θ + εx) − ∇L(θ − εx)) / 2ε

Only ordinary backward passes are needed, so this works wherever training works: fused and
flash attention kernels, ``torch.compile``, activation checkpointing, custom autograd functions
(``@once_differentiable``), FSDP2. A product costs two gradients.

**Step size.** Taylor expansion of the gradient gives the errors of one product, relative to
‖H·x‖:

* truncation (ε²/6)·∇³(∇L)[x, x, x] — O(ε²‖x‖²‖∇⁴L‖/‖H‖) for a smooth loss: a shorter step is
  more exact;
* kinks: with piecewise-linear activations (ReLU) the gradient jumps wherever θ ± εx moves a
  pre-activation across zero; the difference divides each jump by 2ε. The number of crossings
  grows with ε, so this error too grows with the step;
* rounding: θ ± εx is rounded to the parameter dtype (error u·|θ_i| per coordinate, u the
  machine epsilon) and each gradient carries its own rounding error δ, which the difference
  divides by ε — O(u‖θ‖∞/(ε‖x‖∞) + δ/(ε‖H·x‖)): a longer step is more exact.

For a smooth loss the first and last balance at ε ∝ u^{1/3}; the kinks of ReLU networks push
the best step lower. stableopt uses Andrei's (2009) rule for gradient-vector products,

    ε = √u · (1 + ‖θ‖∞) / ‖x‖∞,

so that no coordinate moves by more than √u·(1 + ‖θ‖∞): 1.5e-8 relative in float64 and 3.5e-4
in float32 (u = 2.2e-16 and 1.2e-7). Measured on the 14 tanh/ReLU test MLPs of
tests/test_backends.py (λ_max(P⁻¹H), the ratio and raw λ_max against dense Hessians): with
exponent 1/2 the worst relative error was 3.7e-5 in float32 and 3.3e-9 in float64; with 1/3 it
was 1e-10 in float64 but 6.7 (a 7× overestimate) on a float32 ReLU network, where the longer
step crossed kinks. The tests hold the backend to 2e-3 and 1e-6.

**Side effects.** The parameters are written in place (so that any model, compiled or sharded,
sees the perturbed values through its own code), and after every product they are copied back
from a snapshot taken when the backend is built: bit for bit what they were, with no drift from
θ + εx − εx. ``.grad`` is not touched: gradients come from ``torch.autograd.grad`` or, for
FSDP2 (DTensor) parameters, whose gradients only exist after FSDP's reduce-scatter, from
``backward()`` with every ``.grad`` put back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .hvp import HVP, accumulate, batch_weights, check_gradients, check_loss, check_params
from .space import is_dtensor, local_tensor

__all__ = ["FD_EXPONENT", "make_fd_hvp", "step_size"]

#: ε ∝ u^FD_EXPONENT (module docstring): 1/2 rather than the smooth-case optimum 1/3, because
#: ReLU kinks crossed by a longer step dominate the error in float32 (measured there).
FD_EXPONENT = 0.5

LossFn = Callable[..., Tensor]


def step_size(theta_max: float, x_max: float, dtype: torch.dtype) -> float:
    """The finite-difference step ε = √u·(1 + ‖θ‖∞)/‖x‖∞ for parameters of ``dtype``.

    >>> f"{step_size(0.0, 1.0, torch.float64):.3e}"
    '1.490e-08'
    >>> f"{step_size(1.0, 2.0, torch.float32):.3e}"
    '3.453e-04'
    """
    u = torch.finfo(dtype).eps
    return u**FD_EXPONENT * (1.0 + theta_max) / x_max


def _lowest_precision(tensors: Sequence[Tensor]) -> torch.dtype:
    return max((t.dtype for t in tensors), key=lambda d: torch.finfo(d).eps)


def _backward_gradients(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """∇loss by ``backward()`` (FSDP2 reduce-scatters it into ``.grad``), ``.grad`` restored."""
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        loss.backward()
        return [None if p.grad is None else local_tensor(p.grad) for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def make_fd_hvp(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None = None,
    before_forward: Callable[[], None] | None = None,
    max_abs: Callable[[Sequence[Tensor]], float] | None = None,
    loss_scale: float = 1.0,
) -> HVP:
    """Build v ↦ H·v for ``loss_fn`` at the current ``params`` by central differences of gradients.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)`` with ``batches``) returns the scalar loss.
        params: the parameters (``requires_grad=True``); DTensor (FSDP2) parameters take their
            gradients from ``backward()`` and their vectors are local shards.
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        before_forward: called before every evaluation of ``loss_fn`` (replays dropout masks).
        max_abs: ‖·‖∞ of a list of (local) tensors across every rank that holds a shard of them
            (default: this process's tensors are whole).
        loss_scale: multiplies the loss before ``backward()`` of sharded parameters (FSDP
            averages gradients over ranks; the measurement uses it to weight ranks by samples).

    Returns:
        An :class:`~stableopt.hvp.HVP` with ``backend="fd"``; its ``loss`` is evaluated at the
        unperturbed parameters (one forward pass without a graph).

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hvp = make_fd_hvp(lambda: (w ** 3).sum(), [w])
        >>> hvp([torch.tensor([1.0, 1.0], dtype=torch.float64)])[0].round(decimals=6)
        tensor([ 6., 12.], dtype=torch.float64)
    """
    params = check_params(loss_fn, params, "make_fd_hvp")
    call = before_forward or (lambda: None)
    sharded = any(is_dtensor(p) for p in params)
    locals_ = [local_tensor(p) for p in params]

    def norm_inf(tensors: Sequence[Tensor]) -> float:
        if max_abs is not None:
            return max_abs(tensors)
        return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)

    evaluations: list[tuple[Any, float, str]]
    samples = None
    if batches is None:
        evaluations = [((), 1.0, "loss_fn()")]
    else:
        weights, samples = batch_weights(batches)
        evaluations = [((b,), w, f"loss_fn(batches[{i}])") for i, (b, w) in enumerate(zip(batches, weights))]

    # the loss at θ itself, and the snapshot every product restores
    with torch.no_grad():
        call()
        losses = [check_loss(loss_fn(*args), where, need_grad=False).detach() * w for args, w, where in evaluations]
        theta0 = [t.detach().clone() for t in locals_]
    loss0 = torch.stack(losses).sum()
    u_dtype = _lowest_precision(locals_)
    theta_max = norm_inf(theta0)

    def gradient() -> list[Tensor | None]:
        acc: list[Tensor | None] = [None] * len(params)
        for args, w, where in evaluations:
            with torch.enable_grad():
                call()
                loss = check_loss(loss_fn(*args), where)
                if sharded:
                    grads = _backward_gradients(loss * (w * loss_scale), params)
                    w_out = 1.0
                else:
                    grads = list(torch.autograd.grad(loss, params, allow_unused=True))
                    w_out = w
            check_gradients(grads, where)
            accumulate(acc, [None if g is None else g.detach() for g in grads], w_out)
        return acc

    def place(vectors: Sequence[Tensor], eps: float) -> None:
        with torch.no_grad():
            for t, t0, x in zip(locals_, theta0, vectors):
                t.copy_(torch.add(t0, x.to(t0.dtype), alpha=eps))

    def restore() -> None:
        with torch.no_grad():
            for t, t0 in zip(locals_, theta0):
                t.copy_(t0)

    def apply(vectors: Sequence[Tensor]) -> list[Tensor | None]:
        x_max = norm_inf(vectors)
        if x_max == 0.0:
            return [None] * len(params)
        if not math.isfinite(x_max):
            return [torch.full_like(v, math.nan) for v in vectors]
        eps = step_size(theta_max, x_max, u_dtype)
        try:
            place(vectors, eps)
            plus = gradient()
            place(vectors, -eps)
            minus = gradient()
        finally:
            restore()
        out: list[Tensor | None] = []
        for a, b, v in zip(plus, minus, vectors):
            if a is None and b is None:
                out.append(None)
                continue
            a = torch.zeros_like(v) if a is None else a
            b = torch.zeros_like(v) if b is None else b
            out.append(a.sub(b).div_(2.0 * eps))
        return out

    return HVP(params, loss0, 0, apply, samples=samples, backend="fd")
