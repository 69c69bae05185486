"""Stochastic trace estimation of a symmetric operator: Hutchinson and Hutch++.

* **Hutchinson** (1989): tr(A) ≈ (1/m)·Σ_j g_jᵀ·A·g_j with Rademacher probes g_j (entries ±1);
  unbiased, variance 2·(‖A‖_F² − Σ_i A_ii²)/m per probe budget m.
* **Hutch++** (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation",
  SOSA 2021): spend a third of the m products on a sketch Q = orth(A·S) of the top of the
  spectrum, a third on its exact part tr(QᵀAQ), and the rest on Hutchinson on the deflated
  remainder (I − QQᵀ)·A·(I − QQᵀ). For the spectra of Hessians — a few large eigenvalues over a
  bulk near zero — the remainder is small and the error falls as 1/m instead of 1/√m.

Both take a :class:`~stableopt.linear_operator.LinearOperator` and use only its ``matvec``,
inner products and start vectors, so they work on sharded (FSDP) vectors. Rademacher probes are
the signs of ``op.random`` (a standard normal vector drawn one parameter at a time from the
caller's generator), so a sharded run draws the same probes as one process. ``stderr`` is the
standard error of the stochastic part (from the spread of its per-probe values; NaN with one
probe). When the budget covers the space (m ≥ n) Hutch++ computes the trace exactly from n
products with an orthonormal basis, with ``stderr`` 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .linear_operator import LinearOperator

__all__ = [
    "METHODS",
    "MeasurementInfo",
    "TraceEstimate",
    "TraceReport",
    "hutch_plus_plus",
    "hutchinson",
    "orthonormalize",
    "rademacher",
]

#: what ``method=`` accepts
METHODS = ("hutch++", "hutchinson")


@dataclass(frozen=True)
class TraceEstimate:
    """What an estimator found: ``trace``, its ``stderr``, and the products ``hvps`` it used."""

    trace: float
    stderr: float
    hvps: int
    method: str


@dataclass(frozen=True, kw_only=True)
class MeasurementInfo:
    """What a trace or density report says about its measurement (keyword-only fields).

    Attributes:
        preconditioned: whether the operator was P^{-1/2}·H·P^{-1/2} (else H).
        size: the dimension n.
        seconds, loss, dtype, hvp_backend: as in :class:`~stableopt.SharpnessReport`.
    """

    preconditioned: bool = True
    size: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    dtype: str = "float32"
    hvp_backend: str = "autograd"


@dataclass(frozen=True)
class TraceReport(MeasurementInfo):
    """One trace measurement of an optimizer (:meth:`stableopt.Adam.hessian_trace`).

    Attributes:
        step: optimizer steps taken when measured.
        trace: the estimate of tr(P⁻¹H) (``preconditioned=True``) or tr(H); H with the sign of
            ``maximize`` and coupled weight decay, as in the sharpness.
        stderr: its standard error (0 when exact; NaN when it cannot be estimated).
        probes: the probe budget asked for; ``hvps``: the products used.
        method: ``"hutch++"`` or ``"hutchinson"``.
        and the :class:`MeasurementInfo` fields (``trace / size`` is the mean eigenvalue).
    """

    step: int
    trace: float
    stderr: float
    probes: int
    hvps: int
    method: str

    def __str__(self) -> str:
        what = "tr(P⁻¹H)" if self.preconditioned else "tr(H)"
        return f"step {self.step}: {what}={self.trace:.6g} ± {self.stderr:.2g} ({self.method}, {self.hvps} HVPs, {self.seconds:.3f} s)"


def rademacher(op: LinearOperator, generator: torch.Generator) -> Tensor:
    """A Rademacher vector (entries ±1 with probability ½ each) of ``op``'s space: the signs of
    ``op.random(generator)`` (so drawn per parameter, shard by shard, like every start vector)."""
    z = op.random(generator)
    return torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))


def orthonormalize(op: LinearOperator, rows: Tensor, *, drop: float = 1e-10) -> Tensor:
    """An orthonormal basis (as rows) of the span of ``rows``, by Gram–Schmidt applied twice with
    ``op``'s inner products; rows that are (numerically) dependent on earlier ones are dropped.

    >>> from stableopt import DenseOperator
    >>> op = DenseOperator(lambda x: x, 3, torch.float64, torch.device("cpu"))
    >>> Q = orthonormalize(op, torch.tensor([[1.0, 0, 0], [2.0, 0, 0], [1.0, 1, 0]], dtype=torch.float64))
    >>> Q.shape, torch.allclose(Q @ Q.T, torch.eye(2, dtype=torch.float64))
    (torch.Size([2, 3]), True)
    """
    kept: list[Tensor] = []
    for row in rows:
        size = float(op.norm(row))
        w = row
        if kept:
            Q = torch.stack(kept)
            for _ in range(2):
                w = w - Q.T @ op.inner(Q, w)
        norm = float(op.norm(w))
        if math.isfinite(norm) and norm > drop * max(size, 1e-300):
            kept.append(w / norm)
    return torch.stack(kept) if kept else rows.new_zeros((0, rows.shape[1]))


def _check_probes(probes: object, least: int) -> int:
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < least:
        raise ValueError(f"probes must be an integer >= {least}, got {probes!r}")
    return probes


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    m = len(samples)
    mean = math.fsum(samples) / m
    if m < 2:
        return mean, math.nan
    var = math.fsum((x - mean) ** 2 for x in samples) / (m - 1)
    return mean, math.sqrt(var / m)


def hutchinson(op: LinearOperator, probes: int, generator: torch.Generator) -> TraceEstimate:
    """Hutchinson's estimate of tr(A) from ``probes`` Rademacher probes (``probes`` products).

    Example:
        >>> from stableopt import DenseOperator
        >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
        >>> op = DenseOperator(lambda x: A @ x, 5, torch.float64, torch.device("cpu"))
        >>> hutchinson(op, 10, torch.Generator().manual_seed(0)).trace   # diagonal: exact
        15.0
    """
    probes = _check_probes(probes, 1)
    samples = []
    for _ in range(probes):
        g = rademacher(op, generator)
        samples.append(float(op.dot(g, op.matvec(g))))
    mean, stderr = _mean_and_stderr(samples)
    return TraceEstimate(mean, stderr, probes, "hutchinson")


def _exact(op: LinearOperator, generator: torch.Generator) -> TraceEstimate:
    """Σ q_iᵀ·A·q_i over an orthonormal basis of the whole space (n products)."""
    rows = torch.stack([op.random(generator) for _ in range(op.size)])
    Q = orthonormalize(op, rows)
    while Q.shape[0] < op.size:  # a dependent draw (probability 0 in exact arithmetic)
        Q = orthonormalize(op, torch.cat([Q, op.random(generator)[None]]))
    total = math.fsum(float(op.dot(q, op.matvec(q))) for q in Q)
    return TraceEstimate(total, 0.0, op.size, "hutch++")


def hutch_plus_plus(op: LinearOperator, probes: int, generator: torch.Generator) -> TraceEstimate:
    """Hutch++'s estimate of tr(A) with ``probes`` products (see the module docs).

    ⌊probes/3⌋ products sketch Q = orth(A·S), as many compute tr(QᵀAQ), the rest estimate the
    deflated remainder by Hutchinson (their spread gives ``stderr``). With ``probes`` ≥ n the
    trace is computed exactly with n products.

    Example:
        >>> from stableopt import DenseOperator
        >>> A = torch.diag(torch.tensor([100.0, 10.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
        >>> op = DenseOperator(lambda x: A @ x, 6, torch.float64, torch.device("cpu"))
        >>> est = hutch_plus_plus(op, 6, torch.Generator().manual_seed(0))
        >>> round(est.trace, 8), est.stderr, est.hvps
        (114.0, 0.0, 6)
    """
    probes = _check_probes(probes, 3)
    if probes >= op.size:
        return _exact(op, generator)
    k = probes // 3
    sketch = torch.stack([op.matvec(rademacher(op, generator)) for _ in range(k)])
    Q = orthonormalize(op, sketch)
    low_rank = math.fsum(float(op.dot(q, op.matvec(q))) for q in Q)
    samples = []
    for _ in range(probes - k - Q.shape[0]):  # products not spent on the sketch or on tr(QᵀAQ)
        g = rademacher(op, generator)
        if Q.shape[0]:
            g = g - Q.T @ op.inner(Q, g)
        samples.append(float(op.dot(g, op.matvec(g))))
    mean, stderr = _mean_and_stderr(samples)
    return TraceEstimate(low_rank + mean, stderr, probes, "hutch++")
