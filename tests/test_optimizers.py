"""stableopt optimizers are torch.optim's: bitwise steps, interchangeable state, same signature."""

from __future__ import annotations

import copy
import inspect
import math

import pytest
import torch
from torch import nn

import stableopt

# One table of optimizers and option sets, torch's common_optimizers style.
OPTION_MATRIX: list[tuple[str, dict]] = []
for foreach in (False, True):
    OPTION_MATRIX += [
        ("Adam", dict(foreach=foreach)),
        ("Adam", dict(foreach=foreach, amsgrad=True)),
        ("Adam", dict(foreach=foreach, maximize=True, weight_decay=0.1)),
        ("Adam", dict(foreach=foreach, betas=(0.8, 0.95), eps=1e-6)),
        ("AdamW", dict(foreach=foreach)),
        ("AdamW", dict(foreach=foreach, amsgrad=True, weight_decay=0.3)),
        ("RMSprop", dict(foreach=foreach)),
        ("RMSprop", dict(foreach=foreach, centered=True, momentum=0.5, weight_decay=0.01)),
        ("RMSprop", dict(foreach=foreach, maximize=True, alpha=0.9)),
        ("SGD", dict(foreach=foreach)),
        ("SGD", dict(foreach=foreach, momentum=0.9, nesterov=True, weight_decay=0.01)),
        ("SGD", dict(foreach=foreach, momentum=0.5, dampening=0.3, maximize=True)),
    ]
OPTION_MATRIX += [
    ("Adam", dict(fused=True)),
    ("Adam", dict(fused=True, amsgrad=True, weight_decay=0.1)),
    ("AdamW", dict(fused=True)),
    ("SGD", dict(fused=True, momentum=0.9)),
    ("Adam", dict(lr=torch.tensor(0.01), foreach=False)),
    ("AdamW", dict(lr=torch.tensor(0.01), fused=True)),
    ("SGD", dict(lr=torch.tensor(0.01), momentum=0.9, foreach=False)),
    ("RMSprop", dict(lr=torch.tensor(0.01), foreach=False)),
    ("Adam", dict(differentiable=False, capturable=False, foreach=False)),
]


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _param_groups(model, kwargs):
    lr = kwargs.pop("lr", 0.01)
    layers = [m for m in model if isinstance(m, nn.Linear)]
    # two groups with different learning rates
    second_lr = lr * 2 if isinstance(lr, torch.Tensor) else 0.02
    return [{"params": layers[0].parameters()}, {"params": layers[1].parameters(), "lr": second_lr}], lr


def _train(opt_cls, kwargs, steps=100, measure=None):
    model = _model()
    kwargs = dict(kwargs)
    groups, lr = _param_groups(model, kwargs)
    opt = opt_cls(groups, lr=lr, **kwargs)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    frozen_bias = model[2].bias
    # torch's own fused SGD with momentum crashes on a grad that disappears after step 1
    drop = not (kwargs.get("fused") and kwargs.get("momentum"))
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        if drop and t % 3 == 0:  # a parameter without grad in some steps
            frozen_bias.grad = None
        opt.step()
        if measure is not None:
            measure(opt, model, x, y)
    return model, opt


@pytest.mark.parametrize("name,kwargs", OPTION_MATRIX, ids=lambda v: v if isinstance(v, str) else repr(v))
def test_step_is_bitwise_torch(name, kwargs):
    ours, _ = _train(getattr(stableopt, name), kwargs)
    ref, _ = _train(getattr(torch.optim, name), kwargs)
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_subclass_and_signature(name):
    ours, theirs = getattr(stableopt, name), getattr(torch.optim, name)
    assert issubclass(ours, theirs)
    # torch's signature, plus stableopt's keyword-only ``guard`` (tests/test_guard.py) at the end
    params = list(inspect.signature(ours).parameters.values())
    assert params[-1].name == "guard" and params[-1].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(ours).replace(parameters=params[:-1]) == inspect.signature(theirs)


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("Adam", {"amsgrad": True}),
        ("AdamW", {}),
        ("RMSprop", {"momentum": 0.9, "centered": True}),
        ("SGD", {"momentum": 0.9}),
    ],
)
def test_state_dict_interchangeable(name, kwargs):
    ours_cls, torch_cls = getattr(stableopt, name), getattr(torch.optim, name)
    m1, o1 = _train(ours_cls, kwargs, steps=7)
    m2, o2 = _train(torch_cls, kwargs, steps=7)
    # ours -> torch and torch -> ours, then both continue identically
    a = torch_cls(_param_groups(m1, dict(kwargs))[0], lr=0.01, **kwargs)
    a.load_state_dict(o1.state_dict())
    b = ours_cls(_param_groups(m2, dict(kwargs))[0], lr=0.01, **kwargs)
    b.load_state_dict(o2.state_dict())
    assert b.steps_taken == (7 if name != "SGD" else 0)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    for model, opt in ((m1, a), (m2, b)):
        for _ in range(5):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_deepcopy_and_pickle_keep_working():
    import pickle

    model, opt = _train(stableopt.Adam, {}, steps=3)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.steps_taken == 3
        assert len(clone.preconditioner()) == len(opt.preconditioner())


def _adam_denominator(p, state, group):
    bc2 = 1 - group["betas"][1] ** state["step"].item()
    v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
    return v.sqrt() / math.sqrt(bc2) + group["eps"]


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_is_the_denominator_the_step_used(amsgrad):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(50, dtype=torch.float64))
    opt = stableopt.Adam([p], lr=0.1, amsgrad=amsgrad, foreach=False)
    ref = torch.optim.Adam([nn.Parameter(p.detach().clone())], lr=0.1, amsgrad=amsgrad, foreach=False)
    for t in range(20):
        grad = torch.randn(50, dtype=torch.float64) * (1 + t % 4)
        before = p.detach().clone()
        p.grad = grad
        opt.step()
        ref.param_groups[0]["params"][0].grad = grad.clone()
        ref.step()
        P = opt.preconditioner()[0]
        # hand-computed from torch's own optimizer state
        q = ref.param_groups[0]["params"][0]
        torch.testing.assert_close(P, _adam_denominator(q, ref.state[q], ref.param_groups[0]), rtol=0, atol=0)
        # and it is the denominator of the update that just happened
        state = opt.state[p]
        m_hat = state["exp_avg"] / (1 - 0.9 ** state["step"].item())
        torch.testing.assert_close(p.detach() - before, -0.1 * m_hat / P, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("centered", [False, True])
def test_rmsprop_preconditioner_from_torch_state(centered):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(30, dtype=torch.float64))
    opt = stableopt.RMSprop([p], lr=0.01, centered=centered, alpha=0.9)
    for _ in range(10):
        p.grad = torch.randn(30, dtype=torch.float64)
        before = p.detach().clone()
        opt.step()
        st = opt.state[p]
        v = st["square_avg"] - (st["grad_avg"] ** 2 if centered else 0)
        P = opt.preconditioner()[0]
        torch.testing.assert_close(P, v.sqrt() + 1e-8, rtol=1e-15, atol=0)
        torch.testing.assert_close(p.detach() - before, -0.01 * p.grad / P, rtol=1e-10, atol=1e-14)


def test_sgd_preconditioner_is_identity_and_frozen_params_are_inf():
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    opt = stableopt.SGD([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    P = opt.preconditioner()
    assert torch.equal(P[0], torch.ones(3)) and torch.equal(P[1], torch.ones(2))
    adam = stableopt.Adam([a, b], lr=0.1)
    adam.step()  # b has no grad: never moved, no state
    assert torch.isinf(adam.preconditioner()[1]).all() and torch.isfinite(adam.preconditioner()[0]).all()


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "SGD"])
def test_preconditioner_before_first_step_raises(name):
    opt = getattr(stableopt, name)([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(RuntimeError, match=r"call step\(\) first"):
        opt.preconditioner()


def test_stability_threshold_per_group_matches_table():
    p, q = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
    groups = lambda: [{"params": [p]}, {"params": [q], "lr": 0.1}]
    assert stableopt.Adam(groups(), lr=1e-3).stability_threshold() == pytest.approx([38 / 1e-3, 38 / 0.1])
    assert stableopt.Adam(groups(), lr=1e-3, betas=(0.99, 0.999)).stability_threshold() == pytest.approx(
        [398 / 1e-3, 398 / 0.1]
    )
    assert stableopt.AdamW(groups(), lr=1e-3, weight_decay=0.5).stability_threshold() == pytest.approx(
        [1.9 * (2 - 5e-4) / (0.1 * 1e-3), 1.9 * (2 - 0.05) / (0.1 * 0.1)]
    )
    # coupled decay does not move Adam's threshold
    assert stableopt.Adam(groups(), lr=1e-3, weight_decay=0.5).stability_threshold() == pytest.approx([38e3, 380])
    assert stableopt.RMSprop(groups(), lr=1e-2).stability_threshold() == pytest.approx([200, 20])
    assert stableopt.RMSprop(groups(), lr=1e-2, momentum=0.9).stability_threshold() == pytest.approx([380, 38])
    assert stableopt.SGD(groups(), lr=0.5).stability_threshold() == pytest.approx([4, 20])
    assert stableopt.SGD(groups(), lr=0.5, momentum=0.9, nesterov=True).stability_threshold() == pytest.approx(
        [3.8 / 2.8 / 0.5, 3.8 / 2.8 / 0.1]
    )
    assert stableopt.SGD(groups(), lr=0.5, momentum=0.9, dampening=0.5).stability_threshold() == pytest.approx(
        [3.8 / 0.25, 3.8 / 0.05]
    )
