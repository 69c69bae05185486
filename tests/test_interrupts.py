"""Interrupts at random moments: a ``KeyboardInterrupt`` injected at a random moment of the code
that sets up and restores a measurement (alone, or while that code handles a first exception
from ``loss_fn``), of a history append or load, of the secant tracker inside ``step()``, and of
a guarded ``step()`` that scales the lr and puts the scheduler's value back (alone, or while a
first exception unwinds), never leaves anything behind: no global hook, grad mode and autocast
as they were, half-precision parameters and BatchNorm buffers bitwise restored, RNG streams
rewound, no ragged history, no lr left scaled; an fd measurement (its probes, products and
checks) interrupted anywhere — also while a first exception from ``loss_fn`` unwinds out of a
product — leaves the parameters bitwise as they were. The moments are those where CPython delivers a
signal's exception — a function starting, a call returning — picked by ``sys.setprofile`` (and,
for the lr restore, every line too, ``sys.settrace``) at a seeded random count, so the trials
are deterministic and bounded. The injector is ``tests/_interrupt.py``'s :class:`Interrupter`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.optim.optimizer as torch_optimizer
from _interrupt import SEED, Interrupter, sample_moments
from torch import nn

import stableopt
import stableopt._columns
import stableopt._precision
import stableopt._state
import stableopt.history
import stableopt.secant
from stableopt.history import History

# an interrupt inside the weak-reference fallback of an already restored context (it then does
# nothing) is reported by Python as "ignored": harmless, and expected at random moments
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _files(*modules):
    return [m.__file__ for m in modules]


def _global_hooks():
    m = nn.modules.module
    opt_hooks = torch_optimizer._global_optimizer_pre_hooks
    return (len(m._global_forward_pre_hooks), len(m._global_forward_hooks), len(opt_hooks))


class Boom(Exception):
    pass


def _bf16_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2), nn.Linear(8, 2)).to(
        torch.bfloat16
    )
    x, y = torch.randn(16, 4, dtype=torch.bfloat16), torch.randn(16, 2, dtype=torch.bfloat16)
    opt = stableopt.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    opt.zero_grad()
    ((model(x) - y) ** 2).float().mean().backward()
    opt.step()
    return model, opt, x, y


def _snapshot(model):
    return {
        "params": [(p.dtype, p.detach().clone()) for p in model.parameters()],
        "grads": [p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": torch.get_rng_state(),
        "hooks": _global_hooks(),
    }


def _assert_restored(before, model):
    after = _snapshot(model)
    assert after["hooks"] == before["hooks"], "a global hook was left registered"
    assert [d for d, _ in after["params"]] == [d for d, _ in before["params"]], "a parameter stayed float32"
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before["params"], after["params"]))
    assert all(torch.equal(a, b) for a, b in zip(before["grads"], after["grads"]))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(before["buffers"], after["buffers"]))
    assert torch.equal(after["rng"], before["rng"])
    assert torch.is_grad_enabled(), "grad mode left off"
    assert not stableopt._state._ACTIVE, "the measurement claim was not released"


def _trial(model, opt, x, y, at, *, fail_at=None, count_only=False):
    """One measurement under autocast with an interrupt at opcode ``at`` of _state/_precision
    (after loss_fn raised Boom on its ``fail_at``-th call, when given)."""
    injector = Interrupter(_files(stableopt._state, stableopt._precision), at, armed=fail_at is None)
    calls = [0]

    def loss_fn():
        calls[0] += 1
        if fail_at is not None and calls[0] == fail_at:
            injector.armed = True  # count (and inject) only inside the restore from here on
            raise Boom
        return ((model(x) - y) ** 2).float().mean()

    before = _snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        try:
            injector.run(lambda: opt.sharpness(loss_fn))
        except (KeyboardInterrupt, Boom):
            pass
        assert torch.is_autocast_enabled("cpu"), "autocast left off"
    assert not torch.is_autocast_enabled("cpu")
    _assert_restored(before, model)
    # an unrelated bf16 layer under autocast still works (a leftover hook broke exactly this)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert nn.Linear(3, 3).to(torch.bfloat16)(torch.randn(2, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    return injector


@pytest.mark.parametrize("second", [False, True], ids=["interrupt", "interrupt-while-handling-an-exception"])
def test_interrupts_anywhere_in_setup_and_restore_leave_nothing_behind(second):
    model, opt, x, y = _bf16_setup()
    fail_at = 1 if second else None  # loss_fn runs once: the HVPs reuse its graph
    total = _trial(model, opt, x, y, 0, fail_at=fail_at).count  # opcodes of an uninterrupted run
    assert total > 100
    points = sample_moments(total, 300, SEED + second)
    fired = 0
    for at in points:
        fired += _trial(model, opt, x, y, at, fail_at=fail_at).fired
    assert fired == len(points)
    # and training goes on, bitwise like a twin that never measured
    twin_model, twin_opt, _, _ = _bf16_setup()
    for m, o in ((model, opt), (twin_model, twin_opt)):
        torch.manual_seed(1)
        o.zero_grad()
        ((m(x) - y) ** 2).float().mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(model.buffers(), twin_model.buffers()))


def _row(i):
    return {
        "step": i,
        "loss": 0.5 / (i + 1),
        "preconditioned": 2.0,
        "raw": np.nan,
        "threshold": 4.0,
        "ratio": 0.5,
        "residual": 1e-4,
        "hvps": 7,
        "seconds": 0.01,
        "converged": True,
        "monitor": -1,
        "elapsed": float(i),
        "eig_0": 2.0,
        "eig_1": 1.0 * i,
        "lr_0": 0.1,
    }


def test_an_interrupted_append_adds_a_whole_row_or_none(tmp_path):
    files = _files(stableopt.history, stableopt._columns)
    for _ in range(2):  # the second run counts: the first fills caches (compiled column patterns)
        probe = History()
        probe._append("measurements", _row(0))
        counter = Interrupter(files)
        counter.run(lambda probe=probe: probe._append("measurements", _row(1)))
    for at in sample_moments(counter.count, 120):
        h = History()
        h._append("measurements", _row(0))
        injector = Interrupter(files, at)
        try:
            injector.run(lambda h=h: h._append("measurements", _row(1)))
        except KeyboardInterrupt:
            pass
        assert injector.fired
        assert {len(v) for v in h.to_dict().values()} == {len(h)} and len(h) in (1, 2)
        h._append("measurements", _row(2))  # the next append repairs nothing visible: it just works
        steps = h.column("step").tolist()
        assert steps in ([0, 2], [0, 1, 2]) and h.column("eig_1").tolist()[-1] == 2.0
        h.save(tmp_path / "h.safetensors")
        assert History.load(tmp_path / "h.safetensors").column("step").tolist() == steps


def _density(step):
    return stableopt.DensityReport(step, ((1.0, 2.0), (0.5, 3.0)), ((0.25, 0.75), (0.5, 0.5)), 2, 2, 4, size=3)


def test_an_interrupted_density_append_adds_a_whole_density_or_none(tmp_path):
    files = _files(stableopt.history, stableopt._columns)
    for _ in range(2):  # the second run counts (caches filled by the first)
        probe = History()
        probe.append_density(_density(0))
        counter = Interrupter(files)
        counter.run(lambda probe=probe: probe.append_density(_density(1)))
    for at in sample_moments(counter.count, 120):
        h = History()
        h.append_density(_density(0))
        injector = Interrupter(files, at)
        try:
            injector.run(lambda h=h: h.append_density(_density(1)))
        except KeyboardInterrupt:
            pass
        assert injector.fired
        steps = [d.step for d in h.densities()]
        assert steps in ([0], [0, 1]) and len(h.column("node")) == 4 * len(steps)
        h.append_density(_density(2))  # the next append drops whatever the interrupted one left
        steps = [d.step for d in h.densities()]
        assert steps in ([0, 2], [0, 1, 2]) and h.column("node_density").tolist()[-4:] == [len(steps) - 1] * 4
        h.save(tmp_path / "h.safetensors")
        assert [d.step for d in History.load(tmp_path / "h.safetensors").densities()] == steps


def test_an_interrupted_history_load_state_dict_is_all_old_or_all_new():
    old, new = History(), History()
    for i in range(3):
        old._append("measurements", _row(i))
    for i in range(5):
        new._append("measurements", _row(10 + i))
    new.append_event(12, 0, 1.0, 0.5, 1.4, "cut")
    state = new.state_dict()
    files = _files(stableopt.history, stableopt._columns)
    counter = Interrupter(files)
    counter.run(lambda: History().load_state_dict(state))
    for at in sample_moments(counter.count, 120):
        h = History()
        h.load_state_dict(old.state_dict())
        try:
            Interrupter(files, at).run(lambda h=h: h.load_state_dict(state))
        except KeyboardInterrupt:
            pass
        steps = h.column("step").tolist()
        assert steps in (old.column("step").tolist(), new.column("step").tolist())
        assert len(h.events()) == (1 if steps[0] == 10 else 0)


def test_an_interrupted_secant_tracker_leaves_grad_mode_on():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    opt = stableopt.SGD([w], lr=0.01)
    opt.monitor(lambda: (w**4).sum(), every=10**6, secant=True)
    files = _files(stableopt.secant, stableopt._state)

    def step():
        opt.zero_grad()
        (w**4).sum().backward()
        opt.step()

    step()
    counter = Interrupter(files)
    counter.run(step)
    fired = 0
    for at in sample_moments(counter.count, 100):
        injector = Interrupter(files, at)
        try:
            injector.run(step)
        except KeyboardInterrupt:
            pass
        assert torch.is_grad_enabled()
        fired += injector.fired  # (a step after an interrupted one can run fewer opcodes)
    assert fired >= 80


def _guarded_sgd():
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(3))
    opt = stableopt.SGD([{"params": [w]}, {"params": [v], "lr": 0.02}], lr=0.01, momentum=0.9, guard=True)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.guard.observe(2.0, step=opt.steps_taken)  # a cut: every step now runs at lr × 0.45
    assert opt.guard.factors == [0.45, 0.45]

    def closure():
        opt.zero_grad()
        loss = (w**2).sum() + (v**4).sum()
        loss.backward()
        return loss

    opt.step(closure)  # the scheduler steps after the optimizer
    return opt, scheduler, closure


@pytest.mark.parametrize("second", [False, True], ids=["interrupt", "interrupt-while-handling-an-exception"])
def test_an_interrupted_step_puts_the_schedulers_lr_back(second):
    """Interrupts anywhere in a guarded step() — at any line of the code that scales and puts
    back the lr, and at every call and return around it — never leave group["lr"] scaled; with
    ``second`` the interrupt comes while the restore handles a first exception (the closure's)."""
    targets = [stableopt.optimizers, stableopt._state]

    def trial(at):
        opt, scheduler, closure = _guarded_sgd()
        scheduler.step()  # the scheduler's values: 0.005 and 0.01
        lrs = [g["lr"] for g in opt.param_groups]
        interrupter = Interrupter(targets, at, armed=not second, lines=True)

        def failing():
            closure()
            interrupter.armed = True  # from here on only the restore runs
            raise Boom

        try:
            interrupter.run(lambda: opt.step(failing if second else closure))
        except (KeyboardInterrupt, Boom):
            pass
        assert [g["lr"] for g in opt.param_groups] == lrs, f"lr left scaled (moment {at})"
        assert all(type(g["lr"]) is float for g in opt.param_groups)
        opt.step(closure)  # and training goes on, with the cut
        assert [g["lr"] for g in opt.param_groups] == lrs
        assert opt.effective_lr() == pytest.approx([0.45 * lr for lr in lrs])
        return interrupter

    total = trial(0).count
    assert total > 5
    fired = sum(trial(at).fired for at in sample_moments(total, 150, SEED + second))
    assert fired == min(total, 150)


def _fd_setup():
    """A LayerNorm model whose key-bias-like coordinate never moves the loss (BatchNorm next to
    a bias): every part of the fd backend runs — probe, products, shortening, check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 2))
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return model, opt, loss_fn, x, y


@pytest.mark.parametrize("second", [False, True], ids=["interrupt", "interrupt-while-handling-an-exception"])
def test_an_interrupted_fd_measurement_leaves_the_parameters_bitwise_and_training_unchanged(second):
    """Interrupts at any line of the fd backend — inside a product, between the perturbation and
    its copy back, in the middle of the copy back, while a first exception from loss_fn unwinds —
    leave every parameter and gradient bitwise as before, and the next step equals a twin's."""
    import stableopt.finite_difference

    targets = [stableopt.finite_difference, stableopt._state]  # the backend and its restorers

    def trial(at):
        model, opt, loss_fn, x, y = _fd_setup()
        twin, twin_opt, twin_loss, _, _ = _fd_setup()
        before = _snapshot(model)
        interrupter = Interrupter(targets, at, armed=not second, lines=True)
        calls = [0]

        def failing():
            calls[0] += 1
            if second and calls[0] == 6:  # inside a product: θ is perturbed now
                interrupter.armed = True
                raise Boom
            return loss_fn()

        try:
            interrupter.run(lambda: opt.sharpness(failing, hvp="fd"))
        except (KeyboardInterrupt, Boom):
            pass
        _assert_restored(before, model)
        for o, lf in ((opt, loss_fn), (twin_opt, twin_loss)):  # training goes on as if nothing happened
            o.zero_grad()
            lf().backward()
            o.step()
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters())), f"moment {at}"
        return interrupter

    total = trial(0).count
    assert total > 20
    fired = sum(trial(at).fired for at in sample_moments(total, 80, SEED + 7 + second))
    assert fired == min(total, 80)
