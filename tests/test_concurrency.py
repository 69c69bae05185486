"""Threads and re-entrancy: one measurement at a time, a measurement never silently rewinds
another thread's training, a monitor can be removed from inside a measurement, and a
measurement that would step the optimizer is refused at once."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import stableopt
import stableopt._state


def _bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    loss = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    opt.zero_grad()
    loss().backward()
    opt.step()
    return model, opt, loss, x, y


def _in_thread(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    worker = threading.Thread(target=run, name="measurer", daemon=True)
    worker.start()
    return worker, result


def test_training_in_another_thread_is_detected_and_not_rewound():
    model, opt, loss, x, y = _bn_model()
    bn = model[1]
    inside, resume = threading.Event(), threading.Event()

    def measuring_loss():
        inside.set()  # the main thread trains now, while this measurement is in progress
        assert resume.wait(60)
        return loss()

    worker, result = _in_thread(lambda: opt.sharpness(measuring_loss))
    assert inside.wait(60)
    tracked = int(bn.num_batches_tracked)
    draws = []
    for _ in range(5):  # training steps of the main thread during the measurement
        opt_step = ((model(x) - y) ** 2).mean()
        draws.append(torch.rand(3))
        opt_step.backward()
    resume.set()
    worker.join(60)
    assert not worker.is_alive()
    assert isinstance(result.get("error"), RuntimeError), result
    message = str(result["error"])
    assert "modules ran in another thread" in message and "MainThread" in message
    # nothing of the main thread's work was rewound: its 5 batches count, its RNG moved on
    assert int(bn.num_batches_tracked) >= tracked + 5
    assert not any(torch.equal(torch.rand(3), d) for d in draws)
    assert not stableopt._state._ACTIVE
    assert opt.sharpness(loss).converged  # and the optimizer measures normally afterwards


def test_a_second_concurrent_measurement_is_refused_before_it_changes_anything():
    model, opt, loss, _, _ = _bn_model()
    inside, resume = threading.Event(), threading.Event()

    def slow_loss():
        inside.set()
        assert resume.wait(60)
        return loss()

    worker, result = _in_thread(lambda: opt.sharpness(slow_loss))
    assert inside.wait(60)
    rng = torch.get_rng_state()
    buffers = [b.clone() for b in model.buffers()]
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    with pytest.raises(RuntimeError, match="already running in thread 'measurer'"):
        opt.sharpness(loss)
    assert torch.equal(torch.get_rng_state(), rng) and len(nn.modules.module._global_forward_pre_hooks) == hooks
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.buffers()))
    resume.set()
    worker.join(60)
    assert "error" not in result and result["value"].converged
    assert not stableopt._state._ACTIVE


def test_nested_measurements_in_one_thread_are_allowed():
    model, opt, loss, _, _ = _bn_model()
    other = stableopt.Adam(model.parameters(), lr=1e-3)
    other.step()
    inner = []

    def outer_loss():
        if not inner:
            inner.append(other.sharpness(loss))
        return loss()

    assert opt.sharpness(outer_loss).converged and inner[0].converged


def test_a_monitor_removed_inside_its_measurement_or_a_hook():
    model, opt, loss, x, y = _bn_model()
    handles = {}

    def removing_loss():
        handles["a"].remove()  # inside its own measurement, inside step()
        return loss()

    handles["a"] = opt.monitor(removing_loss, every=1)
    handles["b"] = opt.monitor(loss, every=1)
    opt.register_measurement_hook(lambda o, r: handles["b"].remove())
    for _ in range(3):
        opt.zero_grad()
        loss().backward()
        opt.step()  # used to raise "OrderedDict mutated during iteration"
    assert not handles["a"].active and not handles["b"].active
    # a measured once (removing itself); the hook after that measurement removed b before its turn
    assert len(opt.history) == 1 and opt.history.column("monitor").tolist() == [handles["a"].id]
    # a dormant dispatcher is pruned by the next add/remove outside a step
    c = opt.monitor(loss, every=1)
    assert len(opt._optimizer_step_post_hooks) == 1
    c.remove()
    assert not opt._optimizer_step_post_hooks


def test_a_monitor_whose_loss_steps_is_refused_at_once():
    model, opt, loss, _, _ = _bn_model()
    steps = []

    def stepping_loss():
        steps.append(opt.steps_taken)
        opt.step()  # a bug: would recurse through the monitor
        return loss()

    opt.monitor(stepping_loss, every=1)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    loss().backward()
    with pytest.raises(RuntimeError, match=r"step\(\) was called inside a stableopt measurement"):
        opt.step()
    assert steps == [2]  # one measurement, no nested step taken
    assert opt.steps_taken == 2
    after = [p.detach() for p in model.parameters()]
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > 0  # the outer step's update only
    assert torch.is_grad_enabled() and not stableopt._state._ACTIVE


def test_a_measurement_hook_that_steps_is_refused():
    model, opt, loss, _, _ = _bn_model()
    opt.monitor(loss, every=1)
    opt.register_measurement_hook(lambda o, r: o.step())
    opt.zero_grad()
    loss().backward()
    with pytest.raises(RuntimeError, match="inside a monitor's measurement"):
        opt.step()
    assert opt.steps_taken == 3  # the outer step and the one nested step the hook took, no more
