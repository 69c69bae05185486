"""Each threshold is the edge of the real torch update rule on f = ½·h·x² with P held fixed.

The optimizers run unmodified; P is frozen by making ε dominate √v̂ (x starts at 1e-30, so
√v̂ ≪ ε = 1 until a diverging run has grown by ~25 orders of magnitude). Adam's bias correction is switched off by starting from step 10⁶, so the
long-run rule is what is tested. The edge curvature h* comes from stableopt itself
(``opt.sharpness().ratio`` is linear in h), so the test checks threshold, preconditioner, weight
decay and maximize handling together: 0.98·h* must converge and 1.02·h* must diverge.
"""

from __future__ import annotations

import math

import pytest
import torch

import stableopt
from stableopt import thresholds as thr

CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.5, nesterov=True)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("SGD", dict(lr=0.1, momentum=0.9, weight_decay=2.0)),
    ("SGD", dict(lr=0.1, momentum=0.9, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.6)),
    ("RMSprop", dict(lr=0.01, centered=True, weight_decay=3.0)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.99, 0.999))),
    ("Adam", dict(lr=0.01, weight_decay=5.0, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("AdamW", dict(lr=0.01, weight_decay=10.0)),
    ("AdamW", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=30.0)),
]


def _optimizer(name, kwargs, x):
    if name == "SGD":
        return stableopt.SGD([x], **kwargs)
    return getattr(stableopt, name)([x], eps=1.0, **kwargs)


def _prepare(name, kwargs, h, x0):
    """x = x0 per coordinate, loss ½·Σ h_i·x_i² (sign flipped under maximize), state at 10⁶ steps."""
    x = torch.nn.Parameter(torch.full((len(h),), x0, dtype=torch.float64))
    h = torch.tensor(h, dtype=torch.float64)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    opt = _optimizer(name, kwargs, x)
    x.grad = torch.zeros_like(x)  # creates the state without moving x (no decay at x = 0)
    with torch.no_grad():
        x.zero_()
    opt.step()
    if "step" in opt.state[x]:
        opt.state[x]["step"].fill_(1e6)  # bias corrections = 1: the long-run rule
    with torch.no_grad():
        x.fill_(x0)
    return x, h, sign, opt


def _ratio(name, kwargs, h):
    x, hh, sign, opt = _prepare(name, kwargs, [h], 1e-30)
    return opt.sharpness(lambda: sign * 0.5 * (hh * x**2).sum(), tol=1e-10).ratio


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_ratio_one_is_the_edge_of_the_torch_rule(name, kwargs):
    # the ratio is affine in h (coupled weight decay adds λ): find h with ratio = 0.98 and 1.02
    r1, r2 = _ratio(name, kwargs, 1.0), _ratio(name, kwargs, 2.0)
    slope, offset = r2 - r1, 2 * r1 - r2
    assert slope > 0
    h_of = lambda rho: (rho - offset) / slope
    x0 = 1e-30 if name != "SGD" else 1.0
    x, h, sign, opt = _prepare(name, kwargs, [h_of(0.98), h_of(1.02)], x0)
    rep = opt.sharpness(lambda: sign * 0.5 * (h * x**2).sum(), tol=1e-10)
    assert rep.ratio == pytest.approx(1.02, rel=1e-6)
    peak = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(3000):
            x.grad = sign * h * x  # the exact gradient; the optimizers run unmodified
            opt.step()
            peak = torch.maximum(peak, x.abs().nan_to_num(math.inf))
    below, above = abs(x[0].item()), peak[1].item()
    assert below < 1e-3 * x0, f"0.98× threshold did not converge: |x| = {below}"
    # diverging means growing by orders of magnitude; AMSGrad later re-stabilises as max v̂ grows
    assert above > 1e3 * x0, f"1.02× threshold did not diverge: peak |x| = {above}"


def test_threshold_functions_match_closed_forms():
    assert thr.gd_threshold(0.5) == 4.0
    assert thr.adam_threshold(1e-3) == pytest.approx(38 / 1e-3)
    assert thr.adam_threshold(1e-3, 0.99) == pytest.approx(398 / 1e-3)
    assert thr.adam_threshold(0.1, 0.9, weight_decay=1.0, decoupled=True) == pytest.approx(1.9 * 1.9 / 0.01)
    assert thr.adam_threshold(0.1, 0.9, weight_decay=1.0) == pytest.approx(38 / 0.1)
    assert thr.heavy_ball_threshold(0.2, 0.5) == pytest.approx(15.0)
    assert thr.nesterov_threshold(0.2, 0.5) == pytest.approx(3.0 / 2.0 / 0.2)
    assert thr.sgd_threshold(0.2, 0.5, 0.5) == pytest.approx(30.0)
    assert thr.rmsprop_threshold(0.01, 0.5) == pytest.approx(300.0)
    assert thr.gd_threshold(0.0) == math.inf


@pytest.mark.parametrize(
    "call,exc,pattern",
    [
        (lambda: thr.gd_threshold(-1.0), ValueError, "lr must be a non-negative"),
        (lambda: thr.gd_threshold(float("nan")), ValueError, "lr must be"),
        (lambda: thr.adam_threshold(0.1, 1.0), ValueError, r"beta1 must lie in \[0, 1\), got 1.0"),
        (lambda: thr.adam_threshold(0.1, 0.9, weight_decay=-1), ValueError, "weight_decay must be"),
        (lambda: thr.heavy_ball_threshold(0.1, 1.5), ValueError, "momentum must lie"),
        (lambda: thr.sgd_threshold(0.1, 0.9, dampening=1.0), ValueError, "dampening must lie"),
    ],
)
def test_bad_threshold_arguments(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()
