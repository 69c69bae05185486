"""Stability rules: one object per optimizer class, named explicitly, used by every consumer; a
user's own optimizer gets a measurement by declaring its rule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from conftest import dense_hessian, make_data, make_model
from test_sharpness import Bound
from torch import nn

import stableopt
from stableopt import rules, thresholds


def test_each_optimizer_names_its_torch_class_and_rule():
    expected = {
        stableopt.Adam: (torch.optim.Adam, rules.AdamRule(decoupled=False)),
        stableopt.AdamW: (torch.optim.AdamW, rules.AdamRule(decoupled=True)),
        stableopt.RMSprop: (torch.optim.RMSprop, rules.RMSpropRule()),
        stableopt.SGD: (torch.optim.SGD, rules.SGDRule()),
    }
    for cls, (torch_cls, rule) in expected.items():
        assert cls.torch_class is torch_cls and cls.stability_rule == rule


@pytest.mark.parametrize(
    "group,lr,expected",
    [
        ({"betas": (0.9, 0.999), "weight_decay": 0.0}, 1e-3, thresholds.adam_threshold(1e-3, 0.9)),
        (
            {"betas": (0.8, 0.999), "weight_decay": 0.1, "decoupled_weight_decay": True},
            1e-2,
            thresholds.adam_threshold(1e-2, 0.8, weight_decay=0.1, decoupled=True),
        ),
    ],
)
def test_adam_rule_threshold_decay_and_transient(group, lr, expected):
    rule = rules.AdamRule()
    assert rule.threshold(group, lr) == expected
    decoupled = group.get("decoupled_weight_decay", False)
    assert rule.coupled_weight_decay(group) == (0.0 if decoupled else group["weight_decay"])
    assert rule.transient_steps(group) == math.ceil(3 / (1 - group["betas"][0]) - 1e-9)
    assert rules.SGDRule().transient_steps({"momentum": 0.9}) == 0


def test_the_guard_and_the_secant_tracker_ask_the_rule():
    @dataclass(frozen=True)
    class LongTransient(rules.SGDRule):
        def transient_steps(self, group):
            return 17

        def coupled_weight_decay(self, group):
            return 0.5

    class Patient(stableopt.SGD, rule=LongTransient()):
        pass

    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Patient([w], lr=0.1, guard=True)
    assert opt.guard.warmup_steps() == 17
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    rep = opt.sharpness(loss_fn, raw=True, tol=1e-9)
    assert rep.raw == pytest.approx(2.0 + 0.5, rel=1e-7)  # H + λI with the rule's λ


def _adagrad_preconditioner(param, state, group):
    """Adagrad divides by √(Σ g²) + ε."""
    if "sum" not in state:
        return torch.full_like(param, math.inf)
    return state["sum"].sqrt().add_(group["eps"])


@dataclass(frozen=True)
class AdagradRule(rules.StabilityRule):
    """Preconditioned GD: θ ← θ − η·g/P, so the threshold on P⁻¹H is 2/η (ignoring lr decay)."""

    needs_state: bool = True

    def preconditioner(self, param, state, group):
        return _adagrad_preconditioner(param, state, group)


class Adagrad(stableopt.StabilityMixin, torch.optim.Adagrad, torch_class=torch.optim.Adagrad, rule=AdagradRule()):
    """A user's own stableopt optimizer: torch's Adagrad plus a rule."""


def test_a_users_optimizer_steps_like_torch_and_measures_with_its_rule():
    model = make_model(nn.Tanh)
    twin = make_model(nn.Tanh)
    x, y, _ = make_data()
    opt, ref = Adagrad(model.parameters(), lr=0.05), torch.optim.Adagrad(twin.parameters(), lr=0.05)
    for m, o in ((model, opt), (twin, ref)):
        for _ in range(4):
            o.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    rep = opt.sharpness(lambda: ((model(x) - y) ** 2).mean(), tol=1e-10)
    H = dense_hessian(Bound(model, x), lambda out: ((out - y) ** 2).mean())
    P = torch.cat(
        [_adagrad_preconditioner(p, opt.state[p], opt.param_groups[0]).reshape(-1) for p in model.parameters()]
    )
    expected = torch.linalg.eigvalsh(P.rsqrt()[:, None] * H * P.rsqrt()[None, :])[-1]
    assert rep.preconditioned == pytest.approx(float(expected), rel=1e-8)
    assert rep.threshold == pytest.approx(2 / 0.05) and opt.stability_threshold() == [pytest.approx(40.0)]


def test_a_users_subclass_keeps_its_own_init_and_inherits_the_rule():
    class ScaledAdam(stableopt.Adam):
        def __init__(self, params, scale=2.0):
            super().__init__(params, lr=1e-3 * scale)

    opt = ScaledAdam([nn.Parameter(torch.ones(1))])
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)
    assert ScaledAdam.torch_class is torch.optim.Adam and ScaledAdam.stability_rule == stableopt.Adam.stability_rule


def test_the_deprecated_subclass_hooks_still_work_and_warn():
    with pytest.warns(DeprecationWarning, match="_preconditioner_fn/_needs_state is deprecated"):

        class Halved(stableopt.SGD):
            _needs_state = True

            @staticmethod
            def _preconditioner_fn(p, state, group):
                return torch.full_like(p, 2.0)

    w = nn.Parameter(torch.tensor([1.0, 1.0]))
    opt = Halved([w], lr=0.1)
    with pytest.raises(RuntimeError, match=r"call step\(\) first"):  # _needs_state honoured
        opt.sharpness(lambda: (w**2).sum())
    w.grad = torch.zeros(2)
    opt.step()
    assert opt.sharpness(lambda: (w**2).sum(), tol=1e-9).preconditioned == pytest.approx(1.0)  # 2/2


@pytest.mark.parametrize(
    "make,pattern",
    [
        (
            lambda: type("NoTorch", (stableopt.StabilityMixin, torch.optim.SGD), {}),
            "without naming its torch optimizer",
        ),
        (
            lambda: type(
                "Wrong",
                (stableopt.StabilityMixin, torch.optim.SGD),
                {},
                torch_class=torch.optim.Adam,
                rule=rules.SGDRule(),
            ),
            "torch_class must be a torch.optim.Optimizer base class of Wrong",
        ),
        (
            lambda: type(
                "BadRule", (stableopt.StabilityMixin, torch.optim.SGD), {}, torch_class=torch.optim.SGD, rule="sgd"
            ),
            "rule must be a stableopt.rules.StabilityRule, got str",
        ),
    ],
)
def test_declaring_an_optimizer_wrongly_is_a_clear_type_error(make, pattern):
    with pytest.raises(TypeError, match=pattern):
        make()
