"""stableopt.loggers and ``opt.monitor(..., log=fn)``: the metrics of every measurement reach
``fn``, a TensorBoard event file and a W&B run, with the values the history holds; and
``python -m stableopt`` is the ``stableopt`` command."""

from __future__ import annotations

import math
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import stableopt
from stableopt import LRGuard, loggers


def _quadratic(lr=0.03, guard=None):
    """SGD on ½θᵀdiag(100, 10, 1)θ: ratio = η·100/2 exactly (1.5 at η = 0.03)."""
    h = torch.tensor([100.0, 10.0, 1.0], dtype=torch.float64)
    theta = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = stableopt.SGD([theta], lr=lr, guard=guard)

    def loss_fn():
        return 0.5 * (h * theta**2).sum()

    def step():
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    return opt, loss_fn, step


def test_log_gets_each_measurement_of_its_monitor_as_the_history_records_it():
    opt, loss_fn, step = _quadratic(lr=0.01)
    calls = []
    opt.monitor(loss_fn, every=2, raw=True, log=lambda m, s: calls.append((dict(m), s)))
    opt.monitor(loss_fn, every=3)  # another monitor without log: its measurements are not sent
    for _ in range(6):
        step()
    assert [s for _, s in calls] == [2, 4, 6]
    rows = opt.history.to_dict()
    mine = rows["monitor"] == 0
    for name in ("ratio", "preconditioned", "threshold", "raw", "hvps", "seconds"):
        assert [m[f"stableopt/{name}"] for m, _ in calls] == rows[name][mine].tolist(), name
    first = calls[0][0]
    assert first["stableopt/ratio"] == pytest.approx(0.01 * 100 / 2, rel=1e-6)
    assert first["stableopt/raw"] == pytest.approx(100.0, rel=1e-6)
    assert all(isinstance(v, float) for v in first.values())
    assert not any(k.startswith("stableopt/guard") for k in first)  # no guard, no factor


def test_log_reports_the_guard_factor_after_the_guard_reacted():
    opt, loss_fn, step = _quadratic(lr=0.03, guard=True)  # ratio 1.5 > trigger 1.2: a cut to 0.9/1.5
    calls = []
    opt.monitor(loss_fn, every=1, log=lambda m, s: calls.append(m))
    step()
    assert calls[0]["stableopt/ratio"] == pytest.approx(1.5, rel=1e-6)
    assert calls[0]["stableopt/guard_factor_0"] == pytest.approx(0.9 / 1.5, rel=1e-6)
    assert calls[0]["stableopt/guard_factor_0"] == opt.guard.factors[0]


def test_log_is_called_with_per_group_guard_factors():
    a = nn.Parameter(torch.ones(2, dtype=torch.float64))
    b = nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = stableopt.SGD([{"params": [a]}, {"params": [b], "lr": 0.001}], lr=0.01, guard=LRGuard())
    loss_fn = lambda: (a**2).sum() + (b**2).sum()  # noqa: E731
    calls = []
    opt.monitor(loss_fn, log=lambda m, s: calls.append(m))
    loss_fn().backward()
    opt.step()
    assert {k for k in calls[0] if "guard" in k} == {"stableopt/guard_factor_0", "stableopt/guard_factor_1"}


@pytest.mark.parametrize("bad", [3, "print", [print]])
def test_log_must_be_callable(bad):
    opt, loss_fn, _ = _quadratic()
    with pytest.raises(TypeError, match=r"log must be None or a callable fn\(metrics"):
        opt.monitor(loss_fn, log=bad)


def test_log_errors_propagate_and_the_measurement_is_still_recorded():
    opt, loss_fn, step = _quadratic()

    def broken(metrics, step):
        raise OSError("disk full")

    opt.monitor(loss_fn, log=broken)
    with pytest.raises(OSError, match="disk full"):
        step()
    assert len(opt.history) == 1


def test_adapters_reject_what_cannot_log():
    with pytest.raises(TypeError, match="SummaryWriter"):
        loggers.tensorboard(object())
    with pytest.raises(TypeError, match="wandb run"):
        loggers.wandb(object())


def test_tensorboard_adapter_writes_scalars_a_reader_gets_back(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install 'stableopt[tensorboard]' to test the TensorBoard adapter")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    opt, loss_fn, step = _quadratic(lr=0.01)
    with SummaryWriter(tmp_path) as writer:
        opt.monitor(loss_fn, every=2, raw=True, log=loggers.tensorboard(writer))
        for _ in range(4):
            step()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "stableopt/ratio",
        "stableopt/preconditioned",
        "stableopt/raw",
        "stableopt/threshold",
        "stableopt/hvps",
        "stableopt/seconds",
    } <= tags
    ratio = events.Scalars("stableopt/ratio")
    assert [e.step for e in ratio] == [2, 4]
    expected = opt.history.column("ratio").tolist()
    assert [e.value for e in ratio] == pytest.approx(expected, rel=1e-6)  # stored as float32


class _Run:
    """The one method of a W&B run the adapter uses."""

    def __init__(self):
        self.rows = []

    def log(self, data, step=None):
        self.rows.append((data, step))


@pytest.mark.parametrize("use_step", [True, False])
def test_wandb_adapter_logs_at_the_optimizer_step_or_carries_it(use_step):
    opt, loss_fn, step = _quadratic(lr=0.01)
    run = _Run()
    opt.monitor(loss_fn, every=2, log=loggers.wandb(run, step=use_step))
    for _ in range(4):
        step()
    assert len(run.rows) == 2
    ratios = opt.history.column("ratio").tolist()
    for (data, wb_step), optimizer_step, ratio in zip(run.rows, (2, 4), ratios):
        assert data["stableopt/ratio"] == ratio
        if use_step:
            assert wb_step == optimizer_step and "stableopt/step" not in data
        else:
            assert wb_step is None and data["stableopt/step"] == optimizer_step


def test_wandb_adapter_with_a_real_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install wandb to test the W&B adapter against wandb itself")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run = wandb.init(
        mode="offline", dir=str(tmp_path), project="stableopt-test", settings=wandb.Settings(console="off")
    )
    try:
        opt, loss_fn, step = _quadratic(lr=0.01)
        opt.monitor(loss_fn, every=2, log=loggers.wandb())  # run=None: the active run
        for _ in range(4):
            step()
    finally:
        run.finish()
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    # the offline run's records: keys and JSON values as text. W&B's service process can still be
    # writing the file after finish() returns (seen on a loaded 2-core machine): wait for it
    deadline = time.monotonic() + 60
    data = record.read_bytes()
    while b"stableopt/preconditioned" not in data and time.monotonic() < deadline:
        time.sleep(0.2)
        data = record.read_bytes()
    assert b"stableopt/ratio" in data and b"stableopt/preconditioned" in data
    assert repr(float(opt.history.column("ratio")[0])).encode() in data


def test_wandb_adapter_without_an_active_run_says_to_init(monkeypatch):
    wandb = pytest.importorskip("wandb", reason="pip install wandb to test the W&B adapter against wandb itself")
    monkeypatch.setattr(wandb, "run", None)
    opt, loss_fn, step = _quadratic()
    opt.monitor(loss_fn, log=loggers.wandb())
    with pytest.raises(RuntimeError, match=r"wandb.init\(\)"):
        step()


def test_metrics_skip_raw_when_not_measured_and_keep_nan():
    report = stableopt.SharpnessReport(
        step=1,
        preconditioned=math.nan,
        threshold=2.0,
        ratio=math.nan,
        raw=None,
        eigenvalues=(math.nan,),
        hvps=3,
        residual=math.nan,
        converged=False,
        seconds=0.1,
    )
    values = loggers.metrics(report)
    assert "stableopt/raw" not in values and math.isnan(values["stableopt/ratio"])


def test_python_dash_m_stableopt_is_the_command(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "stableopt", "--help"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "demo" in ok.stdout and "report" in ok.stdout
    assert ok.stdout.startswith("usage: stableopt ")
    missing = tmp_path / "missing.safetensors"
    bad = subprocess.run(
        [sys.executable, "-m", "stableopt", "report", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "no such file" in bad.stderr
