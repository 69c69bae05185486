"""The measurement seam: the operators of stableopt.measure() against dense float64 matrices,
their reductions and bookkeeping, and Lanczos on an operator against Lanczos on a plain matvec."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_hessian
from test_sharpness import Bound, _setup, mse
from torch import nn

import stableopt


def _dense_operators(model, x, loss_of, opt):
    H = dense_hessian(Bound(model, x), loss_of)
    groups = opt.param_groups
    sign = -1.0 if groups[0].get("maximize", False) else 1.0
    lam = torch.cat(
        [
            torch.full((p.numel(),), opt.stability_rule.coupled_weight_decay(g), dtype=torch.float64)
            for g in groups
            for p in g["params"]
        ]
    )
    H = sign * H + torch.diag(lam)
    P = torch.cat([P.reshape(-1) for P in opt.preconditioner()])
    tau = torch.cat(
        [
            torch.full((p.numel(),), t, dtype=torch.float64)
            for g, t in zip(groups, opt.stability_threshold())
            for p in g["params"]
        ]
    )
    scale = {"preconditioned": P.rsqrt(), "ratio": (tau * P).rsqrt(), "raw": torch.ones_like(P)}
    return {kind: d[:, None] * H * d[None, :] for kind, d in scale.items()}


@pytest.mark.parametrize("hvp", ["autograd", "fd", "forward"])
def test_each_operator_is_its_dense_matrix(hvp):
    model, x, loss_of, loss_fn, opt = _setup(
        "Adam", nn.Tanh, "ce", torch.float64, dict(lr=1e-2, weight_decay=0.2), True
    )
    dense = _dense_operators(model, x, loss_of, opt)
    g = torch.Generator().manual_seed(0)
    with opt.measure(loss_fn, hvp=hvp) as m:
        assert m.backend == hvp and m.loss == pytest.approx(float(loss_fn()), rel=1e-12)
        for kind, A in dense.items():
            op = m.operator(kind)
            assert op.size == op.local_size == A.shape[0] and op.dtype == torch.float64 and op.kind == kind
            v = op.random(g)
            exact = A @ v  # fd: each product carries the O(√u) finite-difference error
            assert float((op.matvec(v) - exact).norm() / exact.norm()) < (1e-6 if hvp == "fd" else 1e-12)
            w = op.random(g)
            assert float(op.dot(v, w)) == pytest.approx(float(v @ w), rel=1e-12)
            assert float(op.norm(v)) == pytest.approx(float(v.norm()), rel=1e-12)
        assert m.products == len(dense)  # one product per matvec, shared by the operators


def test_lanczos_on_an_operator_equals_lanczos_on_its_plain_matvec():
    model, x, loss_of, loss_fn, opt = _setup(
        "RMSprop", nn.ReLU, "mse", torch.float64, dict(lr=1e-3, momentum=0.5), False
    )
    A = _dense_operators(model, x, loss_of, opt)["preconditioned"]
    with opt.measure(loss_fn) as m:
        op = m.operator("preconditioned")
        v0 = op.random(torch.Generator().manual_seed(1))
        fast = stableopt.lanczos(op, v0, k=3, tol=1e-10, max_iters=80, max_basis=10)
        plain = stableopt.lanczos(op.matvec, v0, k=3, tol=1e-10, max_iters=80, max_basis=10)
    reference = torch.linalg.eigvalsh(A).flip(0)[:3]
    assert torch.allclose(fast.eigenvalues, plain.eigenvalues, rtol=1e-12)
    assert torch.allclose(fast.eigenvalues, reference, rtol=1e-9)
    assert fast.matvecs == plain.matvecs


def test_measure_from_groups_is_the_public_seam():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    H = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    group = stableopt.MeasuredGroup(
        [w], [torch.tensor([4.0, 1.0], dtype=torch.float64)], threshold=2.0, sign=-1.0, weight_decay=0.5
    )
    with stableopt.measure(lambda: -0.5 * w @ H @ w, [group], hvp="autograd") as m:  # maximize: −(−H) = H
        op = m.operator("preconditioned")
        x = torch.tensor([1.0, 0.0], dtype=torch.float64)
        d = torch.tensor([0.5, 1.0], dtype=torch.float64)
        assert torch.allclose(op.matvec(x), d * ((H + 0.5 * torch.eye(2, dtype=torch.float64)) @ (d * x)))
    assert "preconditioned" in repr(op) and op.products == 1


def test_leaving_the_context_restores_state_even_after_an_error():
    from test_sharpness import _equal, _noisy_model, _snapshot

    model = _noisy_model()
    xx, yy = torch.randn(32, 6), torch.randn(32, 2)
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    mse(model(xx), yy).backward()
    opt.step()
    before = _snapshot(model, opt)
    with pytest.raises(KeyError):
        with opt.measure(lambda: mse(model(xx), yy), hvp="fd") as m:
            m.operator("raw").matvec(torch.ones(m.space.local_size))
            raise KeyError("user code fails inside the context")
    assert _equal(before, _snapshot(model, opt))


def test_unknown_operator_kind_lists_the_kinds():
    w = nn.Parameter(torch.ones(2))
    opt = stableopt.SGD([w], lr=0.1)
    with opt.measure(lambda: (w**2).sum()) as m:
        with pytest.raises(
            ValueError, match=r"kind must be one of \('preconditioned', 'ratio', 'raw'\), got 'hessian'"
        ):
            m.operator("hessian")
