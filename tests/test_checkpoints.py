"""Checkpoints: ``opt.state_dict()`` is a pure function of the training state, loads back to
itself, survives ``torch.load(weights_only=True)``; a tampered ``"stableopt"`` entry is refused
whole before anything changes; pickle and deepcopy keep the history, the guard's cut and the
monitors' schedules."""

from __future__ import annotations

import copy
import io
import math
import pickle
import time

import pytest
import torch
from torch import nn

import stableopt


def _equal(a, b, path="sd"):
    """Deep equality of state dicts: tensors by value, dtype and device; containers by type."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.device == b.device, path
        assert a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, sorted(map(str, a)), sorted(map(str, b)))
        for k in a:
            _equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b and type(a) is type(b), (path, a, b)


def _guard():
    # levels scaled to this small problem's ratio (~0.06 at step 2): one cut, then quiet
    return stableopt.LRGuard(warmup=0, trigger=0.01, target=0.009, recovery=0.001)


def _trained(guard=True, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2))
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()  # noqa: E731
    opt = stableopt.Adam(model.parameters(), lr=0.05, guard=_guard() if guard else None)
    opt.monitor(loss_fn, every=2, secant=True, raw=True, k=2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return model, opt, loss_fn


def _fresh(model_like, guard=True):
    model = copy.deepcopy(model_like)
    opt = stableopt.Adam(model.parameters(), lr=0.05, guard=_guard() if guard else None)
    return model, opt


def test_state_dict_is_a_pure_function_of_the_training_state():
    model, opt, _ = _trained()
    assert opt.guard.events and len(opt.history) == 3 and opt._stableopt_warm  # a cut, rows, warm starts
    first = opt.state_dict()
    time.sleep(0.01)  # the wall clock moves on; the state dict does not
    _equal(first, opt.state_dict())
    # torch's test_state_dict_deterministic: a copy loaded from it gives the same state dict
    _, copy_opt = _fresh(model)
    copy_opt.load_state_dict(copy.deepcopy(first))
    _equal(first, copy_opt.state_dict())


def test_load_then_state_dict_gives_the_dict_back_and_the_clock_continues():
    model, opt, loss_fn = _trained()
    sd = copy.deepcopy(opt.state_dict())
    _, other = _fresh(model)
    other.load_state_dict(sd)
    _equal(sd, other.state_dict())
    last = float(opt.history.column("elapsed")[-1])
    assert last <= other.history.elapsed() < last + 5.0  # continued from the last recorded value
    assert "elapsed" not in sd["stableopt"]["components"]["history"]


@pytest.mark.parametrize("monitor_first", [False, True], ids=["load-then-monitor", "monitor-then-load"])
def test_weights_only_checkpoint_resumes_the_same_history(monitor_first):
    model, opt, loss_fn = _trained(steps=4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # only tensors and plain values inside
    assert len(loaded["stableopt"]["components"]["monitors"]["secant"]["theta"]) == 4
    model2, opt2 = _fresh(model)
    x, y = loss_fn.__closure__[-2].cell_contents, loss_fn.__closure__[-1].cell_contents
    loss_fn2 = lambda: ((model2(x) - y) ** 2).mean()  # noqa: E731
    if monitor_first:  # the same monitor, added before the checkpoint is loaded
        opt2.monitor(loss_fn2, every=2, secant=True, raw=True, k=2)
        opt2.load_state_dict(loaded)
    else:
        opt2.load_state_dict(loaded)
        opt2.monitor(loss_fn2)  # takes the saved schedule back
    for o, f in ((opt, loss_fn), (opt2, loss_fn2)):
        for _ in range(4):
            o.zero_grad()
            f().backward()
            o.step()
    h, h2 = opt.history, opt2.history
    assert h2.column("step").tolist() == h.column("step").tolist() == [2, 4, 6, 8]
    for table in ("measurements", "events"):
        for name, values in h.to_dict(table).items():
            if name not in ("seconds", "elapsed"):  # wall times differ
                assert values.tobytes() == h2.column(name).tobytes(), name  # the same run, bit for bit
    assert h2.events() == h.events()
    # the secant snapshot (θ_{t−1}, g_{t−1}) is in the checkpoint: the first step after the
    # resume is recorded as in the uninterrupted run
    s, s2 = h.secant(), h2.secant()
    assert s["secant_step"].tolist() == s2["secant_step"].tolist() == [1, 2, 3, 4, 5, 6, 7]
    for name in s:
        assert s[name].tobytes() == s2[name].tobytes(), name


def _tampered():
    """(what, change) for entries that must be refused."""
    meta = torch.empty(2, 40, device="meta")

    def history_col(name, value):
        return lambda sd: sd["stableopt"]["components"]["history"]["columns"].__setitem__(name, value)

    return [
        (
            "warm on meta",
            "dense 2-D floating-point tensor with data",
            lambda sd: sd["stableopt"]["warm"].__setitem__("preconditioned", meta),
        ),
        ("warm NaN", "NaN or infinite", lambda sd: sd["stableopt"]["warm"]["preconditioned"].fill_(math.nan)),
        ("warm 1-D", "2-D", lambda sd: sd["stableopt"]["warm"].__setitem__("raw", torch.ones(3))),
        ("negative step", "step must be a non-negative integer", lambda sd: sd["stableopt"].__setitem__("step", -1)),
        ("float step", "step must be a non-negative integer", lambda sd: sd["stableopt"].__setitem__("step", 2.5)),
        ("unknown field", "unknown fields", lambda sd: sd["stableopt"].__setitem__("evil", 1)),
        ("unknown component", "unknown components", lambda sd: sd["stableopt"]["components"].__setitem__("evil", {})),
        (
            "schema -5",
            "invalid schema -5",
            lambda sd: sd["stableopt"]["components"]["history"].__setitem__("schema", -5),
        ),
        (
            "schema str",
            "schema must be an int",
            lambda sd: sd["stableopt"]["components"]["history"].__setitem__("schema", "1"),
        ),
        ("ragged column", "rows", history_col("loss", torch.zeros(99, dtype=torch.float64))),
        ("float32 column", "dtype float32", history_col("loss", torch.zeros(2))),
        (
            "meta column",
            "dense tensor with data",
            history_col("loss", torch.empty(2, dtype=torch.float64, device="meta")),
        ),
        (
            "steps back",
            "not in order",
            lambda sd: sd["stableopt"]["components"]["history"]["columns"]["step"].copy_(torch.tensor([4, 2])),
        ),
        (
            "reasons",
            "event reasons",
            lambda sd: sd["stableopt"]["components"]["history"].__setitem__("event_reasons", []),
        ),
        (
            "schedule without every",
            "must hold id, every",
            lambda sd: sd["stableopt"]["components"]["monitors"]["schedules"][0].pop("every"),
        ),
        (
            "schedule every 0",
            "out of range",
            lambda sd: sd["stableopt"]["components"]["monitors"]["schedules"][0].__setitem__("every", 0),
        ),
        (
            "schedule tol str",
            "tol must be float",
            lambda sd: sd["stableopt"]["components"]["monitors"]["schedules"][0].__setitem__("tol", "x"),
        ),
        ("next_id", "next_id", lambda sd: sd["stableopt"]["components"]["monitors"].__setitem__("next_id", -3)),
        (
            "guard factor",
            "positive finite",
            lambda sd: sd["stableopt"]["components"]["guard"].__setitem__("factors", [-1.0]),
        ),
        (
            "guard event",
            "each event must be",
            lambda sd: sd["stableopt"]["components"]["guard"]["events"].append((1, 2)),
        ),
        (
            "guard counter",
            "non-negative integer",
            lambda sd: sd["stableopt"]["components"]["guard"].__setitem__("skipped", -1),
        ),
        ("entry not a dict", "expected a dict", lambda sd: sd.__setitem__("stableopt", [1, 2])),
        ("secant not a dict", "secant must be a dict", lambda sd: _monitors(sd).__setitem__("secant", [1])),
        ("secant theta short", "list of 4 tensors", lambda sd: _secant(sd)["theta"].pop()),
        (
            "secant grad shape",
            r"grad\[0\] has shape \(2, 2\)",
            lambda sd: _secant(sd)["grad"].__setitem__(0, torch.ones(2, 2)),
        ),
        (
            "secant int tensor",
            "dense floating-point",
            lambda sd: _secant(sd)["theta"].__setitem__(1, torch.ones(6, dtype=torch.long)),
        ),
        ("secant step", "secant step must be an integer", lambda sd: _secant(sd).__setitem__("step", -1)),
        # absurd values: out of the guard's own range, counters past 2**53, inconsistent counts
        ("guard factor 1e308", r"a factor 1e\+308 is above this guard's cap \(1.0\)", _guard_set("factors", [1e308])),
        ("guard factor 11", r"a factor 11.0 is above this guard's cap", _guard_set("factors", [11.0])),
        ("guard factor 1e-9", r"a factor 1e-09 is below this guard's floor \(0.01\)", _guard_set("factors", [1e-9])),
        ("guard common", r"common 1e\+308 is above this guard's cap", _guard_set("common", 1e308)),
        ("guard factors count", "2 factors for an optimizer with 1 param groups", _guard_set("factors", [0.5, 0.5])),
        ("guard counter 1e30", r"measurements must be below 2\*\*53", _guard_set("measurements", 10**30)),
        ("guard below", "cannot exceed measurements", _guard_set("below", 10**6)),
        ("absurd step", r"step must be below 2\*\*53", lambda sd: sd["stableopt"].__setitem__("step", 10**20)),
        (
            "absurd measurements",
            r"measurements must be below 2\*\*53",
            lambda sd: sd["stableopt"].__setitem__("measurements", 2**60),
        ),
        (
            "history after the step",
            "history's step column reaches step 4",
            lambda sd: sd["stableopt"].__setitem__("step", 3),
        ),
        ("secant at the step", "secant snapshot was taken at step 4", lambda sd: _secant(sd).__setitem__("step", 4)),
        ("schedule id", "not below next_id", lambda sd: _monitors(sd)["schedules"][0].__setitem__("id", 7)),
        (
            "absurd next_id",
            r"next_id must be an integer in \[0, 2\*\*31\)",
            lambda sd: _monitors(sd).__setitem__("next_id", 2**40),
        ),
    ]


def _guard_set(key, value):
    return lambda sd: sd["stableopt"]["components"]["guard"].__setitem__(key, value)


def _monitors(sd):
    return sd["stableopt"]["components"]["monitors"]


def _secant(sd):
    return sd["stableopt"]["components"]["monitors"]["secant"]


@pytest.mark.parametrize("what, problem, change", _tampered(), ids=[t[0] for t in _tampered()])
def test_a_tampered_entry_is_refused_and_changes_nothing(what, problem, change):
    model, opt, _ = _trained()
    _, other_opt, _ = _trained(steps=4)  # a different training state to (try to) load
    bad = copy.deepcopy(other_opt.state_dict())
    change(bad)
    before = copy.deepcopy(opt.state_dict())
    lr_before = opt.effective_lr()
    with pytest.raises(ValueError, match=problem):
        opt.load_state_dict(bad)
    _equal(before, opt.state_dict())  # torch state, step, history, schedules, guard: untouched
    assert opt.effective_lr() == lr_before and opt.steps_taken == 6


def test_a_guard_entry_is_checked_even_without_a_guard():
    model, opt, _ = _trained()
    sd = copy.deepcopy(opt.state_dict())
    sd["stableopt"]["components"]["guard"]["factors"] = ["x"]
    _, plain = _fresh(model, guard=False)
    with pytest.raises(ValueError, match="positive finite"):
        plain.load_state_dict(sd)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "copy"])
def test_pickle_and_deepcopy_keep_the_cut_the_history_and_the_schedules(how):
    model, opt, loss_fn = _trained()
    assert opt.guard.factors[0] < 1.0
    clone_of = {"deepcopy": copy.deepcopy, "copy": copy.copy, "pickle": lambda o: pickle.loads(pickle.dumps(o))}[how]
    if how == "pickle":  # a lambda loss_fn cannot be pickled; the copy never holds it anyway
        opt.guard._loss_fn = None
    clone = clone_of(opt)
    _equal(opt.state_dict()["stableopt"], clone.state_dict()["stableopt"])
    assert clone.effective_lr() == opt.effective_lr() and clone.guard is not opt.guard
    assert clone.guard.factors == opt.guard.factors and clone.guard.events == opt.guard.events
    assert clone.history.to_dict().keys() == opt.history.to_dict().keys()
    assert opt.guard._optimizer is opt  # the original keeps its guard
    if how == "copy":  # a shallow copy shares the parameters: nothing more to compare
        return
    # the copy trains at the cut lr: its next step is the original's next step
    params = [p for g in clone.param_groups for p in g["params"]]
    for p, q in zip(params, model.parameters()):
        p.grad = q.grad.clone()
    clone.step()
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    # the monitors' schedules come back as after load_state_dict
    monitor = clone.monitor(loss_fn)
    assert (monitor.every, monitor.raw, monitor.k, monitor.secant) == (2, True, 2, True)


def test_a_copied_guard_that_measures_on_its_own_asks_for_its_loss_again():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4))
    loss_fn = lambda: (w**4).sum()  # noqa: E731
    opt = stableopt.SGD([w], lr=0.01, guard=stableopt.LRGuard(every=1, loss_fn=loss_fn))
    clone = copy.deepcopy(opt)
    loss_fn().backward()
    with pytest.raises(RuntimeError, match=r"opt.guard.attach\(loss_fn\)"):
        clone.step()


@pytest.mark.parametrize("cls", [stableopt.Adam, stableopt.AdamW, stableopt.SGD, stableopt.RMSprop])
def test_copies_without_monitors_match_torch(cls):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(5))
    q = nn.Parameter(p.detach().clone())
    ours, theirs = cls([p], lr=0.01), getattr(torch.optim, cls.__name__)([q], lr=0.01)
    for o, w in ((ours, p), (theirs, q)):
        (w**2).sum().backward()
        o.step()
    for clone_of in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
        a, b = clone_of(ours), clone_of(theirs)
        public = lambda o: {k for k in o.__dict__ if not k.startswith("_")}  # noqa: E731
        assert public(a) == public(ours) == public(b)
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.pop("stableopt")["step"] == 1
        _equal(sb, sa)
