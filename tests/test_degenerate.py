"""Degenerate thresholds: AdamW with ηλ ≥ 2 has a stability threshold (1 + β1)(2 − ηλ)/((1 − β1)η)
of 0 (ηλ = 2) or below (ηλ > 2): its weight decay alone is at or past its stability limit, so
the update is unstable at any curvature. Every ratio is then +inf — never a ZeroDivisionError,
never a negative ratio that reads "below the edge" — and the guard cuts."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import stableopt
from stableopt.history import History
from stableopt.monitor import zone
from stableopt.report import render_report


def _run(decay, *, guard=None, steps=3, groups=None, monitor=None):
    """Full-batch AdamW at lr 1 with weight decay ``decay`` (ηλ = decay) on a small tanh MLP."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 1, dtype=torch.float64)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()
    params = groups(model) if groups is not None else model.parameters()
    opt = stableopt.AdamW(params, lr=1.0, weight_decay=decay, guard=guard)
    if monitor is not None:
        monitor(opt, loss_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the guard's floor warning
        for _ in range(steps):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
    return model, opt, loss_fn


@pytest.mark.parametrize("decay, tau", [(2.0, 0.0), (3.0, -19.0)], ids=["eta-lambda-2", "eta-lambda-3"])
def test_a_threshold_at_or_below_zero_is_an_infinite_ratio(decay, tau):
    model, opt, loss_fn = _run(decay)
    assert opt.stability_threshold() == [pytest.approx(tau)]
    rep = opt.sharpness(loss_fn, raw=True)  # was: ZeroDivisionError (2), ratio -0.008 (3)
    assert rep.ratio == math.inf and rep.threshold == pytest.approx(tau)
    assert math.isfinite(rep.preconditioned) and rep.converged  # λ_max itself was measured
    assert zone(rep.ratio) == "above" and "above the edge" in stableopt.monitor.plain_line(rep)
    blocks = opt.sharpness(loss_fn, blocks="module").blocks
    assert blocks and all(b.ratio == math.inf for b in blocks.values())
    direc = opt.directional_sharpness(loss_fn, "gradient")
    assert direc.ratio == math.inf and math.isfinite(direc.value)
    dens = opt.spectral_density(loss_fn, probes=2, iters=4)
    assert dens.threshold == pytest.approx(tau) and "top node / threshold inf" in str(dens)


def test_monitors_secant_tracking_report_and_files_at_a_negative_threshold(tmp_path):
    def monitors(opt, loss_fn):
        opt.monitor(loss_fn, every=1, secant=True, directional="update")
        opt.monitor(loss_fn, every=1, budget=2)

    _, opt, loss_fn = _run(3.0, monitor=monitors, steps=4)  # was: ZeroDivisionError in step()
    h = opt.history
    assert h.column("ratio").tolist() == [math.inf] * 4
    assert h.secant()["secant_ratio"].tolist() == [math.inf] * 3
    assert h.directional()["directional_ratio"].tolist() == [math.inf] * 4
    assert h.tracking()["track_ratio"].tolist() == [math.inf] * 4
    opt.spectral_density(loss_fn, probes=2, iters=4)
    from rich.console import Console

    console = Console(width=160, record=True, color_system=None)
    console.print(render_report(h))
    text = console.export_text()
    assert "inf" in text and "above the edge" in text
    h.save(tmp_path / "h.safetensors")
    loaded = History.load(tmp_path / "h.safetensors")
    assert loaded.column("ratio").tolist() == [math.inf] * 4
    assert loaded.densities()[0].threshold == pytest.approx(-19.0)


def test_per_group_thresholds_with_one_at_or_below_zero():
    def groups(model):  # the first layer decays at ηλ = 3, the head does not decay
        return [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "weight_decay": 0.0, "lr": 1e-2},
        ]

    _, opt, loss_fn = _run(3.0, groups=groups)
    taus = opt.stability_threshold()
    assert taus[0] == pytest.approx(-19.0) and taus[1] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: a NaN report with a warning (the ratio operator's D)
        rep = opt.sharpness(loss_fn)
        track = opt.monitor(loss_fn, budget=2).measure()
    assert rep.ratio == math.inf and rep.threshold == pytest.approx(-19.0) and rep.converged
    assert track.ratio == math.inf
    # along a direction that moves only the stable head, the directional ratio is finite
    head_only = [None, None, torch.ones(1, 5, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    assert math.isfinite(opt.directional_sharpness(loss_fn, head_only).ratio)
    assert opt.directional_sharpness(loss_fn, "gradient").ratio == math.inf


@pytest.mark.parametrize("decay", [2.0, 3.0], ids=["eta-lambda-2", "eta-lambda-3"])
def test_the_guard_cuts_on_an_infinite_ratio_even_in_adams_transient(decay):
    model, opt, loss_fn = _run(decay, guard=True)
    assert opt.guard.warmup_steps() == 30 and opt.steps_taken == 3  # inside the transient
    with pytest.warns(RuntimeWarning, match="threshold <= 0"):
        rep = opt.sharpness(loss_fn)
    assert rep.ratio == math.inf
    assert opt.guard.factors == [0.01] and opt.effective_lr() == [0.01]  # cut to the floor
    (event,) = opt.guard.events
    assert (event.reason, event.ratio, event.new_factor) == ("cut", math.inf, 0.01)
    assert opt.history.events()[0].ratio == math.inf
    # the cut lr (ηλ = 0.03) is stable again: a finite ratio, and no second cut on it
    assert math.isfinite(opt.sharpness(loss_fn).ratio)
    # a checkpoint with the +inf event loads
    sd = opt.state_dict()
    _, other, _ = _run(decay, guard=True)
    other.load_state_dict(sd)
    assert other.guard.events == opt.guard.events and other.effective_lr() == [0.01]


def test_an_edge_guard_refuses_a_checkpoint_factor_above_its_cap():
    def make(cap=None):
        torch.manual_seed(0)
        w = nn.Parameter(torch.ones(3))
        return stableopt.SGD([w], lr=0.1, guard=stableopt.LRGuard(mode="edge", cap=cap))

    opt = make()
    sd = opt.state_dict()
    sd["stableopt"]["components"]["guard"].update(factors=[5.0], common=5.0)
    opt.load_state_dict(sd)  # within the default cap of 10
    assert opt.guard.factors == [5.0]
    sd["stableopt"]["components"]["guard"].update(factors=[11.0])
    fresh = make()
    with pytest.raises(ValueError, match=r"a factor 11\.0 is above this guard's cap \(10\.0\)"):
        fresh.load_state_dict(sd)
    assert fresh.guard.factors == [1.0]
    make(cap=20.0).load_state_dict(sd)  # a guard with the saving run's settings takes it


def test_edge_ratio_and_sparkline_of_infinite_ratios():
    assert stableopt.thresholds.edge_ratio(1.0, 0.0) == math.inf
    assert stableopt.thresholds.edge_ratio(-1.0, -5.0) == math.inf  # never "below" the edge
    assert math.isnan(stableopt.thresholds.edge_ratio(1.0, math.nan))
    from stableopt.report import sparkline

    spark = sparkline(np.array([0.0, math.inf, math.nan]), top=1.0, zones=True)
    assert spark.plain == "▁█ "  # +inf at the top, NaN blank
    assert str(spark.spans[1].style) == "bold red"  # in the colour of "above"


def test_a_frozen_group_leaves_the_secant_ratio_finite():
    """lr 0: τ = inf and the group does not move; inf · 0 must not make the secant ratio NaN."""
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = stableopt.SGD([{"params": [w]}, {"params": [v], "lr": 0.0}], lr=0.05)
    opt.monitor(lambda: (w**4).sum() + (v**2).sum(), every=100, secant=True)
    for _ in range(3):
        opt.zero_grad()
        ((w**4).sum() + (v**2).sum()).backward()
        opt.step()
    ratios = opt.history.secant()["secant_ratio"]
    assert len(ratios) == 2 and np.isfinite(ratios).all()
