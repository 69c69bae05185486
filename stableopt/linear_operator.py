"""The interface every estimator works on: a symmetric linear operator on (possibly sharded) vectors.

:func:`stableopt.lanczos` and the estimators built on it take a :class:`LinearOperator`: its
size, dtype and device, the product ``matvec``, and the inner products ``dot``/``norm``/``inner``
and start vectors ``random`` of the space its vectors live in. :class:`stableopt.CurvatureOperator`
(from a measurement) is one whose vectors may be shards of a distributed vector, with reductions
across ranks; :class:`DenseOperator` wraps a plain function on whole vectors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DenseOperator", "LinearOperator", "Matvec"]

Matvec = Callable[[Tensor], Tensor]


@runtime_checkable
class LinearOperator(Protocol):
    """What an estimator needs of a symmetric operator (:class:`stableopt.CurvatureOperator` is one).

    Vectors are 1-D tensors of length ``local_size`` (this rank's shard; ``size`` in one
    process); ``dot``, ``norm`` and ``inner`` reduce over every rank that holds a shard.
    """

    size: int
    local_size: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, x: Tensor) -> Tensor: ...

    def dot(self, x: Tensor, y: Tensor) -> Tensor: ...

    def norm(self, x: Tensor) -> Tensor: ...

    def inner(self, block: Tensor, w: Tensor) -> Tensor: ...

    def random(self, generator: torch.Generator) -> Tensor: ...


class DenseOperator:
    """A plain matvec on whole vectors of length ``n`` as a :class:`LinearOperator`.

    >>> op = DenseOperator(lambda x: 2 * x, 3, torch.float64, torch.device("cpu"))
    >>> op.matvec(torch.ones(3, dtype=torch.float64)), round(float(op.norm(torch.ones(3))), 6)
    (tensor([2., 2., 2.], dtype=torch.float64), 1.732051)
    """

    def __init__(self, matvec: Matvec, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.matvec = matvec
        self.size = self.local_size = n
        self.dtype, self.device = dtype, device

    def dot(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.dot(x, y)

    def norm(self, x: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x)

    def inner(self, block: Tensor, w: Tensor) -> Tensor:
        return block @ w

    def random(self, generator: torch.Generator) -> Tensor:
        return torch.randn(self.size, generator=generator, dtype=self.dtype).to(self.device)
