"""Fault injection: whatever goes wrong inside a measurement, training is left exactly as it was.

Faults: a loss that turns NaN/Inf mid-run, an exception raised inside ``loss_fn`` in the middle
of a measurement (after some Hessian-vector products), KeyboardInterrupt there. After each:
parameters, ``p.grad``, optimizer state, RNG streams, module buffers, autocast, half-precision
parameters and DDP flags are what they were before the measurement; the optimizer keeps training
bitwise like a twin that never measured; the history keeps every record it had.
"""

from __future__ import annotations

import copy
import math
import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import stableopt


def _setup(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2)).to(dtype)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randn(16, 2, dtype=dtype)
    opt = stableopt.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    opt_twin = stableopt.Adam(twin.parameters(), lr=1e-2, eps=1e-3)
    return model, twin, opt, opt_twin, x, y


def _loss(model, x, y):
    return ((model(x) - y) ** 2).mean()


def _step(model, opt, x, y):
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()


def _pair_step(model, opt, twin, opt_twin, x, y):
    """One step of each, drawing the same dropout mask (the twin replays the RNG)."""
    state = torch.get_rng_state()
    _step(model, opt, x, y)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    _step(twin, opt_twin, x, y)
    assert torch.equal(torch.get_rng_state(), after)


def _snapshot(model, opt):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "dtypes": [p.dtype for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "state": copy.deepcopy(opt.state_dict()["state"]),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
        "history": {k: v.copy() for k, v in opt.history.to_dict().items()} if hasattr(opt, "history") else {},
        "training": model.training,
    }


def _assert_same(before, model, opt):
    after = _snapshot(model, opt)
    assert after["dtypes"] == before["dtypes"]
    assert all(torch.equal(a, b) for a, b in zip(before["params"], after["params"]))
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(before["grads"], after["grads"]))
    assert all(torch.equal(a, b) for a, b in zip(before["buffers"], after["buffers"]))
    for i, s in before["state"].items():
        assert all(
            torch.equal(v, after["state"][i][k]) if isinstance(v, torch.Tensor) else v == after["state"][i][k]
            for k, v in s.items()
        )
    assert torch.equal(before["rng"][0], after["rng"][0]) and before["rng"][1] == after["rng"][1]
    assert np.array_equal(before["rng"][2], after["rng"][2])
    assert after["training"] == before["training"]
    assert not torch.is_autocast_enabled("cpu")
    # nothing lost from the history: every earlier record is still there, unchanged
    for key, col in before["history"].items():
        assert np.array_equal(col, after["history"][key][: len(col)], equal_nan=col.dtype.kind == "f")


class Boom(Exception):
    pass


def _fault_after(calls: int, exc: BaseException, fn):
    """loss_fn(batch) that raises ``exc`` on its ``calls``-th evaluation (mid-Lanczos)."""
    count = [0]

    def loss_fn(batch):
        count[0] += 1
        if count[0] == calls:
            raise exc
        return fn(batch)

    return loss_fn, count


@pytest.mark.parametrize("exc", [Boom("injected"), KeyboardInterrupt()], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fault_inside_loss_fn_mid_measurement_leaves_training_untouched(exc, dtype):
    model, twin, opt, opt_twin, x, y = _setup(dtype)
    for _ in range(3):
        _pair_step(model, opt, twin, opt_twin, x, y)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    ok = opt.sharpness(lambda b: _loss(model, *b), batches=batches)  # a record in the history
    before = _snapshot(model, opt)
    # 2 batches per product: call 7 is inside the 3rd Hessian-vector product
    loss_fn, count = _fault_after(7, exc, lambda b: _loss(model, *b))
    with pytest.raises(type(exc)):
        with torch.autocast("cpu", enabled=False):
            opt.sharpness(loss_fn, batches=batches, raw=True)
    assert count[0] == 7
    _assert_same(before, model, opt)
    if hasattr(opt, "history"):
        assert len(opt.history) == len(before["history"].get("step", [])) >= 1
    # the optimizer is usable: measures again (same value as before) and trains like the twin
    again = opt.sharpness(lambda b: _loss(model, *b), batches=batches)
    assert math.isclose(again.preconditioned, ok.preconditioned, rel_tol=1e-2)
    for _ in range(2):
        _pair_step(model, opt, twin, opt_twin, x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_loss_turning_non_finite_mid_run(bad):
    model, twin, opt, opt_twin, x, y = _setup()
    poison = {"on": False}

    def loss_fn():
        loss = _loss(model, x, y)
        return loss * bad if poison["on"] else loss

    monitor = opt.monitor(loss_fn, every=1) if hasattr(opt, "monitor") else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(6):
            poison["on"] = step in (2, 3)  # NaN/Inf for two measurements, then fine again
            before = _snapshot(model, opt)
            if monitor is None:
                opt.sharpness(loss_fn)
                _assert_same(before, model, opt)
            _pair_step(model, opt, twin, opt_twin, x, y)  # a monitor measures inside step()
    assert any("not finite" in str(w.message) for w in caught)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    if monitor is not None:
        ratio = opt.history.column("ratio")
        steps = opt.history.column("step")
        assert len(ratio) == 6 and list(steps) == [1, 2, 3, 4, 5, 6]  # nothing lost
        finite = np.isfinite(ratio)
        assert list(finite) == [True, True, False, False, True, True]
        assert not opt.history.column("converged")[2:4].any()


def test_monitor_exception_propagates_after_the_step_and_keeps_history():
    model, twin, opt, opt_twin, x, y = _setup()
    if not hasattr(opt, "monitor"):
        pytest.skip("monitors not available")
    fail = {"on": False}

    def loss_fn():
        if fail["on"]:
            raise Boom("data loader died")
        return _loss(model, x, y)

    opt.monitor(loss_fn, every=1)
    for _ in range(3):
        _pair_step(model, opt, twin, opt_twin, x, y)
    fail["on"] = True
    state = torch.get_rng_state()
    opt.zero_grad()
    _loss(model, x, y).backward()
    with pytest.raises(Boom):
        opt.step()  # the update happened; the measurement after it failed
    torch.set_rng_state(state)
    _step(twin, opt_twin, x, y)
    assert opt.steps_taken == 4 and len(opt.history) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    fail["on"] = False
    _pair_step(model, opt, twin, opt_twin, x, y)
    assert len(opt.history) == 4 and opt.history.column("step")[-1] == 5
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
