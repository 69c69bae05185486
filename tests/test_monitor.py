"""Monitors: exact schedules, removal, coexistence, the secant estimate, live output, resuming."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console
from torch import nn

import stableopt


def _setup(opt_cls=stableopt.Adam, seed=0, **kwargs):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh(), nn.Linear(6, 2, dtype=torch.float64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    kwargs.setdefault("lr", 0.05)
    opt = opt_cls(model.parameters(), **kwargs)
    return model, opt, (lambda: 0.5 * ((model(x) - y) ** 2).sum(1).mean())


def _train(opt, loss_fn, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()


def test_monitor_fires_exactly_at_the_scheduled_steps():
    _, opt, loss_fn = _setup()
    handle = opt.monitor(loss_fn, every=3)
    _train(opt, loss_fn, 10)
    assert handle.fired == [3, 6, 9]
    assert opt.history.column("step").tolist() == [3, 6, 9]
    assert opt.history.column("monitor").tolist() == [handle.id] * 3
    assert handle.last.step == 9 and handle.active


def test_removing_a_monitor_stops_it_and_unhooks_it():
    _, opt, loss_fn = _setup()
    assert not opt._optimizer_step_post_hooks  # no monitor: nothing runs around step()
    handle = opt.monitor(loss_fn, every=2)
    assert len(opt._optimizer_step_post_hooks) == 1
    _train(opt, loss_fn, 4)
    handle.remove()
    handle.remove()  # idempotent
    _train(opt, loss_fn, 6)
    assert opt.history.column("step").tolist() == [2, 4]
    assert not opt._optimizer_step_post_hooks and not handle.active
    with opt.monitor(loss_fn, every=1) as scoped:  # a context manager removes it on exit
        _train(opt, loss_fn, 1)
    _train(opt, loss_fn, 1)
    assert scoped.fired == [11] and opt.history.column("step").tolist() == [2, 4, 11]


def test_two_monitors_coexist_and_manual_calls_are_recorded():
    _, opt, loss_fn = _setup()
    cheap = opt.monitor(loss_fn, every=2)
    rich_one = opt.monitor(loss_fn, every=5, raw=True, k=2)
    _train(opt, loss_fn, 10)
    manual = opt.sharpness(loss_fn)
    h = opt.history
    assert h.column("step").tolist() == [2, 4, 5, 6, 8, 10, 10, 10]
    assert h.column("monitor").tolist() == [
        cheap.id,
        cheap.id,
        rich_one.id,
        cheap.id,
        cheap.id,
        cheap.id,
        rich_one.id,
        -1,
    ]
    raw = h.column("raw")
    assert [math.isfinite(r) for r in raw] == [False, False, True, False, False, False, True, False]
    eig1 = h.column("eig_1")
    assert math.isfinite(eig1[2]) and math.isnan(eig1[0])  # k=2 only for the second monitor
    assert h.column("preconditioned")[-1] == manual.preconditioned
    assert h.column("ratio")[-1] == manual.ratio and h.column("hvps")[-1] == manual.hvps


def test_monitoring_does_not_change_training():
    model_a, opt_a, loss_a = _setup()
    model_b, opt_b, loss_b = _setup()
    opt_b.monitor(loss_b, every=2, raw=True, secant=True)
    _train(opt_a, loss_a, 8)
    _train(opt_b, loss_b, 8)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_monitor_argument_errors():
    _, opt, loss_fn = _setup()
    with pytest.raises(ValueError, match="every"):
        opt.monitor(loss_fn, every=0)
    with pytest.raises(ValueError, match="k must"):
        opt.monitor(loss_fn, k=0)
    with pytest.raises(ValueError, match="tol"):
        opt.monitor(loss_fn, tol=2.0)
    with pytest.raises(TypeError, match="callable"):
        opt.monitor(42)
    assert not opt._optimizer_step_post_hooks


def test_secant_is_the_rayleigh_quotient_on_a_quadratic():
    """On ½θᵀAθ, Δθᵀ(g_t − g_{t−1}) = ΔθᵀAΔθ exactly; P = I for SGD, √v̂+ε for Adam."""
    A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    for opt_cls, lr in ((stableopt.SGD, 0.1), (stableopt.Adam, 0.05)):
        w = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        opt = opt_cls([w], lr=lr)
        loss_fn = lambda w=w: 0.5 * w @ A @ w
        opt.monitor(loss_fn, every=1000, secant=True)
        expected = []
        for _ in range(6):
            before = w.detach().clone()
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
            d = w.detach() - before
            P = opt.preconditioner()[0]
            expected.append(float(d @ A @ d) / float(d @ (P * d)))
        opt.zero_grad()
        loss_fn().backward()
        opt.step()  # the pre hook of step 7 sees g_6 and records the secant of step 6
        sec = opt.history.secant()
        assert sec["secant_step"].tolist() == [1, 2, 3, 4, 5, 6]
        assert sec["secant"].tolist() == pytest.approx(expected, rel=1e-10)
        tau = opt.stability_threshold()[0]
        assert sec["secant_ratio"].tolist() == pytest.approx([e / tau for e in expected], rel=1e-10)
        lam_max = float(torch.linalg.eigvalsh(A).max()) if opt_cls is stableopt.SGD else math.inf
        assert all(s <= lam_max + 1e-12 for s in sec["secant"])  # a lower bound


def test_secant_skips_steps_without_usable_gradients():
    w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = stableopt.SGD([w], lr=0.1)
    loss_fn = lambda: (w**2).sum()
    opt.monitor(loss_fn, every=100, secant=True)
    for _ in range(3):
        opt.step(lambda: 0.0)  # closure: gradients would come from inside step()
    assert len(opt.history.secant()["secant"]) == 0
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert opt.history.secant()["secant_step"].tolist() == [4, 5]
    assert opt.history.secant()["secant"] == pytest.approx([2.0, 2.0])


def test_live_without_a_terminal_prints_plain_lines():
    _, opt, loss_fn = _setup()
    out = io.StringIO()
    handle = opt.monitor(loss_fn, every=2, live=True, console=Console(file=out, force_terminal=False))
    _train(opt, loss_fn, 4)
    handle.remove()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1b" not in out.getvalue()
    assert lines[0].startswith("stableopt step 2: loss=") and "ratio=" in lines[0] and "the edge" in lines[0]


def test_live_on_a_terminal_shows_the_panel():
    _, opt, loss_fn = _setup()
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system="truecolor")
    handle = opt.monitor(loss_fn, every=2, live=True, console=console)
    _train(opt, loss_fn, 4)
    view = opt._stableopt_components["monitors"].view
    assert view.live is not None
    handle.remove()
    assert view.live is None  # the Live display stops with its last monitor
    text = out.getvalue()
    assert "stableopt · Adam" in text and "\x1b[" in text and "ratio history" in text


def test_state_dict_round_trip_continues_history_and_schedule():
    model, opt, loss_fn = _setup()
    opt.monitor(loss_fn, every=2, raw=True)
    _train(opt, loss_fn, 5)
    opt.history.append_event(3, 0, 1.0, 0.5, 1.3, "test")
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    model2, opt2, loss_fn2 = _setup()
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(state)
    assert opt2.history.column("step").tolist() == [2, 4]
    assert len(opt2.history.events()) == 1
    resumed = opt2.monitor(loss_fn2)  # no arguments: the checkpoint's schedule
    assert (resumed.every, resumed.raw) == (2, True)
    _train(opt2, loss_fn2, 5)
    _train(opt, loss_fn, 5)
    assert opt2.history.column("step").tolist() == [2, 4, 6, 8, 10]
    for name in ("step", "preconditioned", "raw", "ratio", "loss"):
        assert opt2.history.column(name).tolist() == pytest.approx(
            opt.history.column(name).tolist(), rel=1e-9, nan_ok=True
        )


def test_a_torch_state_dict_loads_with_an_empty_history():
    model, opt, loss_fn = _setup()
    opt.monitor(loss_fn, every=1)
    _train(opt, loss_fn, 2)
    assert len(opt.history) == 2
    reference = torch.optim.Adam(model.parameters(), lr=0.05)
    reference.load_state_dict({k: v for k, v in opt.state_dict().items() if k != "stableopt"})
    opt.load_state_dict(reference.state_dict())
    assert len(opt.history) == 0 and opt.steps_taken == 2
    torch.optim.Adam(model.parameters(), lr=0.05).load_state_dict(opt.state_dict())  # and back


def test_a_stableopt_state_dict_without_history_starts_it_empty():
    _, opt, loss_fn = _setup()
    opt.monitor(loss_fn, every=1)
    _train(opt, loss_fn, 2)
    state = opt.state_dict()
    del state["stableopt"]["components"]["history"]
    opt.load_state_dict(state)
    assert len(opt.history) == 0 and opt.steps_taken == 2


def test_two_secant_monitors_share_one_tracker():
    _, opt, loss_fn = _setup()
    a = opt.monitor(loss_fn, every=100, secant=True)
    b = opt.monitor(loss_fn, every=50, secant=True)
    assert len(opt._optimizer_step_pre_hooks) == 1
    _train(opt, loss_fn, 4)
    assert opt.history.secant()["secant_step"].tolist() == [1, 2, 3]
    a.remove()
    assert len(opt._optimizer_step_pre_hooks) == 1
    b.remove()
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
