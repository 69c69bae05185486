"""Hutch++ and Hutchinson (stableopt.trace) and opt.hessian_trace against dense float64 traces."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from test_blocks import _dense, noisy_adam
from test_sharpness import _equal, _setup, _snapshot
from torch import nn

from stableopt import DenseOperator
from stableopt.trace import hutch_plus_plus, hutchinson, orthonormalize, rademacher

CPU = torch.device("cpu")


def _operator(A):
    return DenseOperator(lambda x: A @ x, A.shape[0], torch.float64, CPU)


def _low_rank_plus_noise(n=120, rank=6, seed=0):
    """A Hessian-like spectrum: a few large eigenvalues over a small symmetric bulk."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.linspace(100.0, 20.0, rank, dtype=torch.float64),
            0.3 * torch.randn(n - rank, generator=g, dtype=torch.float64),
        ]
    )
    return Q @ torch.diag(lam) @ Q.T


@pytest.mark.parametrize("preconditioned", [True, False])
@pytest.mark.parametrize("name,kw", [("Adam", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=0.1, maximize=True))])
def test_hutch_plus_plus_with_probes_at_least_n_is_the_dense_trace(name, kw, preconditioned):
    model, x, loss_of, loss_fn, opt = _setup(name, nn.Tanh, "mse", torch.float64, kw, True)
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    n = H.shape[0]
    exact = float((H.diagonal() / P).sum() if preconditioned else H.trace())
    for probes in (n, n + 7):
        rep = opt.hessian_trace(loss_fn, probes=probes, preconditioned=preconditioned)
        assert rep.trace == pytest.approx(exact, rel=1e-6, abs=1e-9)
        assert rep.stderr == 0.0 and rep.hvps == n and rep.size == n and rep.method == "hutch++"
        assert rep.preconditioned is preconditioned and rep.step == opt.steps_taken


@pytest.mark.parametrize("method", ["hutch++", "hutchinson"])
def test_with_fewer_probes_the_error_is_within_four_standard_errors_over_seeds(method):
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "ce", torch.float64, dict(lr=1e-2), True)
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    exact = float((H.diagonal() / P).sum())
    zs = []
    for seed in range(20):
        rep = opt.hessian_trace(loss_fn, probes=24, method=method, seed=seed)
        assert rep.hvps == 24 and rep.stderr > 0
        zs.append((rep.trace - exact) / rep.stderr)
    assert max(abs(z) for z in zs) <= 4.0
    assert statistics.pstdev(zs) < 2.0  # the standard errors are not wildly inflated either...
    assert statistics.pstdev(zs) > 0.3  # ...or deflated: they describe the spread


def test_hutch_plus_plus_has_far_less_variance_than_hutchinson_on_low_rank_plus_noise():
    A = _low_rank_plus_noise()
    op, exact = _operator(A), float(A.trace())
    errors = {"hutch++": [], "hutchinson": []}
    for seed in range(30):
        for name, fn in (("hutch++", hutch_plus_plus), ("hutchinson", hutchinson)):
            est = fn(op, 30, torch.Generator().manual_seed(seed))
            assert est.hvps == 30
            errors[name].append(est.trace - exact)
    mse_pp = statistics.fmean(e * e for e in errors["hutch++"])
    mse_h = statistics.fmean(e * e for e in errors["hutchinson"])
    assert mse_pp < mse_h / 20  # the top 6 eigenvalues dominate ‖A‖_F; the sketch removes them
    assert abs(statistics.fmean(errors["hutchinson"])) < 4 * math.sqrt(mse_h / 30)  # unbiased


def test_rademacher_probes_are_signs_drawn_from_the_private_generator():
    op = _operator(torch.eye(50, dtype=torch.float64))
    a = rademacher(op, torch.Generator().manual_seed(3))
    b = rademacher(op, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and set(a.tolist()) == {-1.0, 1.0}
    state = torch.get_rng_state()
    hutch_plus_plus(op, 9, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_orthonormalize_drops_dependent_rows():
    op = _operator(torch.eye(4, dtype=torch.float64))
    rows = torch.tensor([[1.0, 1, 0, 0], [2.0, 2, 0, 0], [0, 1.0, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    Q = orthonormalize(op, rows)
    assert Q.shape == (2, 4) and torch.allclose(Q @ Q.T, torch.eye(2, dtype=torch.float64), atol=1e-14)


def test_trace_measurement_leaves_params_grads_state_rng_and_buffers_untouched():
    model, opt, loss_fn = noisy_adam()
    before = _snapshot(model, opt)
    rep = opt.hessian_trace(loss_fn, probes=9)
    assert _equal(before, _snapshot(model, opt)) and math.isfinite(rep.trace)
    assert opt.measurements_taken == 0 and len(opt.history) == 0  # not a sharpness measurement
    assert "tr(P⁻¹H)" in str(rep)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(method="hutch"), ValueError, r"method must be one of \('hutch\+\+', 'hutchinson'\)"),
        (dict(probes=2), ValueError, "probes must be an integer >= 3 for method='hutch\\+\\+'"),
        (dict(probes=0, method="hutchinson"), ValueError, "probes must be an integer >= 1"),
        (dict(probes=5.0), ValueError, "probes must be an integer"),
        (dict(preconditioned="yes"), TypeError, "preconditioned must be a bool"),
        (dict(seed=1.5), TypeError, "seed must be an int or None"),
        (dict(hvp="double"), ValueError, "hvp must be one of"),
    ],
)
def test_bad_trace_arguments(kwargs, exc, match):
    model, x, loss_of, loss_fn, opt = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1), False)
    with pytest.raises(exc, match=match):
        opt.hessian_trace(loss_fn, **kwargs)
