"""Stochastic Lanczos quadrature (stableopt.density) and opt.spectral_density against the dense
float64 spectrum of P^{-1/2}·H·P^{-1/2}."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_blocks import _dense, noisy_adam
from test_sharpness import _equal, _setup, _snapshot
from torch import nn

import stableopt
from stableopt import DenseOperator
from stableopt.density import lanczos_quadrature
from stableopt.krylov import tridiagonalize


def _state(name="Adam", kw=None, two=True):
    model, x, loss_of, loss_fn, opt = _setup(
        name, nn.Tanh, "mse", torch.float64, kw or dict(lr=1e-2, weight_decay=0.1), two
    )
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    d = P.rsqrt()
    return loss_fn, opt, torch.linalg.eigvalsh(d[:, None] * H * d[None, :]), float((H.diagonal() / P).sum())


def test_weights_sum_to_one_and_nodes_lie_inside_the_dense_spectrum():
    loss_fn, opt, eig, _ = _state()
    rep = opt.spectral_density(loss_fn, probes=6, iters=15)
    lo, hi = float(eig[0]), float(eig[-1])
    slack = 1e-9 * max(abs(lo), abs(hi))
    assert len(rep.nodes) == len(rep.weights) == 6 and rep.hvps == 6 * 15 and rep.size == eig.numel()
    for nodes, weights in zip(rep.nodes, rep.weights):
        assert len(nodes) == len(weights) == 15
        assert math.fsum(weights) == pytest.approx(1.0, abs=1e-12) and min(weights) >= 0
        assert lo - slack <= min(nodes) and max(nodes) <= hi + slack
        assert list(nodes) == sorted(nodes)


@pytest.mark.parametrize(
    "name,kw", [("Adam", dict(lr=1e-2, weight_decay=1.0)), ("SGD", dict(lr=0.1, weight_decay=0.5))]
)
def test_first_moment_is_the_trace_over_n_within_five_percent(name, kw):
    model, x, loss_of, loss_fn, opt = _setup(name, nn.Tanh, "mse", torch.float64, kw, name == "Adam")
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    d = P.rsqrt()
    A = d[:, None] * H * d[None, :]
    n, mean = A.shape[0], float(A.trace()) / A.shape[0]
    # enough probes that 5% is four standard deviations of the Rademacher quadratic form
    sd = math.sqrt(2 * float((A**2).sum() - (A.diagonal() ** 2).sum())) / n
    probes = math.ceil((4 * sd / (0.05 * abs(mean))) ** 2)
    assert probes <= 200, "the test state has too noisy a trace for a quick test"
    rep = opt.spectral_density(loss_fn, probes=probes, iters=6)
    assert rep.moment(1) == pytest.approx(mean, rel=0.05)


def test_first_moment_is_hutchinson_on_the_same_probes():
    loss_fn, opt, eig, trace = _state("RMSprop", dict(lr=1e-3, momentum=0.5))
    rep = opt.spectral_density(loss_fn, probes=7, iters=5, seed=11)
    hutch = opt.hessian_trace(loss_fn, probes=7, method="hutchinson", seed=11)
    assert rep.moment(1) * rep.size == pytest.approx(hutch.trace, rel=1e-10)
    # and the second moment is tr(A²)/n by the same quadrature (exact up to degree 2·iters − 1)
    direct = []
    with opt.measure(loss_fn) as m:
        op = m.operator("preconditioned")
        g = torch.Generator().manual_seed(11)
        for _ in range(7):
            v = stableopt.trace.rademacher(op, g)
            direct.append(float(op.dot(op.matvec(v), op.matvec(v))) / rep.size)
    assert rep.moment(2) == pytest.approx(sum(direct) / 7, rel=1e-9)


def test_top_node_approaches_lambda_max_as_iters_grows():
    loss_fn, opt, eig, _ = _state()
    lam, n = float(eig[-1]), eig.numel()
    errors = [abs(opt.spectral_density(loss_fn, probes=1, iters=it).support[1] - lam) / lam for it in (2, 6, 15, n)]
    assert errors[0] > errors[1] > errors[2] and errors[0] > 1e-2
    assert errors[3] < 1e-9  # the whole space: the nodes are the eigenvalues


def test_density_is_a_smoothed_probability_density():
    loss_fn, opt, eig, _ = _state()
    rep = opt.spectral_density(loss_fn, probes=4, iters=12)
    sigma = rep.default_sigma()
    lo, hi = rep.support
    grid = np.linspace(lo - 10 * sigma, hi + 10 * sigma, 20001)
    phi = rep.density(grid, sigma)
    assert np.all(phi >= 0)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-6)
    assert np.trapezoid(grid * phi, grid) == pytest.approx(rep.moment(1), rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="sigma must be a positive number"):
        rep.density(grid, sigma=0.0)


def test_quadrature_is_exact_on_a_diagonal_matrix_with_iters_at_least_n():
    A = torch.diag(torch.tensor([-2.0, 0.5, 1.0, 3.0, 7.0], dtype=torch.float64))
    op = DenseOperator(lambda x: A @ x, 5, torch.float64, torch.device("cpu"))
    nodes, weights, ok = lanczos_quadrature(op, 3, 9, torch.Generator().manual_seed(0))
    assert ok
    for row, w in zip(nodes, weights):  # Rademacher probes: every weight is 1/n
        assert np.allclose(row, [-2.0, 0.5, 1.0, 3.0, 7.0], atol=1e-12) and np.allclose(w, 0.2, atol=1e-12)


def test_tridiagonalize_satisfies_the_lanczos_relation():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = B + B.T
    op = DenseOperator(lambda x: A @ x, 30, torch.float64, torch.device("cpu"))
    t = tridiagonalize(op, torch.randn(30, generator=g, dtype=torch.float64), 8)
    Q = t.basis
    lhs = A @ Q.T
    rhs = Q.T @ t.matrix() + float(t.betas[-1]) * torch.outer(t.next, torch.eye(8, dtype=torch.float64)[-1])
    assert torch.allclose(lhs, rhs, atol=1e-10) and torch.allclose(
        Q @ Q.T, torch.eye(8, dtype=torch.float64), atol=1e-12
    )
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        tridiagonalize(op, Q[0], 0)


def test_plot_density_writes_a_figure(tmp_path):
    pytest.importorskip("matplotlib")
    loss_fn, opt, eig, _ = _state()
    rep = opt.spectral_density(loss_fn, probes=2, iters=8)
    stableopt.plot_density(rep, tmp_path / "d.png", threshold=float(eig[-1]))
    assert (tmp_path / "d.png").stat().st_size > 1000
    empty = stableopt.DensityReport(0, (), (), 1, 1, 0, size=3)
    with pytest.raises(ValueError, match="no nodes"):
        stableopt.plot_density(empty, tmp_path / "e.png")


def test_density_measurement_leaves_params_grads_state_rng_and_buffers_untouched():
    model, opt, loss_fn = noisy_adam()
    before = _snapshot(model, opt)
    rep = opt.spectral_density(loss_fn, probes=2, iters=5, preconditioned=False)
    assert _equal(before, _snapshot(model, opt)) and not rep.preconditioned and "density of H" in str(rep)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(probes=0), ValueError, "probes must be a positive integer"),
        (dict(iters=True), ValueError, "iters must be a positive integer"),
        (dict(preconditioned=1), TypeError, "preconditioned must be a bool"),
    ],
)
def test_bad_density_arguments(kwargs, exc, match):
    loss_fn, opt, _, _ = _state("SGD", dict(lr=0.1), False)
    with pytest.raises(exc, match=match):
        opt.spectral_density(loss_fn, **kwargs)
