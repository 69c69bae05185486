"""Fixed-budget tracking (stableopt.tracking, opt.monitor(..., budget=b)): the budget is never
exceeded, the estimate and its residual bound are exact for the current operator, and the tracked
value converges to the true top eigenvalue of a slowly drifting operator (eigvalsh reference)."""

from __future__ import annotations

import math

import pytest
import torch
from test_blocks import noisy_adam
from test_sharpness import _equal, _setup, _snapshot
from torch import nn

import stableopt
from stableopt import DenseOperator
from stableopt.tracking import Tracker

CPU = torch.device("cpu")


def _drifting(n=120, gap=0.05, seed=0, rate=0.003):
    """A_t = Q_t·diag(λ·(1 + 0.3·sin(15·rate·t)))·Q_tᵀ with Q_t rotating slowly: the top
    eigenvalue and eigenvector both move every step."""
    g = torch.Generator().manual_seed(seed)
    lam = torch.cat(
        [
            torch.tensor([1.0, 1 - gap, 1 - 2 * gap], dtype=torch.float64),
            0.8 * torch.rand(n - 3, generator=g, dtype=torch.float64) - 0.1,
        ]
    )
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    K = torch.randn(n, n, generator=g, dtype=torch.float64)
    R = torch.linalg.matrix_exp(rate * (K - K.T) / math.sqrt(n))
    t = 0
    while True:
        yield Q @ torch.diag(lam * (1 + 0.3 * math.sin(15 * rate * t))) @ Q.T
        Q, t = R @ Q, t + 1


@pytest.mark.parametrize("budget", [1, 2, 4])
def test_tracked_value_converges_to_the_top_eigenvalue_of_a_drifting_operator(budget):
    tracker = Tracker(budget, generator=torch.Generator().manual_seed(1))
    errors = []
    for _, A in zip(range(250), _drifting()):
        calls = [0]

        def mv(x, A=A, calls=calls):
            calls[0] += 1
            return A @ x

        est = tracker.step(DenseOperator(mv, A.shape[0], torch.float64, CPU))
        eig = torch.linalg.eigvalsh(A)
        assert calls[0] == est.hvps <= budget  # never more than the budget
        assert est.value <= float(eig[-1]) * (1 + 1e-12)  # a Rayleigh quotient: from below
        # the residual bound is rigorous: some eigenvalue lies within it
        assert float((eig - est.value).abs().min()) <= est.residual * abs(est.value) * (1 + 1e-9) + 1e-13
        errors.append(abs(est.value - float(eig[-1])) / float(eig[-1]))
    assert errors[0] > 1e-2  # a random start is far off...
    assert max(errors[-50:]) < {1: 1e-4, 2: 1e-5, 4: 1e-6}[budget]  # ...and the tracker follows the moving top


def test_tracker_on_a_static_operator_reaches_machine_precision():
    A = torch.diag(torch.linspace(-0.5, 1.0, 80, dtype=torch.float64))
    op = DenseOperator(lambda x: A @ x, 80, torch.float64, CPU)
    tracker = Tracker(3, generator=torch.Generator().manual_seed(0))
    est = [tracker.step(op) for _ in range(60)][-1]
    assert est.value == pytest.approx(1.0, rel=1e-12) and est.residual < 1e-6 and not est.cold


def _trained(budget, steps, hvp="auto", every=1):
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True, steps=1)
    calls = [0]

    def counted():
        calls[0] += 1
        return loss_fn()

    mon = opt.monitor(counted, every=every, budget=budget, hvp=hvp)
    per_step = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        before = calls[0]
        opt.step()
        per_step.append(calls[0] - before)
    return model, loss_fn, opt, mon, per_step


@pytest.mark.parametrize("budget", [1, 3])
def test_a_tracking_monitor_never_spends_more_than_its_budget(budget):
    # with hvp="fd" a product is four gradient evaluations (fourth-order stencil; none of this
    # model's steps needs a shorter one) and the measurement one more (the gradient at θ): an
    # independent count of the products, through the loss function itself
    model, loss_fn, opt, mon, per_step = _trained(budget, 25, hvp="fd")
    tracking = opt.history.tracking()
    assert len(tracking["track_step"]) == 25 and tracking["track_step"].tolist() == list(range(2, 27))
    assert tracking["track_hvps"].tolist() == [budget] * 25
    assert max(per_step) <= 1 + 4 * budget
    assert len(opt.history) == 0  # estimates are not measurements


def test_tracked_ratio_follows_training_and_converges_once_the_state_stops_moving():
    model, loss_fn, opt, mon, _ = _trained(2, 60)
    tight = opt.sharpness(loss_fn, tol=1e-10, max_iters=66)
    track = opt.history.tracking()
    # early Adam training at lr 1e-2 moves the operator fast; tracking follows within 1e-3
    assert track["track_ratio"][-1] == pytest.approx(tight.ratio, rel=1e-3)
    assert mon.last.ratio == track["track_ratio"][-1] and mon.last.hvps == 2 and mon.fired[-1] == opt.steps_taken
    assert mon.last.converged == (mon.last.residual <= mon.tol)
    for _ in range(40):  # the same state again and again: the continued iteration converges
        last = mon.measure()
    assert last.ratio == pytest.approx(tight.ratio, rel=1e-9) and last.residual < 1e-6


def test_tracking_uses_the_ratio_operator_when_group_thresholds_differ():
    model, loss_fn, opt, mon, _ = _trained(4, 40)
    assert len(set(opt.stability_threshold())) == 2  # the two groups have different lrs
    for _ in range(20):
        last = mon.measure()
    assert math.isnan(last.preconditioned) and math.isnan(opt.history.tracking()["track"][-1])
    assert last.ratio == pytest.approx(opt.sharpness(loss_fn, tol=1e-10).ratio, rel=1e-9)


def test_a_tracking_step_leaves_params_grads_state_rng_and_buffers_untouched():
    model, opt, loss_fn = noisy_adam()
    mon = opt.monitor(loss_fn, budget=2)
    before = _snapshot(model, opt)
    mon.measure()
    assert _equal(before, _snapshot(model, opt))
    assert "track:0" in opt.warm_starts


def test_a_resumed_run_keeps_the_budget_and_the_carried_vector():
    model, loss_fn, opt, mon, _ = _trained(2, 10)
    sd = opt.state_dict()
    carried = opt.warm_starts["track:0"].clone()
    model2, x, loss_of, loss_fn2, opt2 = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True, steps=0)
    opt2.load_state_dict(sd)
    mon2 = opt2.monitor(loss_fn2)
    assert mon2.budget == 2 and torch.equal(opt2.warm_starts["track:0"], carried)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(budget=0), ValueError, "budget must be a positive integer"),
        (dict(budget=1.5), ValueError, "budget must be a positive integer"),
        (dict(budget=2, raw=True), ValueError, "tracking monitor .* follows λ_max"),
        (dict(budget=2, k=2), ValueError, "tracking monitor .* follows λ_max"),
    ],
)
def test_bad_budgets(kwargs, exc, match):
    w = nn.Parameter(torch.ones(2))
    opt = stableopt.SGD([w], lr=0.1)
    with pytest.raises(exc, match=match):
        opt.monitor(lambda: (w**2).sum(), **kwargs)
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        Tracker(0)


def test_a_tracking_monitor_logs_what_it_records_and_keeps_a_directional_schedule():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True, steps=1)
    logged = []
    opt.monitor(loss_fn, budget=2, log=lambda metrics, step: logged.append((step, metrics)), directional="gradient")
    for _ in range(4):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    tracking = opt.history.tracking()
    assert [s for s, _ in logged] == tracking["track_step"].tolist()
    assert [m["stableopt/ratio"] for _, m in logged] == tracking["track_ratio"].tolist()  # two groups: no common λ
    assert len(opt.history.directional("gradient")["directional_step"]) == 4
    # both schedules survive a checkpoint
    schedule = opt.state_dict()["stableopt"]["components"]["monitors"]["schedules"][0]
    assert schedule["budget"] == 2 and schedule["directional"] == "gradient"
