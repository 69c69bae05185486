"""stableopt.guard: the lr guard's policy on constructed quadratics with a known Hessian, its
composition with torch lr schedulers, its state, and that guard=None/False is torch's step."""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
from torch import nn

import stableopt
from stableopt import LRGuard


class Quadratic:
    """loss ½·s·θᵀHθ with H = diag(h): λ_max(H) = s·max(h); ``s`` can be changed mid-run."""

    def __init__(self, h=(100.0, 10.0, 1.0), dtype=torch.float64):
        self.h = torch.tensor(h, dtype=dtype)
        self.theta = nn.Parameter(torch.ones(len(h), dtype=dtype))
        self.s = 1.0

    def __call__(self):
        return 0.5 * self.s * (self.h * self.theta**2).sum()

    def step(self, opt):
        opt.zero_grad(set_to_none=True)
        self().backward()
        opt.step()


def _sgd(lr=0.03, **guard_kwargs):
    """SGD on the quadratic: P = I, threshold 2/η, so ratio = η·s·max(h)/2 exactly."""
    q = Quadratic()
    opt = stableopt.SGD([q.theta], lr=lr, guard=LRGuard(**guard_kwargs) if guard_kwargs else True)
    q.step(opt)
    return q, opt


# -- the policy on a known Hessian -------------------------------------------------------------
def test_guard_cuts_when_ratio_crosses_the_trigger_so_the_ratio_returns_to_target():
    q, opt = _sgd(lr=0.03)  # ratio = 0.03·100/2 = 1.5 > 1.2
    report = opt.sharpness(q)
    assert report.ratio == pytest.approx(1.5, rel=1e-3)
    assert opt.guard.factors == pytest.approx([0.9 / 1.5], rel=1e-3)
    assert opt.param_groups[0]["lr"] == 0.03  # never written
    assert opt.effective_lr() == pytest.approx([0.03 * 0.6], rel=1e-3)
    (event,) = opt.guard.events
    assert (event.step, event.group, event.old_factor, event.reason) == (1, 0, 1.0, "cut")
    assert event.new_factor == pytest.approx(0.6, rel=1e-3) and event.ratio == pytest.approx(1.5, rel=1e-3)
    # measured again at the same point: exactly on target, inside the band → no second action
    assert opt.sharpness(q).ratio == pytest.approx(0.9, rel=1e-3)
    assert len(opt.guard.events) == 1
    # and the step really uses the scaled lr
    before = q.theta.detach().clone()
    q.step(opt)
    torch.testing.assert_close(q.theta.detach(), before - 0.03 * opt.guard.factors[0] * q.h * before)


def test_guard_does_not_act_on_the_normal_hovering_at_the_edge():
    q, opt = _sgd(lr=0.0216)  # ratio 1.08: above the edge but inside the tolerance band
    assert opt.sharpness(q).ratio == pytest.approx(1.08, rel=1e-3)
    assert opt.guard.factors == [1.0] and opt.guard.events == []
    assert opt._stableopt_lr_scale is None  # untouched: the step is still torch's


def test_guard_cuts_adam_to_target_with_the_real_preconditioner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)
    loss_fn = lambda: 0.5 * ((model(x) - y) ** 2).sum(1).mean()  # noqa: E731
    opt = stableopt.Adam(model.parameters(), lr=0.05, guard=LRGuard(warmup=0))
    for _ in range(40):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    below = opt.sharpness(loss_fn, tol=1e-6).ratio
    assert below < opt.guard.recovery and opt.guard.events == []
    opt.param_groups[0]["lr"] *= 2.0 / below  # a scheduler (or the user) puts the run at ratio 2
    first = opt.sharpness(loss_fn, tol=1e-6).ratio
    assert first == pytest.approx(2.0, rel=1e-5)
    assert opt.guard.factors[0] == pytest.approx(0.45, rel=1e-5)
    # same parameters and P, lr × 0.9/ratio: the ratio is on target (Adam's threshold ∝ 1/η)
    assert opt.sharpness(loss_fn, tol=1e-6).ratio == pytest.approx(0.9, rel=1e-4)


def test_guard_relaxes_gradually_as_measurements_fall_and_never_exceeds_one():
    q, opt = _sgd(lr=0.06)  # ratio 3 → factor 0.3
    opt.sharpness(q)
    assert opt.guard.factors[0] == pytest.approx(0.3, rel=1e-3)
    q.s = 0.1  # the landscape flattens: ratio 0.09 at factor 0.3
    factors = []
    for _ in range(20):
        opt.sharpness(q)
        factors.append(opt.guard.factors[0])
    # patience 3: one relax every third measurement, by at most ×1.25, capped at 1
    assert factors[:3] == pytest.approx([0.3, 0.3, 0.375], rel=1e-3)
    assert factors[5] == pytest.approx(0.375 * 1.25, rel=1e-3)
    assert factors[-1] == 1.0 and max(factors) == 1.0
    assert [e.reason for e in opt.guard.events] == ["cut"] + ["relax"] * (len(opt.guard.events) - 1)
    assert all(e.new_factor > e.old_factor for e in opt.guard.events[1:])


def test_relax_never_overshoots_the_target():
    q, opt = _sgd(lr=0.06, patience=1, relax_rate=100.0)
    opt.sharpness(q)  # factor 0.3, ratio at target 0.9
    q.s = 0.7  # ratio 0.63 < recovery
    opt.sharpness(q)
    # one relax of at most target/ratio: the ratio lands on 0.9, not above
    assert opt.sharpness(q).ratio == pytest.approx(0.9, rel=1e-3)


@pytest.mark.parametrize("bad", [math.nan, -math.inf])  # +inf (a threshold <= 0) cuts: test_degenerate.py
def test_guard_never_acts_on_non_finite_ratios(bad):
    q, opt = _sgd(lr=0.01)
    events = opt.guard.observe(bad, step=5)
    assert events == [] and opt.guard.factors == [1.0] and opt.guard.skipped == 1


def test_guard_never_acts_on_a_nan_measurement_or_an_unconverged_one():
    q, opt = _sgd(lr=0.06)
    nan_loss = lambda: q() * math.nan  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        report = opt.sharpness(nan_loss)
    assert math.isnan(report.ratio)
    assert opt.guard.factors == [1.0] and opt._stableopt_lr_scale is None
    assert opt.guard.observe(5.0, step=2, converged=False) == []
    assert opt.guard.factors == [1.0]


def test_a_failed_measurement_restarts_the_recovery_count():
    q, opt = _sgd(lr=0.06)
    opt.sharpness(q)  # cut to 0.3
    guard = opt.guard
    guard.observe(0.1, step=2)
    guard.observe(0.1, step=3)
    guard.observe(math.nan, step=4)
    guard.observe(0.1, step=5)
    assert guard.factors[0] == pytest.approx(0.3, rel=1e-3)  # no relax across the NaN
    guard.observe(0.1, step=6)
    guard.observe(0.1, step=7)
    assert guard.factors[0] == pytest.approx(0.375, rel=1e-3)


def test_floor_is_respected_and_warns_once():
    q, opt = _sgd(lr=0.01, floor=0.05)
    with pytest.warns(RuntimeWarning, match="floor"):
        opt.guard.observe(1e6, step=3)
    assert opt.guard.factors == [0.05]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opt.guard.observe(1e6, step=4) == []  # already at the floor: no event, no warning
    assert opt.guard.factors == [0.05]


def test_edge_mode_raises_toward_target_up_to_the_cap():
    q, opt = _sgd(lr=0.001, mode="edge", cap=4.0)  # ratio 0.05: far below the edge
    for _ in range(20):
        opt.sharpness(q)
    factors = [e.new_factor for e in opt.guard.events]
    assert factors[:3] == pytest.approx([1.25, 1.25**2, 1.25**3])
    assert opt.guard.factors == [4.0] and {e.reason for e in opt.guard.events} == {"raise"}
    # from above: the same cut, toward target 1.0
    q.s = 10.0  # ratio 0.05·4·10 = 2
    opt.sharpness(q)
    assert opt.sharpness(q).ratio == pytest.approx(1.0, rel=1e-3)


def test_protect_mode_steers_from_above_only_and_edge_mode_from_both_sides():
    _, protect = _sgd(lr=0.001)
    _, edge = _sgd(lr=0.001, mode="edge")
    for t in range(10):
        protect.guard.observe(0.05, step=t + 1)
        edge.guard.observe(0.05, step=t + 1)
    assert protect.guard.factors == [1.0] and edge.guard.factors[0] > 1.0


def test_several_groups_are_all_scaled_with_one_event_each():
    a, b = nn.Parameter(torch.ones(2, dtype=torch.float64)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    loss_fn = lambda: 0.5 * (100 * a[0] ** 2 + a[1] ** 2 + 50 * b[0] ** 2 + b[1] ** 2)  # noqa: E731
    opt = stableopt.SGD([{"params": [a]}, {"params": [b], "lr": 0.1}], lr=0.01, guard=True)
    loss_fn().backward()
    opt.step()
    report = opt.sharpness(loss_fn)  # ratio = max(0.01·100, 0.1·50)/2 = 2.5
    assert report.ratio == pytest.approx(2.5, rel=1e-3)
    assert opt.guard.factors == pytest.approx([0.36, 0.36], rel=1e-3)
    assert [e.group for e in opt.guard.events] == [0, 1]
    assert opt.sharpness(loss_fn).ratio == pytest.approx(0.9, rel=1e-3)
    c = nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt.add_param_group({"params": [c], "lr": 0.5})
    # a group added after the cut gets the cut too: it behaves as if it had been there from the start
    assert opt.guard.factors == pytest.approx([0.36, 0.36, 0.36], rel=1e-3)
    assert opt.effective_lr()[2] == pytest.approx(0.5 * 0.36, rel=1e-3)  # before its first step too
    opt.zero_grad()
    (3.0 * c).sum().backward()  # grad 3: SGD moves c by lr · factor · 3
    opt.step()
    assert c.item() == pytest.approx(1.0 - 0.5 * 0.36 * 3.0, rel=1e-3)
    assert opt.effective_lr()[2] == pytest.approx(0.5 * 0.36, rel=1e-3)


# -- Adam's bias-correction transient --------------------------------------------------------------
@pytest.mark.parametrize("beta1,expected", [(0.9, 30), (0.5, 6), (0.0, 3)])
def test_adam_transient_measurements_are_ignored(beta1, expected):
    q = Quadratic()
    opt = stableopt.Adam([q.theta], lr=1.0, betas=(beta1, 0.999), guard=True)
    assert opt.guard.warmup_steps() == expected
    assert opt.guard.observe(50.0, step=expected - 1) == []
    assert opt.guard.skipped == 1 and opt.guard.factors == [1.0]
    assert opt.guard.observe(50.0, step=expected) != []


def test_no_transient_for_sgd_and_rmsprop_and_an_explicit_warmup_wins():
    q = Quadratic()
    assert stableopt.SGD([q.theta], lr=0.1, guard=True).guard.warmup_steps() == 0
    assert stableopt.RMSprop([q.theta], lr=0.1, guard=True).guard.warmup_steps() == 0
    assert stableopt.Adam([q.theta], lr=0.1, guard=LRGuard(warmup=5)).guard.warmup_steps() == 5


# -- own measurements (every=) ---------------------------------------------------------------------
def test_every_measures_on_its_own_and_acts():
    q = Quadratic()
    guard = LRGuard(every=3).attach(q)
    opt = stableopt.SGD([q.theta], lr=0.03, guard=guard)
    for _ in range(7):
        q.step(opt)
    assert guard.measurements == 2  # after steps 3 and 6
    assert [e.step for e in guard.events] == [3]
    assert guard.factors[0] == pytest.approx(0.6, rel=1e-3)


def test_every_without_a_loss_raises_at_the_first_scheduled_measurement():
    q = Quadratic()
    opt = stableopt.SGD([q.theta], lr=0.03, guard=LRGuard(every=2))
    q.step(opt)
    with pytest.raises(RuntimeError, match=r"attach\(loss_fn\)"):
        q.step(opt)


def test_events_are_recorded_in_the_history():
    q, opt = _sgd(lr=0.06)
    opt.sharpness(q)
    history = getattr(opt, "history", None)
    if history is None or not hasattr(history, "events"):
        pytest.skip("no history in this build")
    (event,) = history.events()
    assert event == opt.guard.events[0]


# -- schedulers ------------------------------------------------------------------------------------
SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=25),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_owns_group_lr_and_the_step_uses_scheduler_lr_times_factor(name):
    qa, qb = Quadratic(), Quadratic()
    guarded = stableopt.SGD([qa.theta], lr=0.03, momentum=0.5, guard=True)
    plain = stableopt.SGD([qb.theta], lr=0.03, momentum=0.5)
    sched_a, sched_b = SCHEDULERS[name](guarded), SCHEDULERS[name](plain)
    for t in range(20):
        if t == 4:
            guarded.guard.observe(2.0, step=t)  # factor 0.45
        lr_before = guarded.param_groups[0]["lr"]
        qa.step(guarded)
        qb.step(plain)
        assert guarded.param_groups[0]["lr"] == lr_before  # restored after the step
        sched_a.step()
        sched_b.step()
        assert guarded.param_groups[0]["lr"] == plain.param_groups[0]["lr"]  # bitwise the scheduler's
        factor = guarded.guard.factors[0]
        assert guarded.effective_lr() == [guarded.param_groups[0]["lr"] * factor]
        if t < 4:  # factor 1: the guarded run is the plain run, bit for bit
            assert torch.equal(qa.theta, qb.theta)
        else:
            assert factor == pytest.approx(0.45)
    assert sched_a.get_last_lr() == sched_b.get_last_lr()


def test_the_step_uses_exactly_scheduler_lr_times_factor():
    q = Quadratic()
    opt = stableopt.SGD([q.theta], lr=0.02, guard=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.guard.observe(3.0, step=1)  # factor 0.3
    for _ in range(3):
        before = q.theta.detach().clone()
        lr = opt.param_groups[0]["lr"]
        q.step(opt)
        torch.testing.assert_close(q.theta.detach(), before - (lr * 0.3) * q.h * before, rtol=1e-14, atol=0)
        sched.step()


# -- state -----------------------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_factor_counters_and_events():
    q, opt = _sgd(lr=0.06)
    opt.sharpness(q)
    opt.guard.observe(0.1, step=2)  # one toward recovery
    state = copy.deepcopy(opt.state_dict())
    q2 = Quadratic()
    opt2 = stableopt.SGD([q2.theta], lr=0.06, guard=True)
    opt2.load_state_dict(state)
    assert opt2.guard.factors == opt.guard.factors
    assert opt2.effective_lr() == opt.effective_lr()
    assert opt2.guard.events == opt.guard.events
    assert opt2.guard.state_dict() == opt.guard.state_dict()
    # the pending recovery count survived: two more low measurements relax
    opt2.guard.observe(0.1, step=3)
    opt2.guard.observe(0.1, step=4)
    assert opt2.guard.factors[0] == pytest.approx(opt.guard.factors[0] * 1.25)


def test_loading_a_plain_torch_state_dict_resets_the_guard():
    q, opt = _sgd(lr=0.06)
    opt.sharpness(q)
    reference = torch.optim.SGD([nn.Parameter(q.theta.detach().clone())], lr=0.06)
    opt.load_state_dict(reference.state_dict())
    assert opt.guard.factors == [1.0] and opt.effective_lr() == [0.06]
    assert opt.guard.events == [] and opt.guard.measurements == 0


def test_guard_state_dict_is_plain_python():
    q, opt = _sgd(lr=0.06)
    opt.sharpness(q)
    sd = opt.state_dict()["stableopt"]["components"]["guard"]
    assert isinstance(sd["factors"][0], float) and isinstance(sd["events"][0], tuple)


def test_remove_detaches_and_restores_the_scheduler_lr():
    q, opt = _sgd(lr=0.06)
    guard = opt.guard
    opt.sharpness(q)
    guard.remove()
    assert opt.guard is None and opt._stableopt_lr_scale is None and opt.effective_lr() == [0.06]
    opt.sharpness(q)  # no hook left
    assert len(guard.events) == 1


# -- off by default: torch's steps -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("Adam", {}),
        ("AdamW", {"weight_decay": 0.1}),
        ("RMSprop", {"momentum": 0.9}),
        ("SGD", {"momentum": 0.9, "nesterov": True}),
    ],
)
@pytest.mark.parametrize("guard", [None, False, True])
def test_without_guard_actions_the_steps_are_torchs(name, kwargs, guard):
    def run(cls, **extra):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
        opt = cls(model.parameters(), lr=0.01, **kwargs, **extra)
        x, y = torch.randn(16, 5), torch.randn(16, 3)
        for _ in range(15):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
        return model

    ours, theirs = run(getattr(stableopt, name), guard=guard), run(getattr(torch.optim, name))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)


def test_signature_is_torchs_plus_keyword_only_guard():
    for name in ("Adam", "AdamW", "RMSprop", "SGD"):
        ours = inspect.signature(getattr(stableopt, name)).parameters
        theirs = inspect.signature(getattr(torch.optim, name)).parameters
        assert list(ours)[:-1] == list(theirs) and list(ours)[-1] == "guard"
        assert ours["guard"].kind is inspect.Parameter.KEYWORD_ONLY and ours["guard"].default is None
    assert stableopt.Adam([nn.Parameter(torch.ones(1))]).guard is None


# -- bad input -------------------------------------------------------------------------------------
BAD = [
    (dict(mode="calm"), ValueError, "mode must be one of"),
    (dict(trigger=0.8), ValueError, r"target \(0.9\) must be below trigger"),
    (dict(recovery=0.95), ValueError, r"recovery \(0.95\) must be below target"),
    (dict(relax_rate=1.0), ValueError, "relax_rate must be > 1"),
    (dict(floor=2.0), ValueError, "need floor <= 1 <= cap"),
    (dict(cap=2.0), ValueError, "only used with mode='edge'"),
    (dict(mode="edge", cap=0.5), ValueError, "need floor <= 1 <= cap"),
    (dict(trigger=-1.0), ValueError, "trigger must be a positive finite number"),
    (dict(trigger="1.2"), TypeError, "trigger must be a number"),
    (dict(patience=0), ValueError, "patience must be >= 1"),
    (dict(every=0), ValueError, "every must be >= 1"),
    (dict(every=2.5), TypeError, "every must be an int or None"),
    (dict(warmup=-1), ValueError, "warmup must be >= 0"),
    (dict(loss_fn=3), TypeError, "loss_fn must be callable"),
    (dict(tol=0.0), ValueError, r"tol must be a number in \(0, 1\)"),
]


@pytest.mark.parametrize("kwargs,exc,pattern", BAD, ids=[repr(b[0]) for b in BAD])
def test_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        LRGuard(**kwargs)


def test_bad_guard_argument_and_double_binding():
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(TypeError, match="guard must be None, a bool or a stableopt.LRGuard"):
        stableopt.Adam([p], guard="yes")
    guard = LRGuard()
    stableopt.Adam([p], guard=guard)
    with pytest.raises(RuntimeError, match="already attached"):
        stableopt.Adam([p], guard=guard)
    with pytest.raises(RuntimeError, match="not attached"):
        LRGuard().observe(2.0, step=1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        LRGuard().attach(None)


def test_guard_scale_is_not_inherited_by_an_optimizer_without_a_guard():
    p = nn.Parameter(torch.ones(2))
    guarded = stableopt.Adam([p], lr=0.1, guard=True)
    guarded._stableopt_lr_scale = [0.5]  # as after a cut
    sd = guarded.state_dict()
    plain = stableopt.Adam([p], lr=0.1)
    plain.load_state_dict(sd)
    assert plain.effective_lr() == [0.1]
    again = stableopt.Adam([p], lr=0.1, guard=True)
    again.load_state_dict(sd)
    assert again.effective_lr() == [0.05]
