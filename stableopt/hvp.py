"""Hessian-vector products of a user's loss: the common product type and the ``"autograd"`` backend.

Every backend (``"autograd"`` here, ``"fd"`` in :mod:`stableopt.finite_difference`,
``"forward"`` in :mod:`stableopt.forward_ad`; :mod:`stableopt.backends` picks one) returns an
:class:`HVP`: a callable v ↦ H·v on tensors shaped like the parameters this process holds, with
the loss at the current parameters, a product count and the backend's name.

``make_hvp`` (double backward) evaluates the loss once, builds the gradient graph
(``create_graph=True``) and returns a function v ↦ H·v that back-propagates through that graph again for every product:
about 1.1–1.3 gradients per product on the benchmarks, against ~2.2 for a fresh forward and
backward per product and ~3.3 for ``torch.func`` forward-over-reverse on CPU (benchmarks/hvp.py).
With ``batches`` the Hessian is the batch-size-weighted mean of the per-batch Hessians, and each
product runs one forward and double backward per batch (memory of one batch at a time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "HVP",
    "DoubleBackwardError",
    "accumulate",
    "batch_size",
    "batch_weights",
    "check_loss",
    "hessian_vector_product",
    "make_hvp",
]

LossFn = Callable[..., Tensor]


def batch_size(batch: Any) -> int:
    """The number of samples in a batch: the leading dimension of its first tensor.

    Tensors, (nested) tuples/lists and dicts are searched in order.

    >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
    5
    """
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            raise ValueError("batches: a batch tensor must have a leading batch dimension, got a 0-dim tensor")
        return int(batch.shape[0])
    items: Iterable[Any] = ()
    if isinstance(batch, dict):
        items = batch.values()
    elif isinstance(batch, (tuple, list)):
        items = batch
    for item in items:
        try:
            return batch_size(item)
        except TypeError:
            continue
    raise TypeError(
        "batches: cannot tell the size of a batch of type "
        f"{type(batch).__name__}; expected a tensor, or a tuple/list/dict holding one"
    )


def check_loss(loss: Any, where: str, *, need_grad: bool = True) -> Tensor:
    """``loss`` as a 0-dim tensor, or a TypeError/ValueError saying what ``loss_fn`` returned."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} ({where})")
    if loss.numel() != 1:
        raise ValueError(
            f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)} ({where}); "
            "reduce it, e.g. with .mean()"
        )
    if loss.is_complex() or not loss.is_floating_point():
        raise TypeError(f"loss_fn must return a real floating-point tensor, got {loss.dtype} ({where})")
    if need_grad and not loss.requires_grad:
        raise ValueError(
            "loss_fn's loss does not depend on the optimizer's parameters (it does not require "
            f"grad) ({where}); compute it from the model inside loss_fn, with grad enabled"
        )
    return loss.reshape(())


def check_gradients(grads: Sequence[Tensor | None], where: str) -> None:
    """A ValueError if no gradient exists, a TypeError for sparse gradients."""
    if all(g is None for g in grads):
        raise ValueError(
            "loss_fn's loss does not depend on any of the optimizer's parameters "
            f"({where}); is loss_fn using the model this optimizer was built for?"
        )
    for g in grads:
        if g is not None and g.is_sparse:
            raise TypeError(
                "sparse gradients are not supported by Hessian-vector products "
                "(nn.Embedding(sparse=True)?); use dense gradients"
            )


class DoubleBackwardError(RuntimeError):
    """Double backward (``hvp="autograd"``) is not available through this model.

    Raised when differentiating the gradient graph fails: fused attention kernels without a
    second derivative, ``torch.compile``, custom ``@once_differentiable`` functions, FSDP2's
    resharded parameters. The message names the failing operation when torch does, and says to
    use ``hvp="fd"`` (or ``"auto"``), which needs only ordinary backward passes.
    """

    def __init__(self, cause: BaseException) -> None:
        self.cause = cause
        super().__init__(
            "stableopt: hvp='autograd' needs double backward (differentiating the gradient) "
            f"through the model, and torch could not do it: {type(cause).__name__}: {cause}. "
            "Use hvp='fd' (finite differences of gradients: ordinary backward passes only) or "
            "hvp='auto' (the default: double backward where it works, else 'fd')"
        )


#: The node torch puts where a ``@once_differentiable`` backward ran under ``create_graph``: its
#: outputs are cut from the parameters, so differentiating through it silently gives zero.
_CUT_NODE = "torch::autograd::Error"


def _check_differentiable(grads: Sequence[Tensor | None]) -> None:
    """DoubleBackwardError if the gradient graph goes through a ``@once_differentiable`` backward.

    torch only raises there when the cut-off outputs are differentiated directly; through a
    model it reports the parameters as unused and the second derivative comes out as zero, so
    the graph is searched for the node it leaves instead (one walk over the backward graph).
    """
    stack = [g.grad_fn for g in grads if g is not None and g.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.name() == _CUT_NODE:
            raise DoubleBackwardError(
                RuntimeError(
                    "the gradient goes through a custom autograd.Function whose backward is marked "
                    "@once_differentiable (a torch::autograd::Error node): torch cannot "
                    "differentiate it and would silently give a zero second derivative"
                )
            )
        stack.extend(fn for fn, _ in node.next_functions if fn is not None)


def _gradients(loss: Tensor, params: Sequence[Tensor], where: str) -> list[Tensor | None]:
    try:
        grads: list[Tensor | None] = list(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True))
    except (RuntimeError, NotImplementedError) as exc:
        raise DoubleBackwardError(exc) from exc
    check_gradients(grads, where)
    _check_differentiable(grads)
    return grads


def _double_backward(
    grads: Sequence[Tensor | None], params: Sequence[Tensor], vectors: Sequence[Tensor]
) -> list[Tensor | None]:
    idx = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    if not idx:  # the loss is linear in every parameter: H = 0
        return [None] * len(params)
    try:
        out = torch.autograd.grad(
            [g for i in idx if (g := grads[i]) is not None],  # every one (idx): mypy sees the filter
            params,
            grad_outputs=[vectors[i].to(grads[i].dtype) for i in idx],  # type: ignore[union-attr]
            retain_graph=True,
            allow_unused=True,
        )
    except (RuntimeError, NotImplementedError) as exc:
        raise DoubleBackwardError(exc) from exc
    return list(out)


@dataclass
class HVP:
    """v ↦ H·v for a fixed loss at fixed parameters; built by a backend (:func:`make_hvp`, ...).

    Attributes:
        params: the parameters differentiated with respect to.
        loss: the loss value at the current parameters (a detached float tensor).
        calls: how many products have been computed.
        samples: the number of samples in ``batches`` (None when built without batches).
        backend: ``"autograd"``, ``"fd"`` or ``"forward"``.
    """

    params: list[Tensor]
    loss: Tensor
    calls: int
    _apply: Callable[[Sequence[Tensor]], list[Tensor | None]]
    #: samples in ``batches`` (None without batches: unknown); weights ranks in distributed runs
    samples: int | None = None
    backend: str = "autograd"
    #: what an approximate backend did (``"fd"``: :class:`stableopt.finite_difference.FDStats`)
    stats: Any = None
    _error_pair: Callable[[Sequence[Tensor]], tuple[list[Tensor], list[Tensor]] | None] | None = None

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        """H·v for ``vectors`` shaped like (the local tensors of) ``params``; unused parameters
        give zeros."""
        self._check(vectors)
        self.calls += 1
        out = self._apply(vectors)
        return [torch.zeros_like(v) if o is None else o.to(v.dtype) for o, v in zip(out, vectors)]

    def _check(self, vectors: Sequence[Tensor]) -> None:
        if len(vectors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} vectors, one per parameter, got {len(vectors)}")

    def error_pair(self, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
        """Two estimates of H·v whose difference estimates the first one's error, or None for a
        backend whose products are exact up to rounding (``"autograd"``, ``"forward"``).

        ``"fd"`` returns the product at its current step and at half of it (two products).
        """
        if self._error_pair is None:
            return None
        self._check(vectors)
        self.calls += 2
        return self._error_pair(vectors)


def batch_weights(batches: Iterable[Any]) -> tuple[list[float], int]:
    """Per-batch weights n_b/N and the total N of a re-iterable of batches (TypeError/ValueError
    for one-shot iterators and empty data).

    >>> batch_weights([torch.zeros(1, 2), torch.zeros(3, 2)])
    ([0.25, 0.75], 4)
    """
    try:
        first_iter = iter(batches)
    except TypeError:
        raise TypeError(
            f"batches must be a re-iterable of batches (a list, tuple or DataLoader), got {type(batches).__name__}"
        ) from None
    if first_iter is batches:
        raise TypeError(
            "batches must be re-iterable (a list, tuple or DataLoader); got a one-shot "
            f"iterator of type {type(batches).__name__}: wrap it in list(...)"
        )
    sizes = [batch_size(b) for b in batches]
    total = sum(sizes)
    if total <= 0:
        raise ValueError(f"batches must hold at least one sample, got {len(sizes)} batches with {total} samples")
    return [n / total for n in sizes], total


def check_params(loss_fn: Any, params: Sequence[Tensor], who: str) -> list[Tensor]:
    """The parameters as a list, after checking ``loss_fn`` is callable and each requires grad."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    params = list(params)
    for p in params:
        if not p.requires_grad:
            raise ValueError(f"{who}: every parameter must have requires_grad=True")
    return params


def make_hvp(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None = None,
    before_forward: Callable[[], None] | None = None,
) -> HVP:
    """Build v ↦ H·v for ``loss_fn`` at the current ``params`` by double backward.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)`` with ``batches``) returns the scalar loss
            computed from ``params``.
        params: the tensors to differentiate with respect to (``requires_grad=True``).
        batches: optional re-iterable of batches; the Hessian is then the mean of the per-batch
            Hessians weighted by :func:`batch_size` (the full-data Hessian when ``loss_fn``
            returns per-batch means).
        before_forward: called before every evaluation of ``loss_fn`` (the sharpness module uses
            it to replay the same dropout masks in every product).

    The gradient graph of a single loss is built once and reused, and nothing is written to
    ``p.grad``. A custom ``autograd.Function`` whose backward is not itself differentiable must
    be marked ``@once_differentiable`` (then this raises); one that is not marked but calls
    ``.detach()`` or NumPy in its backward gets a silently truncated second derivative from
    torch, which no check can see: use the ``"fd"`` backend for such models.

    Raises:
        DoubleBackwardError: the model has no double backward (a ``RuntimeError``; use the
            ``"fd"`` backend, :func:`stableopt.finite_difference.make_fd_hvp`).

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> hvp = make_hvp(lambda: (w ** 3).sum(), [w])
    >>> hvp([torch.tensor([1.0, 1.0])])[0]   # H = diag(6w)
    tensor([ 6., 12.])
    """
    params = check_params(loss_fn, params, "make_hvp")
    call = before_forward or (lambda: None)

    if batches is None:
        with torch.enable_grad():
            call()
            loss = check_loss(loss_fn(), "loss_fn()")
            grads = _gradients(loss, params, "loss_fn()")

        def apply(vectors: Sequence[Tensor]) -> list[Tensor | None]:
            with torch.enable_grad():
                return _double_backward(grads, params, vectors)

        return HVP(params, loss.detach(), 0, apply)

    weights, total = batch_weights(batches)
    losses = []
    with torch.enable_grad():
        call()
        for i, batch in enumerate(batches):
            loss = check_loss(loss_fn(batch), f"loss_fn(batches[{i}])")
            losses.append(loss.detach() * weights[i])
    total_loss = torch.stack(losses).sum()

    def apply_batches(vectors: Sequence[Tensor]) -> list[Tensor | None]:
        acc: list[Tensor | None] = [None] * len(params)
        with torch.enable_grad():
            call()
            for i, batch in enumerate(batches):
                loss = check_loss(loss_fn(batch), f"loss_fn(batches[{i}])")
                grads = _gradients(loss, params, f"loss_fn(batches[{i}])")
                out = _double_backward(grads, params, vectors)
                del grads, loss
                accumulate(acc, out, weights[i])
        return acc

    return HVP(params, total_loss, 0, apply_batches, samples=total)


def accumulate(acc: list[Tensor | None], out: Sequence[Tensor | None], weight: float) -> None:
    """acc += weight · out, parameter by parameter (None is zero)."""
    for j, o in enumerate(out):
        if o is None:
            continue
        o = o * weight
        prev = acc[j]
        acc[j] = o if prev is None else prev.add_(o)


def hessian_vector_product(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None = None,
) -> list[Tensor]:
    """One product H·v by double backward (see :func:`make_hvp` to compute many at the cost of
    one graph, and :mod:`stableopt.backends` for the other backends).

    >>> x = torch.tensor(3.0, requires_grad=True)
    >>> hessian_vector_product(lambda: x ** 4, [x], [torch.tensor(1.0)])
    [tensor(108.)]
    """
    return make_hvp(loss_fn, params, batches=batches)(vectors)
