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
    res = stableopt.lanczos(lambda x: A @ x, n=200, k=2, tol=1e-8, generator=torch.Generator().manual_seed(0),
                            dtype=torch.float64, max_iters=200, num_vectors=3)
    assert res.converged and res.eigenvectors.shape == (3, 200)
    V = res.eigenvectors
    assert torch.allclose(V @ V.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    for i in range(2):
        r = A @ V[i] - res.eigenvalues[i] * V[i]
        assert float(r.norm()) / abs(float(res.eigenvalues[i])) == pytest.approx(float(res.residuals[i]), rel=1e-4, abs=1e-12)
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
    res = stableopt.lanczos(identity_view, n=40, k=1, tol=1e-10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
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

    res = stableopt.lanczos(matvec, n=30, k=1, tol=1e-12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
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
    res = stableopt.lanczos(lambda v: A @ v, n=300, k=1, tol=1e-6, bound=bound,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert res.converged and abs(float(res.eigenvalues[0]) - 4.0) / 4.0 <= 1e-6
