"""Lanczos for the largest algebraic eigenvalues of a symmetric operator given as a matvec.

Full reorthogonalisation (classical Gram–Schmidt, applied twice: "twice is enough", Giraud et al.
2005) keeps the basis orthonormal to working precision, so no spurious copies of converged Ritz
values appear and the estimates can be trusted to the residual bound. Stopping is on the Ritz
residuals ‖A·x − θ·x‖ = β_m·|s_m|, never on a fixed iteration count.

For a symmetric A, each Ritz value θ with residual r has an eigenvalue of A within ‖r‖ of it
(and within ‖r‖²/gap once the Ritz value is separated by ``gap`` from the rest of the spectrum,
Kato–Temple). The default stopping rule, ``bound="residual"``, stops when ‖r‖ ≤ tol·|θ|: some
eigenvalue is then within tol·|θ| of θ. That it is the *top* one is not guaranteed by any
Krylov method (a start vector nearly orthogonal to the top eigenvector hides it), but in
practice the top Ritz value's actual error is ‖r‖²/gap, one to three orders of magnitude below
the bound (benchmarks/sharpness.py: tol 1e-3 gave errors below 1e-5 on the "mlp" problems).
``bound="gap"`` stops on min(‖r‖, ‖r‖²/gap)/|θ| with the gap taken from the neighbouring Ritz
values. Ritz values underestimate the eigenvalues below the top, so that gap is an
overestimate until the runner-up has converged: on crowded spectra (λ2/λ1 ≈ 0.95–0.99) it
saved up to half of the iterations but overshot its tolerance (actual errors up to 1.2e-2 at
tol 1e-3), so it is an option, not the default.

Implementation (the fast path, checked against a textbook version in tests/test_fastpath.py):
the Lanczos vectors live in blocks allocated as the iteration proceeds (memory follows the
steps actually taken), reorthogonalisation is done with in-place matrix-vector products, and
each step synchronises with the host once, for α and β together; a non-finite product shows up
in those two scalars, so the vector itself is never scanned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor

__all__ = ["LanczosResult", "lanczos"]

Matvec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """What :func:`lanczos` found.

    Attributes:
        eigenvalues: the top ``k`` Ritz values, largest first (float64, CPU).
        eigenvectors: the matching unit Ritz vectors, shape ``(k, n)`` (plus any extra vectors
            asked for with ``num_vectors``), in the start vector's dtype and device.
        residuals: relative residuals ‖A·x − θ·x‖ / |θ| of the top ``k`` pairs (float64, CPU).
        matvecs: how many times ``matvec`` was called.
        converged: whether every one of the top ``k`` pairs met the stopping rule.
        finite: False when ``matvec`` returned a non-finite value (then nothing else is valid).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    finite: bool = True


def _nan_result(k: int, n: int, like: Tensor, matvecs: int) -> LanczosResult:
    nan = torch.full((k,), math.nan, dtype=torch.float64)
    return LanczosResult(nan, like.new_full((k, n), math.nan), nan.clone(), matvecs, False, False)


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigenpairs of the m×m Lanczos tridiagonal (float64, CPU), largest eigenvalue first."""
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    return theta.flip(0), S.flip(1)


class _Basis:
    """The Lanczos vectors q_0, q_1, ... stored as rows of blocks of ``_BLOCK`` rows.

    Memory grows with the iterations actually taken (a solve that stops after 12 steps holds 12
    vectors, not ``max_iters``), and no block is ever copied to grow another.
    """

    def __init__(self, like: Tensor, max_rows: int) -> None:
        self.n = like.numel()
        self.dtype, self.device = like.dtype, like.device
        self.max_rows = max_rows
        self.blocks: list[Tensor] = []
        self.rows = 0

    def append(self, q: Tensor) -> None:
        i = self.rows % _BLOCK
        if i == 0:
            size = min(_BLOCK, self.max_rows - self.rows)
            self.blocks.append(torch.empty((size, self.n), dtype=self.dtype, device=self.device))
        self.blocks[-1][i].copy_(q)
        self.rows += 1

    def row(self, j: int) -> Tensor:
        return self.blocks[j // _BLOCK][j % _BLOCK]

    def _filled(self) -> list[Tensor]:
        out = []
        for b, block in enumerate(self.blocks):
            rows = min(block.shape[0], self.rows - b * _BLOCK)
            out.append(block[:rows])
        return out

    def orthogonalize(self, w: Tensor) -> Tensor:
        """(I − QQᵀ)²·w, classical Gram–Schmidt applied twice, as a new tensor (``w`` may be
        the caller's buffer or alias a basis row, so it is never written to)."""
        filled = self._filled()
        for sweep in range(2):
            coeffs = [B @ w for B in filled]
            for i, (B, c) in enumerate(zip(filled, coeffs)):
                if sweep == 0 and i == 0:
                    w = torch.addmv(w, B.T, c, alpha=-1.0)
                else:
                    w.addmv_(B.T, c, alpha=-1.0)
        return w

    def combine(self, S: Tensor, m: int) -> Tensor:
        """Sᵀ·Q[:m] for an m×r coefficient matrix S: the r Ritz vectors."""
        out = torch.zeros((S.shape[1], self.n), dtype=self.dtype, device=self.device)
        for b, B in enumerate(self._filled()):
            lo = b * _BLOCK
            if lo >= m:
                break
            hi = min(m, lo + B.shape[0])
            out.addmm_(S[lo:hi].T, B[: hi - lo])
        return out


#: rows per block of Lanczos vectors (see :class:`_Basis`)
_BLOCK = 16


def lanczos(
    matvec: Matvec,
    v0: Tensor | None = None,
    *,
    n: int | None = None,
    k: int = 1,
    tol: float = 1e-3,
    max_iters: int | None = None,
    min_iters: int = 1,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    bound: Literal["residual", "gap"] = "residual",
    num_vectors: int | None = None,
) -> LanczosResult:
    """Largest algebraic eigenvalues of the symmetric operator ``matvec`` by Lanczos.

    Args:
        matvec: x ↦ A·x on 1-D tensors of length ``n``; A must be symmetric.
        v0: start vector (any nonzero 1-D tensor; its dtype/device are used). If None, a
            standard normal vector drawn from ``generator`` (which must then be given, so
            results are reproducible and no global RNG is touched), with ``n``, ``dtype``
            (default float32) and ``device``.
        k: how many of the largest eigenvalues to return.
        tol: stop when each of the top ``k`` pairs has relative error bound ≤ ``tol``: the
            relative residual ‖A·x − θ·x‖/|θ| (``bound="residual"``), or
            min(‖r‖, ‖r‖²/gap)/|θ| (``bound="gap"``).
        max_iters: at most this many matvecs (default min(n, 100)).
        min_iters: at least this many matvecs before stopping (protects warm starts from
            stopping on a vector that is an eigenvector of a no-longer-top eigenvalue).
        generator: random source for the start vector and for restarts after an invariant
            subspace is found.
        bound: the stopping rule, see ``tol``.
        num_vectors: how many of the top Ritz vectors to return (default ``k``); extra ones
            make good warm starts for the next solve.

    Returns:
        A :class:`LanczosResult`.

    Example:
        >>> A = torch.diag(torch.tensor([3.0, 1.0, -5.0, 2.0], dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> res = lanczos(lambda x: A @ x, n=4, k=2, tol=1e-10, generator=g, dtype=torch.float64)
        >>> [round(x, 8) for x in res.eigenvalues.tolist()]
        [3.0, 2.0]
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not (isinstance(tol, (int, float)) and not isinstance(tol, bool) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if bound not in ("residual", "gap"):
        raise ValueError(f"bound must be 'residual' or 'gap', got {bound!r}")
    if v0 is None:
        if n is None or generator is None:
            raise ValueError("lanczos needs a start vector v0, or n and a torch.Generator")
        dtype = dtype or torch.float32
        v0 = torch.randn(n, generator=generator, dtype=dtype).to(device or "cpu")
    else:
        if not isinstance(v0, Tensor) or v0.dim() != 1:
            raise ValueError(f"v0 must be a 1-D tensor, got {type(v0).__name__} of shape {getattr(v0, 'shape', None)}")
        if n is not None and n != v0.numel():
            raise ValueError(f"n={n} does not match v0 of length {v0.numel()}")
        n = v0.numel()
    assert n is not None
    if n < 1:
        raise ValueError("lanczos needs a space of dimension n >= 1")
    max_iters = min(n, 100) if max_iters is None else int(max_iters)
    if max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    max_iters = min(max_iters, n)
    min_iters = max(1, min(int(min_iters), max_iters))
    num_vectors = k if num_vectors is None else max(k, int(num_vectors))

    norm = torch.linalg.vector_norm(v0)
    if not torch.isfinite(norm) or norm == 0:
        if generator is None:
            raise ValueError("v0 must be a finite nonzero vector")
        v0 = torch.randn(n, generator=generator, dtype=v0.dtype).to(v0.device)
        norm = torch.linalg.vector_norm(v0)
    Q = _Basis(v0, max_iters)
    Q.append(v0 / norm)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples q_j and q_{j+1}
    theta = S = None
    converged = False
    m = 0
    beta = 0.0
    scale = 0.0  # running estimate of ‖A‖, for the breakdown test
    for j in range(max_iters):
        q = Q.row(j)
        w = matvec(q).to(Q.dtype)
        m = j + 1
        alpha_t = torch.dot(q, w)
        w = Q.orthogonalize(w)  # full reorthogonalisation against q_0..q_j, twice
        # one host sync per step for both scalars; a non-finite product shows up in both
        alpha, beta = torch.stack([alpha_t, torch.linalg.vector_norm(w)]).tolist()
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            return _nan_result(k, n, v0, m)
        alphas.append(alpha)
        theta, S = _tridiagonal_eigh(alphas, betas)
        scale = max(scale, float(theta.abs().max()))
        top = min(k, m)
        res = beta * S[-1, :top].abs()
        err = res
        if bound == "gap" and m > 1:
            gaps = torch.full((top,), math.inf, dtype=torch.float64)
            for i in range(top):
                if i + 1 < m:
                    gaps[i] = theta[i] - theta[i + 1]
                if i > 0:
                    gaps[i] = min(float(gaps[i]), float(theta[i - 1] - theta[i]))
            err = torch.minimum(res, res**2 / gaps.clamp_min(1e-300))
        denom = theta[:top].abs().clamp_min(1e-300)
        if m >= min_iters and top == k and bool((err <= tol * denom).all()):
            converged = True
            break
        if m == max_iters:
            break
        if beta <= 1e-10 * max(scale, 1e-300):  # invariant subspace: restart orthogonally
            if generator is None:
                generator = torch.Generator().manual_seed(m)
            w = torch.randn(n, generator=generator, dtype=Q.dtype).to(Q.device)
            w = Q.orthogonalize(w)
            nw = torch.linalg.vector_norm(w)
            if nw == 0:
                converged = m >= k
                break
            betas.append(0.0)
            Q.append(w / nw)
        else:
            betas.append(beta)
            Q.append(w.div_(beta))
    assert theta is not None and S is not None
    top = min(k, m)
    res = (betas[m - 1] if len(betas) >= m else beta) * S[-1, :top].abs()
    keep = min(num_vectors, m)
    vectors = Q.combine(S[:, :keep].to(Q.dtype).to(Q.device), m)
    eigenvalues = torch.full((k,), math.nan, dtype=torch.float64)
    eigenvalues[:top] = theta[:top]
    residuals = torch.full((k,), math.nan, dtype=torch.float64)
    residuals[:top] = res / theta[:top].abs().clamp_min(1e-300)
    return LanczosResult(eigenvalues, vectors, residuals, m, converged and top == k)
