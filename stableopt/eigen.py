"""Lanczos for the largest algebraic eigenvalues of a symmetric operator given as a matvec.

Full reorthogonalisation (classical Gram–Schmidt, applied twice: "twice is enough", Giraud et al.
2005) keeps the basis orthonormal to working precision, so no spurious copies of converged Ritz
values appear and the estimates can be trusted to the residual bound. Stopping is on the Ritz
residuals ‖A·x − θ·x‖ = β_m·|s_m|, never on a fixed iteration count.

For a symmetric A, each Ritz value θ with residual r has an eigenvalue of A within ‖r‖ of it
(and within ‖r‖²/gap once the Ritz value is separated by ``gap`` from the rest of the spectrum,
Kato–Temple). The default stopping rule, ``bound="residual"``, stops when ‖r‖ ≤ tol·|θ|: some
eigenvalue is then within tol·|θ| of θ. That it is the *top* one is not guaranteed by any
Krylov method: a start vector nearly orthogonal to the top eigenvector hides it. On crowded test
spectra (benchmarks/stopping_rules.py; 150 random starts each, tol 1e-3) the residual rule stopped on
the runner-up in 1 of 150 solves at λ2/λ1 = 0.95, 4 at 0.986 and 9 at 0.9965. When it does find
the top, its actual error is ‖r‖²/gap, one to three orders of magnitude below the bound.

``bound="gap"`` stops on min(‖r‖, ‖r‖²/gap)/|θ|, with the gap measured from θ to the
neighbouring Ritz values *widened by their own residuals* (an unconverged neighbour gives no
usable gap) and trusted only once ‖r‖ ≤ ``GAP_RESIDUAL_CAP``·tol·|θ|. Warm-started solves, whose
start vector is already close to the top eigenvector, use it: along training it cut the
Hessian-vector products of a measurement by 10–20% at errors below 1e-4
(benchmarks/sharpness.py). That start is its premise, so the quadratic estimate is trusted only
while the top Ritz value stays within ``GAP_START_SHIFT`` (1%) of its value after the second
step; past that the solve stops on the residual, as a cold one does. After a loss spike the
previous top Ritz vectors can be far from every top eigenvector (the warm start's Rayleigh
quotient fell to 0.29–0.98·λ_max on the benchmark MLP): the top Ritz value then climbs for many
steps while the runner-up is unresolved and the gap looks wide, and without the guard the rule
stopped 4.2% below λ_max at tol 1e-2, twice its bound (benchmarks/warm_replay.py: every
measurement of monitors every 25 and 100 steps, tol 1e-3 and 1e-2, along a run through the edge;
with the guard all were within tol, for 9% more products). From random starts on the crowded
spectra above the unguarded rule stopped on the runner-up more often than the residual rule (14
instead of 9 of 150 at λ2/λ1 = 0.9965); a random start's Ritz value always climbs past the
guard, so the guarded rule stops where the residual rule does, and cold solves use the residual
rule anyway.

``max_basis`` bounds memory: when the basis is full the solve restarts thickly (Wu & Simon,
"Thick-restart Lanczos", 2000): the top Ritz vectors and the newest Lanczos vector are kept, the
projected matrix becomes an arrowhead plus a tridiagonal, and the iteration goes on. On crowded
spectra a basis of 8–12 vectors cost at most a few extra products against an unbounded one.

Implementation (the fast path, checked against a textbook version in tests/test_fastpath.py):
the Lanczos vectors live in blocks allocated as the iteration proceeds (memory follows the
steps actually taken), reorthogonalisation is done with in-place matrix-vector products, and
each step synchronises with the host once, for α and β together; a non-finite product shows up
in those two scalars, so the vector itself is never scanned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .linear_operator import DenseOperator, LinearOperator, Matvec

__all__ = ["LanczosResult", "LinearOperator", "lanczos"]


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


class _Basis:
    """The Lanczos vectors q_0, q_1, ... stored as rows of blocks of ``_BLOCK`` rows.

    Memory grows with the iterations actually taken (a solve that stops after 6 steps holds 6
    vectors, not ``max_iters``) up to ``max_rows`` (the thick-restart basis size), and no block
    is ever copied to grow another; after a restart the blocks are reused in place.
    """

    def __init__(self, like: Tensor, max_rows: int) -> None:
        self.n = like.numel()
        self.dtype, self.device = like.dtype, like.device
        self.max_rows = max_rows
        self.blocks: list[Tensor] = []
        self.rows = 0

    def append(self, q: Tensor) -> None:
        b, i = divmod(self.rows, _BLOCK)
        if b == len(self.blocks):  # blocks stay allocated across thick restarts
            size = min(_BLOCK, self.max_rows - self.rows)
            self.blocks.append(torch.empty((size, self.n), dtype=self.dtype, device=self.device))
        self.blocks[b][i].copy_(q)
        self.rows += 1

    def row(self, j: int) -> Tensor:
        return self.blocks[j // _BLOCK][j % _BLOCK]

    def _filled(self) -> list[Tensor]:
        out = []
        for b, block in enumerate(self.blocks):
            rows = min(block.shape[0], self.rows - b * _BLOCK)
            if rows <= 0:  # allocated before a thick restart, not in use now
                break
            out.append(block[:rows])
        return out

    def orthogonalize(self, w: Tensor, op: LinearOperator) -> Tensor:
        """(I − QQᵀ)²·w, classical Gram–Schmidt applied twice, as a new tensor (``w`` may be
        the caller's buffer or alias a basis row, so it is never written to)."""
        filled = self._filled()
        for sweep in range(2):
            coeffs = [op.inner(B, w) for B in filled]
            for i, (B, c) in enumerate(zip(filled, coeffs)):
                if sweep == 0 and i == 0:
                    w = torch.addmv(w, B.T, c, alpha=-1.0)
                else:
                    w.addmv_(B.T, c, alpha=-1.0)
        return w

    def rotate(self, S: Tensor) -> None:
        """Replace the basis by its first ``p`` combinations Sᵀ·Q (S is rows × p), in place.

        Done a slice of columns at a time, so the extra memory is a few MB, not ``p`` vectors.
        """
        p = S.shape[1]
        filled = self._filled()
        chunk = max(1024, (1 << 20) // max(p, 1))
        for c0 in range(0, self.n, chunk):
            c1 = min(self.n, c0 + chunk)
            out = torch.zeros((p, c1 - c0), dtype=self.dtype, device=self.device)
            lo = 0
            for B in filled:
                hi = lo + B.shape[0]
                out.addmm_(S[lo:hi].T, B[:, c0:c1])
                lo = hi
            for b, B in enumerate(self.blocks):
                lo = b * _BLOCK
                if lo >= p:
                    break
                hi = min(p, lo + B.shape[0])
                B[: hi - lo, c0:c1].copy_(out[lo:hi])
        self.rows = p

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


def _error_estimates(theta: Tensor, res: Tensor, top: int, bound: str, tol: float) -> Tensor:
    """Estimated absolute errors of the top ``top`` Ritz values (see :func:`lanczos`)."""
    if bound == "residual" or theta.numel() == 1:
        return res[:top]
    m = theta.numel()
    out = res[:top].clone()
    for i in range(top):
        # distance from θ_i to the rest of the spectrum, widened by the neighbours' own
        # uncertainty: an unconverged neighbour (large residual) gives no usable gap
        gap = math.inf
        if i + 1 < m:
            gap = min(gap, float(theta[i] - theta[i + 1] - res[i + 1]))
        if i > 0:
            gap = min(gap, float(theta[i - 1] - res[i - 1] - theta[i]))
        r = float(res[i])
        if gap > 0 and r <= GAP_RESIDUAL_CAP * tol * abs(float(theta[i])):
            out[i] = min(r, r * r / gap)
    return out


#: bound="gap" uses the quadratic estimate ‖r‖²/gap only once the plain residual is within this
#: factor of the tolerance. A Krylov space that has not yet resolved the runner-up shows a gap
#: that is too wide; the cap keeps such an estimate from stopping the solve much earlier than the
#: residual rule would. Chosen on warm starts after drift and after a crossing of the top two
#: eigenvalues (40 starts per case, λ2/λ1 from 0.95 to 0.9965): at 2 the gap rule stopped on the
#: wrong eigenvalue at most once more than the residual rule per 40 solves and saved 7–19% of the
#: products; at 3 and 5 it failed more often, and from random (cold) starts much more often.
GAP_RESIDUAL_CAP = 2.0

#: bound="gap" uses the quadratic estimate only while the top Ritz value has moved by at most
#: this fraction of itself since the second step (the step at which a start made of the previous
#: top two Ritz vectors is resolved), i.e. while the start vector was already close to the top
#: eigenvector; past that the solve stops on the residual. Along the benchmark run through the
#: edge (benchmarks/warm_replay.py, tol 1e-3, every 25 steps) the top Ritz value climbed by
#: 0.1–1.1% after the second step where the warm start was still good and by 1.8–58% right
#: after a loss spike. Every replayed measurement was within its bound at 0.5% and 1% (1% took
#: fewer products); without the guard one was 2.1 times out of it. The guard needs a few steps
#: to see a start climb: with ``WARM_MIN_ITERS`` 2 or 3 instead of 4 the gap rule stopped 5–12%
#: low at tol 1e-2 on the quick replay.
GAP_START_SHIFT = 0.01


def lanczos(
    matvec: Matvec | LinearOperator,
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
    max_basis: int | None = None,
) -> LanczosResult:
    """Largest algebraic eigenvalues of the symmetric operator ``matvec`` by Lanczos.

    Args:
        matvec: a :class:`LinearOperator` (e.g. a :class:`stableopt.CurvatureOperator`, whose
            vectors may be shards of a distributed vector), or a plain function x ↦ A·x on 1-D
            tensors of length ``n``; A must be symmetric.
        v0: start vector (any nonzero 1-D tensor; its dtype/device are used). If None, a
            standard normal vector drawn from ``generator`` (which must then be given, so
            results are reproducible and no global RNG is touched): ``operator.random``, or for
            a plain function one of length ``n`` with ``dtype`` (default float32) and
            ``device``.
        k: how many of the largest eigenvalues to return.
        tol: stop when each of the top ``k`` pairs has estimated relative error ≤ ``tol``:
            with ``bound="residual"`` (default) the relative residual ‖A·x − θ·x‖/|θ|; with
            ``bound="gap"`` min(‖r‖, ‖r‖²/gap)/|θ|, where gap is the distance to the
            neighbouring Ritz values minus their residuals, used only once ‖r‖/|θ| ≤
            ``GAP_RESIDUAL_CAP``·tol and only while the top Ritz value is within
            ``GAP_START_SHIFT`` of its value after the second step (else the residual). "gap"
            is meant for warm starts (a start vector already close to the top eigenvector),
            see the module notes.
        max_iters: at most this many matvecs (default min(n, 100)).
        min_iters: at least this many matvecs before stopping (protects warm starts from
            stopping on a vector that is an eigenvector of a no-longer-top eigenvalue, and gives
            the ``bound="gap"`` start guard the steps it needs to see a stale start).
        generator: random source for the start vector and for restarts after an invariant
            subspace is found.
        bound: the stopping rule, see ``tol``.
        num_vectors: how many of the top Ritz vectors to return (default ``k``); extra ones
            make good warm starts for the next solve.
        max_basis: most Lanczos vectors held at once (default: no limit below ``max_iters``).
            When the basis is full the solve restarts thickly: it keeps the top Ritz vectors
            (half the basis) and the newest Lanczos vector and goes on, so memory is bounded
            by ``max_basis`` vectors of length ``n`` whatever the number of iterations.

    Returns:
        A :class:`LanczosResult`.

    Examples:
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
    op: LinearOperator
    if isinstance(matvec, LinearOperator):
        op = matvec
        if n is not None and n != op.size:
            raise ValueError(f"n={n} does not match the operator of size {op.size}")
        n = op.size
        if v0 is None:
            if generator is None:
                raise ValueError("lanczos needs a start vector v0, or a torch.Generator")
            v0 = op.random(generator)
    else:
        if not callable(matvec):
            raise TypeError(f"matvec must be a LinearOperator or a callable, got {type(matvec).__name__}")
        if v0 is None:
            if n is None or generator is None:
                raise ValueError("lanczos needs a start vector v0, or n and a torch.Generator")
            dtype = dtype or torch.float32
            v0 = torch.randn(n, generator=generator, dtype=dtype).to(device or "cpu")
        else:
            if not isinstance(v0, Tensor) or v0.dim() != 1:
                raise ValueError(
                    f"v0 must be a 1-D tensor, got {type(v0).__name__} of shape {getattr(v0, 'shape', None)}"
                )
            if n is not None and n != v0.numel():
                raise ValueError(f"n={n} does not match v0 of length {v0.numel()}")
            n = v0.numel()
        op = DenseOperator(matvec, n, v0.dtype, v0.device)
    if not isinstance(v0, Tensor) or v0.dim() != 1 or v0.numel() != op.local_size:
        raise ValueError(
            f"v0 must be a 1-D tensor of length {op.local_size}, got {type(v0).__name__} of shape "
            f"{tuple(getattr(v0, 'shape', ()))}"
        )
    assert n is not None
    if n < 1:
        raise ValueError("lanczos needs a space of dimension n >= 1")
    max_iters = min(n, 100) if max_iters is None else int(max_iters)
    if max_iters < 1:
        raise ValueError(f"max_iters must be a positive integer, got {max_iters!r}")
    max_iters = min(max_iters, n)
    min_iters = max(1, min(int(min_iters), max_iters))
    num_vectors = k if num_vectors is None else max(k, int(num_vectors))
    if max_basis is None:
        max_basis = max_iters
    elif isinstance(max_basis, bool) or not isinstance(max_basis, int) or max_basis < k + 3:
        raise ValueError(f"max_basis must be an integer >= k + 3 = {k + 3}, got {max_basis!r}")
    max_basis = min(max_basis, max_iters)
    keep_on_restart = max(k + 1, min(num_vectors, max_basis - 2), max_basis // 2)

    norm = op.norm(v0)
    if not torch.isfinite(norm) or norm == 0:
        if generator is None:
            raise ValueError("v0 must be a finite nonzero vector")
        v0 = op.random(generator).to(v0.dtype)
        norm = op.norm(v0)
    Q = _Basis(v0, max_basis)
    Q.append(v0 / norm)
    # T = QᵀAQ, the projected matrix: tridiagonal, or arrowhead + tridiagonal after a restart
    T = torch.zeros((max_basis, max_basis), dtype=torch.float64)
    theta = S = None
    theta_start = math.nan  # the top Ritz value after the second step (bound="gap")
    converged = False
    matvecs = 0
    m = 0  # current basis size
    beta = 0.0
    scale = 0.0  # running estimate of ‖A‖, for the breakdown test
    while True:
        j = Q.rows - 1
        q = Q.row(j)
        w = op.matvec(q).to(Q.dtype)
        matvecs += 1
        m = j + 1
        alpha_t = op.dot(q, w)
        w = Q.orthogonalize(w, op)  # full reorthogonalisation against the whole basis, twice
        # one host sync per step for both scalars; a non-finite product shows up in both
        alpha, beta = torch.stack([alpha_t, op.norm(w)]).tolist()
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            return _nan_result(k, op.local_size, v0, matvecs)
        T[j, j] = alpha
        theta, S = torch.linalg.eigh(T[:m, :m])
        theta, S = theta.flip(0), S.flip(1)
        scale = max(scale, float(theta.abs().max()))
        top = min(k, m)
        res = beta * S[-1].abs()
        rule = bound
        if bound == "gap":  # trusted only from a start close to the top eigenvector (GAP_START_SHIFT)
            theta1 = float(theta[0])
            if matvecs == 2:
                theta_start = theta1
            if not abs(theta1 - theta_start) <= GAP_START_SHIFT * abs(theta1):  # (NaN before step 2)
                rule = "residual"
        err = _error_estimates(theta, res, top, rule, tol)
        denom = theta[:top].abs().clamp_min(1e-300)
        if matvecs >= min_iters and top == k and bool((err <= tol * denom).all()):
            converged = True
            break
        if matvecs == max_iters:  # (m ≤ max_basis ≤ max_iters ≤ n, so this also ends a full space)
            break
        if beta <= 1e-10 * max(scale, 1e-300):  # invariant subspace: restart orthogonally
            if generator is None:
                generator = torch.Generator().manual_seed(matvecs)
            w = op.random(generator).to(Q.dtype)
            w = Q.orthogonalize(w, op)
            nw = op.norm(w)
            if nw == 0:
                converged = m >= k
                break
            w.div_(nw)
            beta = 0.0
        else:
            w.div_(beta)
        if m == max_basis:  # thick restart: keep the top Ritz vectors and the newest vector
            p = keep_on_restart
            Q.rotate(S[:, :p].to(Q.dtype).to(Q.device))
            coupling = beta * S[-1, :p]
            T.zero_()
            T[:p, :p] = torch.diag(theta[:p])
            T[p, :p] = coupling
            T[:p, p] = coupling
        else:
            T[j, j + 1] = T[j + 1, j] = beta
        Q.append(w)
    assert theta is not None and S is not None
    top = min(k, m)
    res = beta * S[-1, :top].abs()
    keep = min(num_vectors, m)
    vectors = Q.combine(S[:, :keep].to(Q.dtype).to(Q.device), m)
    eigenvalues = torch.full((k,), math.nan, dtype=torch.float64)
    eigenvalues[:top] = theta[:top]
    residuals = torch.full((k,), math.nan, dtype=torch.float64)
    residuals[:top] = res / theta[:top].abs().clamp_min(1e-300)
    return LanczosResult(eigenvalues, vectors, residuals, matvecs, converged and top == k)
