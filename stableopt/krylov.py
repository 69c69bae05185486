"""Lanczos tridiagonalisation: the Krylov basis Q and T = QᵀAQ of a symmetric operator, for
quadrature (:mod:`stableopt.density`) and tracking (:mod:`stableopt.tracking`).

:func:`stableopt.lanczos` solves for the top eigenpairs and stops on their residuals; this
module runs a fixed number of steps and returns the whole recurrence: after m steps from a
unit q_1,

    A·Q = Q·T + β_m·q_{m+1}·e_mᵀ,

with T tridiagonal (α on the diagonal, β_1..β_{m−1} beside it). Every Ritz pair (θ, Q·s) of T
then has the residual ‖A·Q·s − θ·Q·s‖ = β_m·|s_m| exactly, and the Gauss quadrature of the
spectral measure of q_1 has nodes θ_j and weights s_{1j}² (Golub & Meurant, "Matrices, Moments
and Quadrature", 1994). The basis is reorthogonalised in full (classical Gram–Schmidt, twice),
so no spurious copies of converged Ritz values appear.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .linear_operator import LinearOperator

__all__ = ["Tridiagonal", "tridiagonalize"]

#: a step whose new residual is below this fraction of ‖A‖ (the largest |α|, β so far) found an
#: invariant subspace: T is then exact on it and the recurrence stops
BREAKDOWN = 1e-10


@dataclass(frozen=True)
class Tridiagonal:
    """The result of m Lanczos steps (see the module docs).

    Attributes:
        alphas: α_1..α_m (float64, CPU).
        betas: β_1..β_m (float64, CPU); β_j couples q_j and q_{j+1}, β_m is the residual norm.
        basis: Q as rows, shape ``(m, local_size)``.
        next: q_{m+1} (unit), or None after a breakdown (β_m ≈ 0: the space is invariant).
        finite: False when a product was not finite (nothing else is then valid).
    """

    alphas: Tensor
    betas: Tensor
    basis: Tensor
    next: Tensor | None
    finite: bool = True

    @property
    def steps(self) -> int:
        return int(self.alphas.numel())

    def matrix(self) -> Tensor:
        """T = QᵀAQ, m × m, float64 on the CPU."""
        off = self.betas[:-1]
        return torch.diag(self.alphas) + torch.diag(off, 1) + torch.diag(off, -1)


def tridiagonalize(op: LinearOperator, v0: Tensor, steps: int) -> Tridiagonal:
    """At most ``steps`` Lanczos steps on ``op`` from ``v0`` (one ``matvec`` each).

    Stops early at a breakdown (an invariant subspace) or a non-finite product.

    Example:
        >>> from stableopt import DenseOperator
        >>> A = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
        >>> op = DenseOperator(lambda x: A @ x, 3, torch.float64, torch.device("cpu"))
        >>> t = tridiagonalize(op, torch.ones(3, dtype=torch.float64), 5)
        >>> t.steps, [round(x, 8) for x in torch.linalg.eigvalsh(t.matrix()).tolist()]
        (3, [1.0, 2.0, 3.0])
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    steps = min(steps, op.size)
    q = v0 / op.norm(v0)
    basis = torch.empty((steps, q.numel()), dtype=q.dtype, device=q.device)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    nxt: Tensor | None = None
    for j in range(steps):
        basis[j] = q
        w = op.matvec(q).to(q.dtype)
        alpha_t = op.dot(q, w)
        block = basis[: j + 1]
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - block.T @ op.inner(block, w)
        alpha, beta = torch.stack([alpha_t, op.norm(w)]).tolist()  # one host sync per step
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            m = j + 1
            nan = torch.full((m,), math.nan, dtype=torch.float64)
            return Tridiagonal(nan, nan.clone(), basis[:m], None, finite=False)
        alphas.append(alpha)
        betas.append(beta)
        scale = max(scale, abs(alpha), beta)
        if beta <= BREAKDOWN * scale:
            nxt = None
            break
        q = w / beta
        nxt = q
    m = len(alphas)
    return Tridiagonal(
        torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64), basis[:m], nxt
    )
