"""The measurement seam: a context that turns (param groups, loss, HVP backend) into operators.

::

    with stableopt.measure(loss_fn, groups, hvp="auto") as m:      # or opt.measure(loss_fn)
        op = m.operator("preconditioned")                          # P^{-1/2}·H·P^{-1/2}
        result = stableopt.lanczos(op, k=1, tol=1e-3, generator=g)

Inside :func:`measure` everything a measurement must guarantee holds, once, for every
estimator: RNG streams and module buffers are restored on exit and dropout masks are replayed
in every product (:mod:`stableopt._state`); low-precision parameters are measured in float32
(:mod:`stableopt._precision`); DDP modules run as in ``no_sync()`` and products are reduced
across ranks with an agreed failure at every product (:mod:`stableopt.distributed`); FSDP2
shards are handled by the vector space (:mod:`stableopt.space`). What it yields is a
:class:`Measurement`, whose :meth:`~Measurement.operator` gives :class:`CurvatureOperator`\\ s:

* ``"preconditioned"``: D·(s·H + Λ)·D with D = P^{-1/2} (eigenvalues of P⁻¹H);
* ``"ratio"``: D = (τ·P)^{-1/2} per coordinate (its λ_max is the dimensionless edge ratio);
* ``"raw"``: s·H + Λ,

where s = −1 under ``maximize`` and Λ = λI on groups with coupled weight decay: the Hessian
of the objective the optimizer descends (docs/science.md). An operator knows its size, dtype,
device, how to multiply (``matvec``), inner products and norms (all-reduced when the
parameters are sharded), start vectors, and how many products the measurement has used;
estimators (:func:`stableopt.lanczos`, ...) need nothing else and know nothing of optimizers,
backends or ranks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import _precision
from . import distributed as _dist
from ._state import preserved_training_state
from .backends import BackendChoice, build_product, check_backend
from .hvp import DoubleBackwardError, batch_weights
from .space import ParameterSpace, is_dtensor

__all__ = ["KINDS", "BlockOperator", "CurvatureOperator", "Measurement", "MeasuredGroup", "ProductCheck", "measure"]

#: the operators a measurement provides (see the module docs)
KINDS = ("preconditioned", "ratio", "raw")
#: P within this factor of the rule's floor counts as "at the floor" (√v̂ ≤ 3·eps for Adam)
FLOOR_FACTOR = 4.0


@dataclass(frozen=True)
class MeasuredGroup:
    """One param group as a measurement sees it (:class:`stableopt.SharpnessGroup` is this).

    Attributes:
        params: the group's parameters that require grad.
        preconditioner: the diagonal P of each parameter (``inf`` for a frozen one).
        threshold: the group's stability threshold τ on P⁻¹H (see :mod:`stableopt.thresholds`).
        sign: −1 when the optimizer maximizes, else +1.
        weight_decay: coupled weight decay λ (adds λI to the Hessian); 0 for decoupled decay.
        floor: the smallest P the rule produces (Adam's ``eps``; 0 for none,
            :meth:`stableopt.rules.StabilityRule.floor`): coordinates at it are checked for
            not affecting the loss before approximate products use them.
    """

    params: Sequence[Tensor]
    preconditioner: Sequence[Tensor]
    threshold: float
    sign: float = 1.0
    weight_decay: float = 0.0
    floor: float = 0.0


def _compute_dtype(params: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _check_groups(groups: Sequence[MeasuredGroup]) -> tuple[list[Tensor], float]:
    params = [p for g in groups for p in g.params]
    if not params:
        raise ValueError("there is no parameter with requires_grad=True to measure")
    for p in params:
        if p.is_complex():
            raise TypeError(f"complex parameters are not supported, got a parameter of dtype {p.dtype}")
        if p.grad is not None and p.grad.is_sparse:
            raise TypeError("sparse gradients are not supported (nn.Embedding(sparse=True)?); use dense gradients")
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"all parameters must be on one device, got {sorted(map(str, devices))}")
    signs = {float(g.sign) for g in groups if len(g.params)}
    if len(signs) > 1:
        raise ValueError(
            "param groups mix maximize=True and maximize=False; the update Jacobian is then not "
            "symmetric and has no edge-of-stability threshold"
        )
    return params, signs.pop()


@dataclass(frozen=True)
class ProductCheck:
    """Two Rayleigh quotients of a vector x under approximate products (:meth:`CurvatureOperator.check`).

    Attributes:
        coarse: xᵀAx/xᵀx with products at the backend's step.
        fine: the same at half the step (``"fd"``: a quarter of the truncation error).
        residual: ‖A·x − fine·x‖/‖x‖ with the fine products (absolute).
        spread: ‖A_coarse·x − A_fine·x‖/‖x‖, the two products' difference as vectors (absolute):
            it bounds how far the products' error can move any eigenvalue near ``fine``, where
            the quotients' difference can be small by chance (rounding noise orthogonal to x).
    """

    coarse: float
    fine: float
    residual: float
    spread: float = 0.0


class CurvatureOperator:
    """x ↦ D·(s·H + Λ)·D·x on the measured parameters, as a flat (local) vector.

    Attributes:
        kind: ``"preconditioned"``, ``"ratio"`` or ``"raw"``.
        size: the dimension n (global: all shards together).
        local_size: the length of the vectors this rank holds.
        dtype, device: of the vectors.
    """

    def __init__(self, measurement: Measurement, kind: str, d: Tensor | None) -> None:
        self._m = measurement
        self.kind = kind
        self._d = d
        space = measurement.space
        self.space = space
        self.size, self.local_size = space.size, space.local_size
        self.dtype, self.device = space.dtype, space.device

    def matvec(self, x: Tensor) -> Tensor:
        """The product with a 1-D (local) vector ``x``; one Hessian-vector product."""
        m, d = self._m, self._d
        u = x if d is None else d * x
        y = m.space.flatten(m.product(m.space.unflatten(u)))
        if m.sign != 1.0:
            y = y.mul_(m.sign)
        if m.decay is not None:
            y = y.add_(m.decay * u)
        return y if d is None else y.mul_(d)

    __call__ = matvec

    def dot(self, x: Tensor, y: Tensor) -> Tensor:
        """xᵀy (all-reduced when sharded), a 0-dim tensor."""
        return self.space.dot(x, y)

    def norm(self, x: Tensor) -> Tensor:
        """‖x‖₂ (all-reduced when sharded), a 0-dim tensor."""
        return self.space.norm(x)

    def inner(self, block: Tensor, w: Tensor) -> Tensor:
        """``block @ w`` for a 2-D block of vectors (all-reduced when sharded)."""
        return self.space.inner(block, w)

    def random(self, generator: torch.Generator) -> Tensor:
        """A standard normal vector (this rank's shard of it) drawn from ``generator``."""
        return self.space.random(generator)

    def start(self, v0: Tensor | None, generator: torch.Generator) -> tuple[Tensor, bool]:
        """The start vector every rank uses (``v0``, or a random one) and whether it is cold."""
        red = self._m.reduction
        if red is None:
            return (self.random(generator), True) if v0 is None else (v0, False)
        return red.start_vector(v0, lambda: self.random(generator))

    @property
    def products(self) -> int:
        """Hessian-vector products the measurement has computed so far (all its operators)."""
        return self._m.products

    def check(self, x: Tensor) -> ProductCheck | None:
        """The Rayleigh quotient of ``x`` from the backend's two products along it (at its step
        and at half of it: :meth:`stableopt.hvp.HVP.error_pair`) and the residual of the finer
        one, or None for a backend whose products are exact up to rounding. Two products.
        """
        m = self._m
        u = x if self._d is None else self._d * x
        pair = m.product.error_pair(m.space.unflatten(u))
        if pair is None:
            return None
        xx = max(float(m.space.dot(x, x)), 1e-300)

        def apply(hu: Sequence[Tensor]) -> Tensor:  # this operator's product from the backend's H·u
            y = m.space.flatten(hu).mul_(m.sign)
            if m.decay is not None:
                y = y.add_(m.decay * u)
            return y if self._d is None else y.mul_(self._d)

        coarse, fine = apply(pair[0]), apply(pair[1])
        rq_coarse, rq_fine = float(m.space.dot(x, coarse)) / xx, float(m.space.dot(x, fine)) / xx
        spread = float(m.space.norm(coarse.sub_(fine))) / xx**0.5
        residual = float(m.space.norm(fine.sub_(x, alpha=rq_fine))) / xx**0.5
        return ProductCheck(rq_coarse, rq_fine, residual, spread)

    @property
    def loss(self) -> float:
        return self._m.loss

    @property
    def backend(self) -> str:
        return self._m.backend

    def restrict(self, indices: Sequence[int]) -> BlockOperator:
        """The diagonal block of this operator on the space's parameters at ``indices``.

        x_b ↦ (A·[x_b; 0])_b: for ``"preconditioned"`` that is P_b^{-1/2}·(s·H_bb + Λ_b)·P_b^{-1/2},
        the curvature of the block with everything else held fixed. Each product is one
        Hessian-vector product of the whole model (zeros outside the block).
        """
        return BlockOperator(self, indices)

    def __repr__(self) -> str:
        return f"CurvatureOperator(kind={self.kind!r}, size={self.size}, dtype={self.dtype}, backend={self.backend!r})"


class BlockOperator(CurvatureOperator):
    """The restriction of a :class:`CurvatureOperator` to some of its parameters (a diagonal block).

    Its vectors are the block's (local) coordinates; inner products, norms and start vectors are
    those of the block's own :class:`~stableopt.space.ParameterSpace`, so shards work as for the
    whole operator.

    Attributes:
        parent: the operator restricted.
        indices: the positions of the block's parameters in the parent's space.
    """

    def __init__(self, parent: CurvatureOperator, indices: Sequence[int]) -> None:
        idx = [int(i) for i in indices]
        count = len(parent.space.params)
        if not idx or len(set(idx)) != len(idx) or not all(0 <= i < count for i in idx):
            raise ValueError(
                f"indices must be distinct positions in 0..{count - 1} of the space's parameters, got {list(indices)!r}"
            )
        self.parent, self.indices = parent, tuple(idx)
        self._m, self.kind, self._d = parent._m, parent.kind, None
        space = parent.space
        self.space = ParameterSpace([space.params[i] for i in idx], space.dtype)
        self.size, self.local_size = self.space.size, self.space.local_size
        self.dtype, self.device = space.dtype, space.device
        offsets = [0]
        for n in space.numels:
            offsets.append(offsets[-1] + n)
        self._ranges = [(offsets[i], offsets[i + 1]) for i in idx]

    def _embed(self, x: Tensor) -> Tensor:
        full = x.new_zeros(self.parent.local_size)
        at = 0
        for a, b in self._ranges:
            full[a:b] = x[at : at + b - a]
            at += b - a
        return full

    def matvec(self, x: Tensor) -> Tensor:
        """The block's product with ``x``: one Hessian-vector product of the whole model."""
        y = self.parent.matvec(self._embed(x))
        return torch.cat([y[a:b] for a, b in self._ranges])

    def check(self, x: Tensor) -> ProductCheck | None:
        """:meth:`CurvatureOperator.check` of the block's vector (zeros outside it)."""
        return self.parent.check(self._embed(x))

    __call__ = matvec

    def __repr__(self) -> str:
        return f"BlockOperator(kind={self.kind!r}, parameters={list(self.indices)}, size={self.size}, backend={self.backend!r})"


class Measurement:
    """What :func:`measure` yields: the measured space, the product, and operators built on them.

    Attributes:
        groups: the param groups measured.
        space: the :class:`~stableopt.space.ParameterSpace` of their parameters.
        sign: −1.0 under ``maximize``, else +1.0.
        reduction: the distributed reduction (None in one process).
        loss: the loss at the measured parameters (reduced across ranks).
    """

    def __init__(
        self, groups: Sequence[MeasuredGroup], space: ParameterSpace, product: Any, sign: float, reduction: Any
    ) -> None:
        self.groups = list(groups)
        self.space = space
        self.product = product
        self.sign = sign
        self.reduction = reduction
        self.loss = float(product.loss)
        counts = [len(g.params) for g in self.groups]
        decay = [float(g.weight_decay) for g in self.groups]
        self.decay = space.full(decay, counts) if any(decay) else None
        self._counts = counts
        self._precond: Tensor | None = None

    @property
    def backend(self) -> str:
        """The HVP backend the products use (``"autograd"``, ``"fd"`` or ``"forward"``)."""
        return str(self.product.backend)

    @property
    def products(self) -> int:
        return int(self.product.calls)

    def preconditioner(self) -> Tensor:
        """P of every measured coordinate, flat (local)."""
        if self._precond is None:
            self._precond = self.space.flatten([_local(P) for g in self.groups for P in g.preconditioner])
        return self._precond

    def thresholds(self) -> Tensor:
        """τ of every measured coordinate, flat (local)."""
        return self.space.full([g.threshold for g in self.groups], self._counts)

    def operator(self, kind: str = "preconditioned") -> CurvatureOperator:
        """The operator ``kind`` (one of :data:`KINDS`, see the module docs)."""
        if kind == "preconditioned":
            return CurvatureOperator(self, kind, self.preconditioner().rsqrt())
        if kind == "ratio":
            return CurvatureOperator(self, kind, (self.thresholds() * self.preconditioner()).rsqrt())
        if kind == "raw":
            return CurvatureOperator(self, kind, None)
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def agree_seconds(self, seconds: float) -> float:
        """Distributed: the slowest rank's seconds, so every rank reports identical numbers."""
        return seconds if self.reduction is None else self.reduction.agree_seconds(seconds)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


@contextlib.contextmanager
def measure(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    *,
    batches: Iterable[Any] | None = None,
    hvp: str = "auto",
    choice: BackendChoice | None = None,
    fingerprint: Mapping[str, float] | None = None,
) -> Iterator[Measurement]:
    """Measure the Hessian of ``loss_fn`` at the current parameters of ``groups``.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)``) returning the scalar loss through the
            parameters in ``groups``.
        groups: the param groups, with their preconditioners, thresholds, sign and decay.
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        hvp: the Hessian-vector-product backend (:mod:`stableopt.backends`).
        choice: where ``hvp="auto"`` keeps its decision between measurements.
        fingerprint: distributed runs: values every rank must agree on (the estimator's
            arguments); checked with one collective before anything else.

    Yields:
        A :class:`Measurement`. On exit parameters, ``.grad``, RNG streams and module buffers
        are as they were.

    Example:
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> H = torch.tensor([[4.0, 1.0], [1.0, 2.0]])
        >>> g = MeasuredGroup([w], [torch.ones(2)], threshold=2.0)
        >>> with measure(lambda: 0.5 * w @ H @ w, [g]) as m:
        ...     op = m.operator("raw")
        ...     op.matvec(torch.tensor([1.0, 0.0]))
        tensor([4., 1.])
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_backend(hvp)
    params, sign = _check_groups(groups)
    space = ParameterSpace(params, _compute_dtype(params))
    if space.sharded and hvp not in ("auto", "fd"):  # before any collective: every rank raises
        raise DoubleBackwardError(
            RuntimeError(
                f"hvp={hvp!r} cannot measure sharded (DTensor, FSDP2) parameters: FSDP reshards "
                "them after forward, so a graph never holds the parameters themselves"
            )
        )
    red = _dist.Reduction.begin(params, sharded=space.sharded, group=space.group)
    with contextlib.ExitStack() as stack:
        if red is not None:
            stack.callback(red.close)
            agreed = {"number of parameters": space.size, "batches given": batches is not None, **(fingerprint or {})}
            if space.sharded and batches is not None:  # FSDP: the same passes (collectives) everywhere
                agreed["number of batches (FSDP runs one forward per batch on every rank)"] = len(
                    batch_weights(batches)[0]
                )
            red.check(agreed, params)
        yield from _measure(loss_fn, groups, space, sign, red, batches, hvp, choice)


def _measure(
    loss_fn: Callable[..., Tensor],
    groups: Sequence[MeasuredGroup],
    space: ParameterSpace,
    sign: float,
    red: Any,
    batches: Iterable[Any] | None,
    hvp: str,
    choice: BackendChoice | None,
) -> Iterator[Measurement]:
    params = space.params
    loss_scale = 1.0
    if red is not None and space.sharded:
        loss_scale = red.loss_scale(batch_weights(batches)[1] if batches is not None else None)
    agree = red.any if red is not None else (lambda *flags: tuple(flags))
    replicated = [p for p in params if not is_dtensor(p)]

    def max_abs(tensors: Sequence[Tensor]) -> float:
        return space.max_abs(torch.cat([t.detach().reshape(-1).to(space.dtype) for t in tensors]))

    # coordinates whose P sits at the rule's floor: fd checks that the loss depends on them
    at_floor = [None if g.floor <= 0 else _local(P) <= FLOOR_FACTOR * g.floor for g in groups for P in g.preconditioner]

    def sq_norm(tensors: Sequence[Tensor]) -> float:
        flat = torch.cat([t.detach().reshape(-1).to(space.dtype) for t in tensors])
        return float(space.dot(flat, flat))

    with (
        warnings.catch_warnings(),
        preserved_training_state() as rng,
        _dist.quiet_ddp(),
        _precision.float32_measurement(replicated) as upcast,
    ):
        # the global hooks above also fire for torch.compile's wrapper module, harmlessly (they
        # record a module once and restore symmetrically); torch warns about it on every call
        warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global hooks")

        def build() -> Any:
            return _precision.explained(
                upcast,
                lambda: build_product(
                    hvp,
                    loss_fn,
                    params,
                    batches=batches,
                    before_forward=rng.restore,
                    sharded=space.sharded,
                    max_abs=max_abs,
                    sq_norm=sq_norm,
                    suspects=at_floor if any(c is not None for c in at_floor) else None,
                    choice=choice,
                    agree=agree,
                    loss_scale=loss_scale,
                ),
            )

        product = build() if red is None else red.first_evaluation(build)
        yield Measurement(groups, space, product, sign, red)
