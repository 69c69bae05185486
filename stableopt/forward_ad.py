"""Hessian-vector products by forward-over-reverse differentiation: the ``"forward"`` backend.

    H·v = d/dt ∇L(θ + t·v) at t = 0 = ``torch.func.jvp(torch.func.grad(L), (θ,), (v,))``

computed exactly (no step size), with one forward-mode pass over a reverse-mode gradient per
product. ``loss_fn`` is an ordinary closure over the user's model, so the parameters are swapped
into the modules that own them with :func:`torch.func.functional_call`: the owners are found by
watching which modules run during one evaluation of ``loss_fn``.

Supported where the model supports forward-mode AD inside ``torch.func`` transforms; not, for
example, through modules that update buffers in place during the forward (BatchNorm in training
mode), ``nn.MSELoss`` in some torch versions (pytorch issue 123996), parameters used outside any
``nn.Module``, or FSDP2. Those raise a ``RuntimeError`` that says to use ``hvp="fd"``. On CPU it
is the slowest backend (about 3.3 gradients per product against 1.1–1.3 for ``"autograd"``,
benchmarks/hvp.py); it is exact where ``"fd"`` is approximate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .hvp import HVP, accumulate, batch_weights, check_loss, check_params

__all__ = ["ForwardADError", "make_forward_hvp"]

LossFn = Callable[..., Tensor]


class ForwardADError(RuntimeError):
    """The ``"forward"`` backend cannot differentiate this model (the message says why)."""


class _Owners(nn.Module):
    """The modules that own the measured parameters, as children ``m0, m1, ...`` of one root
    whose forward is the user's ``loss_fn`` (so ``functional_call`` can swap their parameters)."""

    def __init__(self, modules: Sequence[nn.Module], loss_fn: LossFn) -> None:
        super().__init__()
        for i, module in enumerate(modules):
            self.add_module(f"m{i}", module)
        self._loss_fn = loss_fn

    def forward(self, *args: Any) -> Tensor:
        return self._loss_fn(*args)


def _find_owners(params: Sequence[Tensor], evaluate: Callable[[], Any]) -> tuple[list[nn.Module], list[list[str]]]:
    """Run ``evaluate()`` while recording the modules that hold one of ``params`` directly."""
    wanted = {id(p) for p in params}
    seen: dict[int, nn.Module] = {}

    def record(module: nn.Module, args: Any) -> None:
        if id(module) not in seen and any(id(p) in wanted for p in module._parameters.values() if p is not None):
            seen[id(module)] = module

    handle = nn.modules.module.register_module_forward_pre_hook(record)
    try:
        evaluate()
    finally:
        handle.remove()
    modules = list(seen.values())
    names: list[list[str]] = [[] for _ in params]
    index = {id(p): i for i, p in enumerate(params)}
    for m, module in enumerate(modules):
        for name, p in module._parameters.items():
            if p is not None and id(p) in index:
                names[index[id(p)]].append(f"m{m}.{name}")
    missing = [i for i, n in enumerate(names) if not n]
    if missing:
        raise ForwardADError(
            f"stableopt: hvp='forward' swaps parameters into the nn.Modules that own them, and "
            f"{len(missing)} of the measured parameters (e.g. one of shape "
            f"{tuple(params[missing[0]].shape)}) belong to no module that loss_fn ran; use "
            "hvp='fd' or hvp='autograd' for parameters used outside modules"
        )
    return modules, names


def make_forward_hvp(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None = None,
    before_forward: Callable[[], None] | None = None,
) -> HVP:
    """Build v ↦ H·v for ``loss_fn`` at the current ``params`` by ``torch.func`` jvp over grad.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)`` with ``batches``) returns the scalar loss
            through ``nn.Module``\\ s that own ``params``.
        params: the parameters (``requires_grad=True``).
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        before_forward: called before every evaluation of ``loss_fn``.

    Raises:
        ForwardADError: a parameter is not owned by a module ``loss_fn`` runs, or forward-mode
            AD fails through the model (a ``RuntimeError``; the message says to use ``"fd"``).

    >>> lin = torch.nn.Linear(2, 1, bias=False, dtype=torch.float64)
    >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    >>> hvp = make_forward_hvp(lambda: (lin(x) ** 2).sum(), list(lin.parameters()))
    >>> hvp([torch.tensor([[1.0, 0.0]], dtype=torch.float64)])[0]   # H = 2·xᵀx
    tensor([[2., 4.]], dtype=torch.float64)
    """
    params = check_params(loss_fn, params, "make_forward_hvp")
    call = before_forward or (lambda: None)
    evaluations: list[tuple[tuple[Any, ...], float, str]]
    samples = None
    if batches is None:
        evaluations = [((), 1.0, "loss_fn()")]
    else:
        weights, samples = batch_weights(batches)
        evaluations = [((b,), w, f"loss_fn(batches[{i}])") for i, (b, w) in enumerate(zip(batches, weights))]

    losses: list[Tensor] = []

    def first() -> None:
        with torch.no_grad():
            call()
            for args, w, where in evaluations:
                losses.append(check_loss(loss_fn(*args), where, need_grad=False).detach() * w)

    modules, names = _find_owners(params, first)
    root = _Owners(modules, loss_fn)

    def loss_at(flat: tuple[Tensor, ...], args: tuple[Any, ...]) -> Tensor:
        mapping = {name: t for t, ns in zip(flat, names) for name in ns}
        call()
        # every module that owns a parameter directly is named in mapping, so a tied parameter is
        # swapped at each of its places; torch's own tie detection would ask for the other paths
        return torch.func.functional_call(root, mapping, args, strict=False, tie_weights=False).reshape(())

    def apply(vectors: Sequence[Tensor]) -> list[Tensor | None]:
        primals = tuple(p.detach() for p in params)
        tangents = tuple(v.to(p.dtype) for v, p in zip(vectors, params))
        acc: list[Tensor | None] = [None] * len(params)
        for args, w, _where in evaluations:
            grad_fn = torch.func.grad(lambda *flat, args=args: loss_at(flat, args), argnums=tuple(range(len(params))))
            try:
                with torch.enable_grad():
                    out = torch.func.jvp(grad_fn, primals, tangents)[1]
            except (RuntimeError, NotImplementedError) as exc:
                raise ForwardADError(
                    "stableopt: hvp='forward' (torch.func jvp over grad) failed through the model: "
                    f"{type(exc).__name__}: {exc}. Use hvp='fd' (finite differences of gradients) "
                    "or hvp='auto'"
                ) from exc
            accumulate(acc, list(out), w)
        return acc

    return HVP(params, torch.stack(losses).sum(), 0, apply, samples=samples, backend="forward")
