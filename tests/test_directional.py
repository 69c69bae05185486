"""Directional sharpness (stableopt/directional.py) against dense float64 references: uᵀH_eff u /
uᵀPu with H from torch.func.hessian, the optimizer's P and group thresholds, for explicit, update
and gradient directions; one product; no side effects; the monitor, history and guard wiring."""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from test_sharpness import Bound, _equal, _noisy_model, _setup, _snapshot, mse
from torch import nn

import stableopt

CONFIGS = [
    ("Adam", nn.Tanh, "mse", dict(lr=1e-2), False),
    ("Adam", nn.ReLU, "ce", dict(lr=1e-2, amsgrad=True), True),
    ("Adam", nn.Tanh, "ce", dict(lr=1e-2, weight_decay=0.1), True),  # coupled decay: H + λI
    ("Adam", nn.Tanh, "mse", dict(lr=1e-2, weight_decay=0.05, maximize=True), True),
    ("AdamW", nn.ReLU, "mse", dict(lr=1e-2, weight_decay=0.5, betas=(0.8, 0.99)), True),  # decoupled
    ("RMSprop", nn.Tanh, "mse", dict(lr=1e-3, centered=True, momentum=0.5, weight_decay=0.05), True),
    ("SGD", nn.Tanh, "ce", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01), True),
    ("SGD", nn.ReLU, "mse", dict(lr=0.1, maximize=True), False),
]
IDS = [f"{c[0]}-{c[2]}-{'-'.join(f'{k}={v}' for k, v in c[3].items())}-groups{2 if c[4] else 1}" for c in CONFIGS]


def _flat(tensors):
    return torch.cat([t.reshape(-1).double() for t in tensors])


def _dense(model, x, loss_of, opt, grad_at=None):
    """(H_eff, P, τ, s·g + λθ) of the optimizer's parameters, flat, in float64; g is the gradient
    at the flat parameters ``grad_at`` (default: the current ones), θ the current parameters."""
    model64 = copy.deepcopy(model).double()
    H = dense_hessian(Bound(model64, x.double()), lambda out: loss_of(out).double())
    groups = opt.param_groups
    sign = -1.0 if groups[0].get("maximize", False) else 1.0
    lam = torch.cat(
        [
            torch.full((p.numel(),), opt._coupled_weight_decay(g), dtype=torch.float64)
            for g in groups
            for p in g["params"]
        ]
    )
    tau = torch.cat(
        [
            torch.full((p.numel(),), t, dtype=torch.float64)
            for g, t in zip(groups, opt.stability_threshold())
            for p in g["params"]
        ]
    )
    P = _flat(opt.preconditioner())
    params = [p for g in groups for p in g["params"]]
    assert [id(p) for p in params] == [id(p) for p in model.parameters()]  # one layout for all
    theta = _flat([p.detach() for p in params])
    bound = Bound(model64, x.double())
    names = [n for n, _ in bound.named_parameters()]

    def loss_at(flat):  # the gradient by torch.func, not from .grad
        views = [c.view(p.shape) for c, p in zip(flat.split([p.numel() for p in params]), params)]
        return loss_of(torch.func.functional_call(bound, dict(zip(names, views)), ()))

    g = torch.func.grad(loss_at)(theta if grad_at is None else grad_at)
    return sign * H + torch.diag(lam), P, tau, sign * g + lam * theta


def _quotients(H, P, tau, u):
    return float(u @ H @ u / (u @ (P * u))), float(u @ H @ u / (u @ (tau * P * u)))


@pytest.mark.parametrize("name,activation,loss,kwargs,two_groups", CONFIGS, ids=IDS)
def test_every_direction_matches_the_dense_rayleigh_quotient_to_1e8(name, activation, loss, kwargs, two_groups):
    model, x, loss_of, loss_fn, opt = _setup(name, activation, loss, torch.float64, kwargs, two_groups, steps=4)
    tracking = opt.track_updates()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss_fn().backward()
    opt.step()  # step 5, tracked: its update θ_5 − θ_4 is the "update" direction
    # .grad holds the gradient that step used, at θ_4: "gradient" is P⁻¹(s·g(θ_4) + λθ_5)
    H, P, tau, grad = _dense(model, x, loss_of, opt, grad_at=_flat(before))
    update = _flat([p.detach() - b for p, b in zip(model.parameters(), before)])
    g = torch.Generator().manual_seed(3)
    explicit = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    cases = {"update": update, "gradient": grad / P, "explicit": _flat(explicit)}
    for direction, u in cases.items():
        rep = opt.directional_sharpness(loss_fn, explicit if direction == "explicit" else direction)
        value, ratio = _quotients(H, P, tau, u)
        assert rep.direction == direction and rep.step == 5 and rep.hvps == 1
        assert rep.value == pytest.approx(value, rel=1e-8, abs=1e-12)
        assert rep.ratio == pytest.approx(ratio, rel=1e-8, abs=1e-14)
        assert rep.threshold == pytest.approx(float((u @ (tau * P * u)) / (u @ (P * u))), rel=1e-12)
        assert rep.hvp_backend == "autograd" and rep.loss == pytest.approx(float(loss_fn().detach()), rel=1e-12)
        # Rayleigh quotients of P^{-1/2}HP^{-1/2} and (τP)^{-1/2}H(τP)^{-1/2}: never above their λ_max
        for bound, d in ((rep.value, P.rsqrt()), (rep.ratio, (tau * P).rsqrt())):
            assert bound <= float(torch.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1]) * (1 + 1e-10)
    tracking.remove()


def test_per_group_thresholds_weight_the_ratio_by_each_groups_share_of_uPu():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True)
    taus = opt.stability_threshold()
    assert taus[0] != pytest.approx(taus[1])  # the second group runs at 3× the lr
    H, P, tau, _ = _dense(model, x, loss_of, opt)
    g = torch.Generator().manual_seed(5)
    explicit = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in model.parameters()]
    u = _flat(explicit)
    n0 = sum(p.numel() for p in opt.param_groups[0]["params"])
    share0, share1 = float(u[:n0] @ (P[:n0] * u[:n0])), float(u[n0:] @ (P[n0:] * u[n0:]))
    rep = opt.directional_sharpness(loss_fn, explicit)
    curvature = float(u @ H @ u)
    assert rep.ratio == pytest.approx(curvature / (taus[0] * share0 + taus[1] * share1), rel=1e-8)
    assert rep.threshold == pytest.approx((taus[0] * share0 + taus[1] * share1) / (share0 + share1), rel=1e-12)
    # a direction in one group only is judged by that group's threshold alone
    only1 = [torch.zeros_like(t) if i < 2 else t for i, t in enumerate(explicit)]
    rep1 = opt.directional_sharpness(loss_fn, only1)
    assert rep1.value / rep1.ratio == pytest.approx(taus[1], rel=1e-12)


def test_estimate_directional_sharpness_on_groups_equals_the_optimizer_method():
    model, x, loss_of, loss_fn, opt = _setup(
        "AdamW", nn.Tanh, "mse", torch.float64, dict(lr=1e-2, weight_decay=0.1), True
    )
    u = [torch.ones_like(p) for p in model.parameters()]
    a = opt.directional_sharpness(loss_fn, u)
    b = stableopt.estimate_directional_sharpness(loss_fn, opt._sharpness_groups(), u, step=opt.steps_taken)
    assert (a.value, a.ratio, a.threshold, a.step) == (b.value, b.ratio, b.threshold, b.step)


def test_one_hessian_vector_product_and_one_forward_with_autograd():
    model, x, loss_of, _, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    calls = []

    def loss_fn():
        calls.append(1)
        return loss_of(model(x))

    loss_fn().backward()
    calls.clear()
    rep = opt.directional_sharpness(loss_fn, "gradient", hvp="autograd")
    assert rep.hvps == 1 and len(calls) == 1  # the gradient graph is built once and used once
    calls.clear()
    rep = opt.directional_sharpness(loss_fn, "gradient", hvp="fd")
    assert rep.hvps == 1 and rep.hvp_backend == "fd"
    sharp = opt.sharpness(loss_fn, hvp="fd", tol=1e-6)
    assert sharp.hvps > 1  # what the directional measurement saves


@pytest.mark.parametrize("hvp", ["autograd", "fd"])
@pytest.mark.parametrize("direction", ["update", "gradient", "explicit"])
def test_measuring_leaves_params_grads_state_rng_and_buffers_untouched(direction, hvp):
    model, x, y = _noisy_model(), torch.randn(32, 6), torch.randn(32, 2)  # BatchNorm and dropout
    loss_fn = lambda: (random.random(), np.random.rand(), mse(model(x), y))[-1]  # noqa: E731 - draws from every RNG
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    opt.track_updates()
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    loss_fn().backward()  # leave a gradient in .grad
    before = _snapshot(model, opt)
    arg = [torch.ones_like(p) for p in model.parameters()] if direction == "explicit" else direction
    rep = opt.directional_sharpness(loss_fn, arg, hvp=hvp)
    assert math.isfinite(rep.value) and rep.hvp_backend == hvp
    assert _equal(before, _snapshot(model, opt))


def test_frozen_parameters_are_dropped_and_unmoved_ones_contribute_nothing():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, dtype=torch.float64)
    unused = nn.Parameter(torch.ones(4, dtype=torch.float64))  # never has a gradient: P = inf
    fixed = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    slow = nn.Parameter(torch.ones(2, dtype=torch.float64))  # in a group with lr 0: never moves
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    loss_fn = lambda: mse(lin(x) * slow + fixed, y)  # noqa: E731
    opt = stableopt.Adam([{"params": [*lin.parameters(), unused, fixed]}, {"params": [slow], "lr": 0.0}], lr=1e-2)
    opt.track_updates()
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert torch.isinf(opt.preconditioner()[2]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no NaN surprises, no warning
        upd = opt.directional_sharpness(loss_fn, "update")
        grad = opt.directional_sharpness(loss_fn, "gradient")
        big = [torch.ones_like(p) for p in (*lin.parameters(), unused, fixed, slow)]
        on_frozen = opt.directional_sharpness(loss_fn, big)
        without = opt.directional_sharpness(loss_fn, [*big[:2], None, None, big[4]])
    for rep in (upd, grad, on_frozen):
        assert math.isfinite(rep.value) and math.isfinite(rep.ratio) and rep.hvps == 1
    assert upd.threshold == pytest.approx(opt.stability_threshold()[0])  # the lr-0 group did not move
    assert (on_frozen.value, on_frozen.ratio) == (without.value, without.ratio)  # inf-P coordinates dropped


def test_a_zero_direction_gives_nan_a_warning_and_no_product():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    opt = stableopt.SGD([w], lr=0.0)  # steps that do not move
    opt.track_updates()
    loss_fn().backward()
    opt.step()
    for direction in ("update", [torch.zeros(2, dtype=torch.float64)]):
        with pytest.warns(RuntimeWarning, match="direction is zero"):
            rep = opt.directional_sharpness(loss_fn, direction)
        assert math.isnan(rep.value) and math.isnan(rep.ratio) and rep.hvps == 0
    assert np.isnan(opt.history.directional()["directional"]).all()


def test_update_tracking_costs_nothing_unless_asked_and_is_removed_with_its_last_user():
    w = nn.Parameter(torch.ones(3))
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    opt = stableopt.Adam([w], lr=0.1)
    assert len(opt._optimizer_step_pre_hooks) == 0
    opt.monitor(loss_fn, every=10, directional="gradient")
    assert len(opt._optimizer_step_pre_hooks) == 0  # the gradient needs no memory
    handle = opt.track_updates()
    monitor = opt.monitor(loss_fn, every=10, directional="update")
    assert len(opt._optimizer_step_pre_hooks) == 1  # one tracker for both users
    handle.remove()
    handle.remove()  # idempotent
    assert len(opt._optimizer_step_pre_hooks) == 1
    monitor.remove()
    assert len(opt._optimizer_step_pre_hooks) == 0
    loss_fn().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"keeps only when asked.*track_updates\(\)"):
        opt.directional_sharpness(loss_fn, "update")
    with opt.track_updates():  # tracking begun after the step cannot know its update
        with pytest.raises(RuntimeError, match="step 1.*was not tracked"):
            opt.directional_sharpness(loss_fn, "update")


def test_monitor_records_directional_columns_every_n_steps_and_they_survive_save_and_resume(tmp_path):
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True, steps=1)
    opt.monitor(loss_fn, every=3, directional="update", directional_every=2)
    opt.monitor(loss_fn, every=100, directional="gradient")
    values = {}
    for t in range(2, 8):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
        if t % 2 == 0:
            H, P, tau, _ = _dense(model, x, loss_of, opt)
            values[t] = _quotients(H, P, tau, _flat([p.detach() - b for p, b in zip(model.parameters(), before)]))
    h = opt.history
    upd = h.directional("update")
    assert upd["directional_step"].tolist() == [2, 4, 6]
    assert upd["directional"] == pytest.approx([values[t][0] for t in (2, 4, 6)], rel=1e-8)
    assert upd["directional_ratio"] == pytest.approx([values[t][1] for t in (2, 4, 6)], rel=1e-8)
    assert h.directional("gradient")["directional_step"].tolist() == list(range(2, 8))
    assert set(h.columns("directional")) == {
        "directional_step",
        "directional",
        "directional_ratio",
        "directional_hvps",
        "directional_kind",
    }
    assert h.column("step").tolist() == [3, 6]  # the λ_max schedule is unchanged
    path = tmp_path / "run.safetensors"
    h.save(path)
    loaded = stableopt.History.load(path)
    for name in h.columns("directional"):
        assert loaded.column(name).tobytes() == h.column(name).tobytes()
    # a resumed run takes the directional schedule back
    sd = opt.state_dict()
    opt2 = stableopt.Adam([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], lr=1e-2)
    opt2.load_state_dict(sd)
    mon = opt2.monitor(loss_fn)
    assert (mon.directional, mon.directional_every, mon.every) == ("update", 2, 3)
    assert len(opt2.history.directional()["directional"]) == 9


def test_a_history_without_directional_measurements_writes_the_old_layout(tmp_path):
    from safetensors import safe_open

    _, _, _, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    opt.sharpness(loss_fn)
    opt.history.save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="np") as f:
        assert not any(k.startswith("directional") for k in f.keys())
    loaded = stableopt.History.load(tmp_path / "a.safetensors")
    assert len(loaded.directional()["directional"]) == 0


def test_report_and_plot_show_the_directional_measurements(tmp_path):
    pytest.importorskip("matplotlib")
    from rich.console import Console

    _, _, _, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    opt.sharpness(loss_fn)
    rep = opt.directional_sharpness(loss_fn, "gradient")
    console = Console(record=True, width=140, color_system=None)
    console.print(stableopt.render_report(opt.history))
    text = console.export_text()
    assert "along the gradient" in text and f"{rep.ratio:.3f}" in text and "along the update" not in text
    fig = stableopt.plot_history(opt.history, tmp_path / "h.png")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert "along the gradient (lower bound)" in labels


def test_a_history_of_directional_measurements_only_reports_and_plots_them(tmp_path):
    pytest.importorskip("matplotlib")
    from rich.console import Console

    _, _, _, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    reps = [opt.directional_sharpness(loss_fn, "gradient")]
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    reps.append(opt.directional_sharpness(loss_fn, "gradient"))
    assert len(opt.history) == 0  # no λ_max measurement at all
    console = Console(record=True, width=140, color_system=None)
    console.print(stableopt.render_report(opt.history))
    text = console.export_text()
    assert "No measurements yet" in text and "along the gradient" in text and f"{reps[-1].ratio:.3f}" in text
    fig = stableopt.plot_history(opt.history, tmp_path / "d.png")
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"along the gradient (lower bound)", "threshold"}
    assert lines["along the gradient (lower bound)"].get_ydata().tolist() == [r.value for r in reps]
    # the threshold the ratios imply is Adam's τ = (2 + 2β1)/((1 − β1)η), from the formula
    tau = (2 + 2 * 0.9) / ((1 - 0.9) * 1e-2)
    assert np.allclose(lines["threshold"].get_ydata(), tau, rtol=1e-12)


def _quadratic(a):
    """f = ½ Σ a_i x_i² at x = 1 (H = diag(a)), and its SGD optimizer with lr 0.03 (τ = 2/0.03)."""
    w = nn.Parameter(torch.ones(len(a), dtype=torch.float64))
    A = torch.tensor(a, dtype=torch.float64)
    return w, (lambda: 0.5 * (A * w * w).sum()), A


def test_guard_signal_directional_acts_on_the_directional_ratio_only():
    w, loss_fn, A = _quadratic([100.0, 1.0])
    e1 = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    # along e1: uᵀHu/uᵀu = 100; τ = 2/0.03; ratio = 100·0.03/2 = 1.5 > trigger 1.2
    opt = stableopt.SGD([w], lr=0.03, guard=stableopt.LRGuard(signal="directional"))
    loss_fn().backward()
    opt.step()
    rep = opt.directional_sharpness(loss_fn, e1)
    assert rep.ratio == pytest.approx(1.5, rel=1e-12)
    assert opt.guard.factors == pytest.approx([0.9 / 1.5])  # cut to target 0.9
    assert opt.history.events()[0].ratio == pytest.approx(1.5)
    factor = opt.guard.factors[0]
    opt.sharpness(loss_fn)  # λ_max measurements are not its signal
    assert opt.guard.factors[0] == factor
    # the default guard ignores directional measurements
    w2, loss2, _ = _quadratic([100.0, 1.0])
    opt2 = stableopt.SGD([w2], lr=0.03, guard=True)
    loss2().backward()
    opt2.step()
    opt2.directional_sharpness(loss2, e1)
    assert opt2.guard.factors == [1.0]
    opt2.sharpness(loss2)
    assert opt2.guard.factors[0] < 1.0


def test_guard_on_a_monitored_update_direction_of_a_quadratic():
    # SGD on f = ½ Σ a_i x_i²: the update is −η·a⊙x, so its ratio is η/2 · Σ a³x² / Σ a²x²
    a = [100.0, 1.0]
    w, loss_fn, A = _quadratic(a)
    opt = stableopt.SGD([w], lr=0.03, guard=stableopt.LRGuard(signal="directional"))
    opt.monitor(loss_fn, every=1000, directional="update")
    x = w.detach().clone()
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    expected = 0.03 / 2 * float((A**3 * x**2).sum() / (A**2 * x**2).sum())
    rep_ratio = float(opt.history.directional("update")["directional_ratio"][0])
    assert rep_ratio == pytest.approx(expected, rel=1e-12) and expected > 1.2
    assert opt.guard.factors == pytest.approx([0.9 / expected])
    assert opt.effective_lr() == pytest.approx([0.03 * 0.9 / expected])


BAD = [
    ("sideways", ValueError, r"direction must be one of \('update', 'gradient'\) or a list of tensors.*got 'sideways'"),
    (3, TypeError, "direction must be one of .* got int"),
    ([torch.ones(2)], ValueError, r"direction has 1 tensors, expected one per parameter \(2\)"),
    ([torch.ones(2), torch.ones(2)], ValueError, r"direction\[1\] has shape \(2,\), its parameter \(3,\)"),
    ([torch.ones(2), [1.0, 2.0, 3.0]], TypeError, r"direction\[1\] must be a tensor \(or None\), got list"),
    (
        [torch.ones(2), torch.ones(3, dtype=torch.long)],
        TypeError,
        r"direction\[1\] must be a real floating-point tensor",
    ),
    ([torch.ones(2), torch.tensor([1.0, math.nan, 0.0])], ValueError, r"direction\[1\] has non-finite entries"),
]


@pytest.mark.parametrize("direction,exc,pattern", BAD, ids=[b[2][:30] for b in BAD])
def test_bad_directions_raise_clear_errors(direction, exc, pattern):
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(3))
    opt = stableopt.SGD([a, b], lr=0.1)
    with pytest.raises(exc, match=pattern):
        opt.directional_sharpness(lambda: (a**2).sum() + (b**2).sum(), direction)


def test_bad_calls_and_options_raise_clear_errors():
    w = nn.Parameter(torch.ones(2))
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    adam = stableopt.Adam([w], lr=0.1)
    with pytest.raises(RuntimeError, match="call step"):
        adam.directional_sharpness(loss_fn, "gradient")
    sgd = stableopt.SGD([w], lr=0.1)
    with pytest.raises(RuntimeError, match=r"none has one: call loss.backward\(\)"):
        sgd.directional_sharpness(loss_fn, "gradient")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        sgd.directional_sharpness(3, "gradient")
    with pytest.raises(ValueError, match="hvp must be one of"):
        sgd.directional_sharpness(loss_fn, [torch.ones(2)], hvp="exact")
    with pytest.raises(ValueError, match=r"'update' needs the optimizer"):
        stableopt.estimate_directional_sharpness(loss_fn, sgd._sharpness_groups(), "update")
    with pytest.raises(
        ValueError, match=r"directional must be one of \('update', 'gradient'\) or None, got 'explicit'"
    ):
        sgd.monitor(loss_fn, directional="explicit")
    with pytest.raises(ValueError, match="directional_every must be a positive integer, got 0"):
        sgd.monitor(loss_fn, directional="update", directional_every=0)
    with pytest.raises(ValueError, match=r"signal must be one of \('ratio', 'directional'\), got 'loss'"):
        stableopt.LRGuard(signal="loss")
    with pytest.raises(ValueError, match="drop every= and add opt.monitor"):
        stableopt.LRGuard(signal="directional", every=5)
