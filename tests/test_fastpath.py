"""The fast path of the sharpness engine agrees with a readable reference path.

Fast path: :func:`stableopt.lanczos` (blocked Lanczos basis grown on demand, one host sync per
step, in-place reorthogonalisation) inside :func:`stableopt.estimate_sharpness` (gradient graph
built once and reused, flattened operator, warm starts). Reference path: a textbook Lanczos with a
dense basis written out below, and dense Hessians from ``torch.autograd.functional.hessian``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stableopt
from stableopt.eigen import _BLOCK


def reference_lanczos(A: torch.Tensor, v0: torch.Tensor, steps: int) -> torch.Tensor:
    """Textbook Lanczos with full reorthogonalisation: the Ritz values after ``steps`` steps."""
    n = A.shape[0]
    Q = torch.zeros(n, steps, dtype=A.dtype)
    alpha, beta = [], []
    q = v0 / v0.norm()
    for j in range(steps):
        Q[:, j] = q
        w = A @ q
        alpha.append(float(q @ w))
        for _ in range(2):
            w = w - Q[:, : j + 1] @ (Q[:, : j + 1].T @ w)
        b = float(w.norm())
        beta.append(b)
        q = w / b
    T = torch.diag(torch.tensor(alpha, dtype=torch.float64))
    off = torch.tensor(beta[:-1], dtype=torch.float64)
    T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T).flip(0)


def _symmetric(n: int, seed: int, top: tuple[float, ...] = ()) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    for i, t in enumerate(top):
        evals[-1 - i] = t
    return (U * evals) @ U.T


@pytest.mark.parametrize("steps", [3, _BLOCK, _BLOCK + 5, 2 * _BLOCK + 3])
def test_ritz_values_match_textbook_lanczos_across_basis_blocks(steps):
    A = _symmetric(300, seed=steps, top=(3.0, 2.9, 2.5))
    v0 = torch.randn(300, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = reference_lanczos(A, v0, steps)
    fast = stableopt.lanczos(lambda x: A @ x, v0, k=min(3, steps), tol=1e-300, max_iters=steps)
    assert fast.matvecs == steps
    assert fast.eigenvalues.tolist() == pytest.approx(ref[: min(3, steps)].tolist(), rel=1e-10, abs=1e-12)


def test_ritz_vectors_and_residuals_are_consistent():
    A = _symmetric(200, seed=3, top=(5.0, 4.9, 4.0))
    res = stableopt.lanczos(
        lambda x: A @ x,
        n=200,
        k=2,
        tol=1e-8,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        max_iters=200,
        num_vectors=3,
    )
    assert res.converged and res.eigenvectors.shape == (3, 200)
    V = res.eigenvectors
    assert torch.allclose(V @ V.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    for i in range(2):
        r = A @ V[i] - res.eigenvalues[i] * V[i]
        assert float(r.norm()) / abs(float(res.eigenvalues[i])) == pytest.approx(
            float(res.residuals[i]), rel=1e-4, abs=1e-12
        )
    assert res.eigenvalues.tolist() == pytest.approx([5.0, 4.9], rel=1e-8)


def test_matvec_output_is_never_written_to():
    A = _symmetric(40, seed=1, top=(2.0,))
    outputs = []

    def matvec(x):
        y = A @ x
        outputs.append((y, y.clone()))
        return y

    def identity_view(x):  # a matvec that returns (a view of) its input must not corrupt the basis
        return x[:]

    stableopt.lanczos(matvec, n=40, k=1, tol=1e-10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert all(torch.equal(y, copy) for y, copy in outputs)
    res = stableopt.lanczos(
        identity_view, n=40, k=1, tol=1e-10, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert float(res.eigenvalues[0]) == pytest.approx(1.0)


def test_nonfinite_products_are_reported_without_a_tensor_check():
    calls = []
    A = _symmetric(30, seed=5, top=(2.0,))

    def matvec(x):
        calls.append(1)
        y = A @ x
        if len(calls) == 3:
            y[5] = math.inf
        return y

    res = stableopt.lanczos(
        matvec, n=30, k=1, tol=1e-12, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert not res.finite and res.matvecs == 3 and math.isnan(float(res.eigenvalues[0]))


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.7)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    return model, x, y


def _dense_preconditioned(model, x, y, opt) -> torch.Tensor:
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1) for p in params])

    def loss_of(flat):
        ps = [c.view(s) for c, s in zip(flat.split(numels), shapes)]
        h = torch.tanh(x @ ps[0].T + ps[1])
        out = h @ ps[2].T + ps[3]
        return 0.5 * ((out - y) ** 2).sum() / x.shape[0]

    H = torch.autograd.functional.hessian(loss_of, flat0)
    d = torch.cat([P.reshape(-1) for P in opt.preconditioner()]).rsqrt()
    return torch.linalg.eigvalsh(d[:, None] * H * d[None, :]).flip(0)


def test_warm_started_measurements_along_training_match_dense_reference():
    model, x, y = _model()
    opt = stableopt.Adam(model.parameters(), lr=0.05)

    def loss_fn():
        return 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]

    hvps = []
    for step in range(12):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if step % 2 == 1:
            rep = opt.sharpness(loss_fn, k=2, tol=1e-10, max_iters=200)
            ref = _dense_preconditioned(model, x, y, opt)
            assert rep.converged
            assert list(rep.eigenvalues) == pytest.approx(ref[:2].tolist(), rel=1e-7)
            hvps.append(rep.hvps)
    assert "preconditioned" in opt.state_dict()["stableopt"]["warm"]


@pytest.mark.parametrize("bound", ["residual", "gap"])
def test_both_stopping_rules_reach_the_requested_accuracy_on_a_separated_spectrum(bound):
    A = _symmetric(300, seed=11, top=(4.0, 3.0, 2.0))
    res = stableopt.lanczos(
        lambda v: A @ v,
        n=300,
        k=1,
        tol=1e-6,
        bound=bound,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
    )
    assert res.converged and abs(float(res.eigenvalues[0]) - 4.0) / 4.0 <= 1e-6


# -- thick restart (bounded memory) and the gap stopping rule ------------------------------------


def _crowded(n: int, seed: int, top: tuple[float, ...]) -> torch.Tensor:
    """Symmetric n×n with the given top eigenvalues above a bulk spread over [−0.2, 0.85]."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    evals = torch.linspace(-0.2, 0.85, n, dtype=torch.float64)
    evals[n - len(top) :] = torch.tensor(sorted(top), dtype=torch.float64)
    return (U * evals) @ U.T


@pytest.mark.parametrize("max_basis", [6, 9, _BLOCK + 1, 2 * _BLOCK + 2])
@pytest.mark.parametrize("k", [1, 3])
def test_thick_restart_matches_dense_eigvalsh(max_basis, k):
    if max_basis < k + 3:
        pytest.skip("max_basis must be >= k + 3")
    A = _crowded(400, seed=max_basis + k, top=(1.0, 0.995, 0.99, 0.97))
    ref = torch.linalg.eigvalsh(A).flip(0)[:k]
    res = stableopt.lanczos(
        lambda x: A @ x,
        n=400,
        k=k,
        tol=1e-10,
        max_iters=400,
        max_basis=max_basis,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64,
        num_vectors=k + 1,
    )
    assert res.converged
    assert res.matvecs > max_basis  # the basis really was restarted
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-9, atol=1e-12)
    V = res.eigenvectors
    torch.testing.assert_close(V @ V.T, torch.eye(k + 1, dtype=torch.float64), rtol=0, atol=1e-10)
    for i in range(k):  # the reported residuals are the true ones after restarts too
        r = float((A @ V[i] - res.eigenvalues[i] * V[i]).norm()) / abs(float(res.eigenvalues[i]))
        assert r == pytest.approx(float(res.residuals[i]), rel=1e-3, abs=1e-12)


def test_basis_never_holds_more_than_max_basis_vectors(monkeypatch):
    A = _crowded(300, seed=5, top=(1.0, 0.997, 0.99))
    rows = []
    real_append = stableopt.eigen._Basis.append

    def append(self, q):
        real_append(self, q)
        rows.append(sum(b.shape[0] for b in self.blocks))  # vectors allocated

    monkeypatch.setattr(stableopt.eigen._Basis, "append", append)
    res = stableopt.lanczos(
        lambda x: A @ x,
        n=300,
        tol=1e-8,
        max_iters=300,
        max_basis=10,
        generator=torch.Generator().manual_seed(1),
        dtype=torch.float64,
    )
    assert res.converged and res.matvecs > 10
    assert max(rows) <= 10
    assert float(res.eigenvalues[0]) == pytest.approx(1.0, rel=1e-8)


@pytest.mark.parametrize(
    "top",
    [
        (1.0, 0.95, 0.93),  # ANCHORS-like gap
        (1.0, 0.9864, 0.926, 0.898),  # the runner-up close (mlp-quick raw)
        (1.0, 0.9965, 0.992, 0.985),  # a tight cluster (mlp-gauss preconditioned)
    ],
)
@pytest.mark.parametrize("drift", ["perturbed", "top two swapped"])
def test_gap_rule_meets_its_tolerance_on_warm_starts(top, drift):
    """Warm starts the way estimate_sharpness builds them (top Ritz vector of the previous
    operator + WARM_MIX × the runner-up, WARM_MIN_ITERS), after the operator drifted, including
    a crossing of the top two eigenvalues: the gap rule must deliver tol against eigvalsh and
    must not cost more products than the residual rule from the same start."""
    from stableopt.sharpness import WARM_MIN_ITERS, WARM_MIX

    n = 500
    A = _crowded(n, seed=11, top=top)
    evals, U = torch.linalg.eigh(A)
    g = torch.Generator().manual_seed(3)
    if drift == "perturbed":
        E = torch.randn(n, n, generator=g, dtype=torch.float64)
        A_prev = A + 0.02 * (E + E.T) / (2 * n) ** 0.5
    else:
        swapped = evals.clone()
        swapped[-1], swapped[-2] = evals[-2], evals[-1]
        A_prev = (U * swapped) @ U.T
    lam = float(evals[-1])
    crossing = drift == "top two swapped" and top[1] > 0.99
    cost = {}
    for seed in range(8):
        prev = stableopt.lanczos(
            lambda x: A_prev @ x,
            n=n,
            tol=1e-3,
            num_vectors=2,
            max_iters=n,
            generator=torch.Generator().manual_seed(seed),
            dtype=torch.float64,
        )
        v0 = prev.eigenvectors[0] + WARM_MIX * prev.eigenvectors[1]
        for bound in ("gap", "residual"):
            res = stableopt.lanczos(
                lambda x: A @ x, v0, tol=1e-3, bound=bound, max_iters=n, min_iters=WARM_MIN_ITERS, dtype=torch.float64
            )
            assert res.converged
            err = abs(float(res.eigenvalues[0]) - lam) / lam
            if crossing:
                # a crossing inside a 0.35% cluster: a single-vector Krylov space cannot resolve it
                # in a few steps, and both rules sometimes stop on the old top eigenvector (5–6 of 40
                # starts each, benchmarks/README.md); the error is then bounded by the
                # gap between the two crossing eigenvalues
                assert err <= 1 - top[1] + 1e-3, (bound, seed)
            else:
                assert err <= 1e-3, (bound, seed)
            cost.setdefault(bound, []).append(res.matvecs)
    assert sum(cost["gap"]) <= sum(cost["residual"])
