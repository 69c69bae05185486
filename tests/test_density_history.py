"""Spectral densities in the history: recorded by ``opt.spectral_density``, returned exactly by
``history.densities()`` through files and checkpoints, refused when inconsistent, shown by the
report and drawn by ``plot_history`` / ``stableopt report --plot`` from the recorded nodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_density import _state
from test_sharpness import _setup
from torch import nn

import stableopt
from stableopt.cli import main
from stableopt.history import History


def _same(a, b):
    """Reports equal field by field, NaN equal to NaN (repr shows every float exactly)."""
    return repr(a) == repr(b)


def _two_densities():
    """Adam (one group) with a density of P⁻¹H and, 3 steps later, one of H."""
    loss_fn, opt, eig, _ = _state(two=False)
    first = opt.spectral_density(loss_fn, probes=3, iters=7)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    second = opt.spectral_density(loss_fn, probes=2, iters=9, preconditioned=False, seed=5)
    return opt, loss_fn, eig, first, second


def test_each_density_is_recorded_and_returned_exactly():
    opt, _, _, first, second = _two_densities()
    assert _same(opt.history.densities(), [first, second])  # every field, nodes and weights bit for bit
    runs, nodes = opt.history.to_dict("density"), opt.history.to_dict("density_nodes")
    assert runs["density_step"].tolist() == [5, 8] and runs["density_preconditioned"].tolist() == [True, False]
    assert len(nodes["node"]) == 3 * 7 + 2 * 9  # one row per Ritz node (no probe exhausted its space)
    assert nodes["node_density"].tolist() == [0] * 21 + [1] * 18
    assert np.array_equal(nodes["node"][:7], first.nodes[0]) and np.array_equal(
        nodes["node_weight"][21:30], second.weights[0]
    )


def test_the_recorded_threshold_is_the_common_tau_or_nan():
    loss_fn, opt, _, _ = _state(two=False)  # Adam, β1 = 0.9, η = 1e-2: τ = (2 + 2β1)/((1 − β1)η)
    rep = opt.spectral_density(loss_fn, probes=1, iters=3)
    assert rep.threshold == pytest.approx((2 + 2 * 0.9) / ((1 - 0.9) * 1e-2), rel=1e-12)
    assert math.isnan(opt.spectral_density(loss_fn, probes=1, iters=3, preconditioned=False).threshold)
    *_, sgd = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1, momentum=0.5), False)
    heavy_ball = sgd.spectral_density(_state_loss(sgd), probes=1, iters=3)
    assert heavy_ball.threshold == pytest.approx((2 + 2 * 0.5) / 0.1, rel=1e-12)  # (2 + 2μ)/η
    assert [d.threshold for d in opt.history.densities()][0] == rep.threshold


def _state_loss(opt):
    """A loss of the optimizer's parameters (any will do to read the threshold)."""
    return lambda: sum((p.double() ** 2).sum() for g in opt.param_groups for p in g["params"])


def test_the_density_of_groups_with_different_thresholds_has_none():
    model, x, loss_of, loss_fn, opt = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1), True)
    taus = opt.stability_threshold()
    assert taus[0] != taus[1]  # the second group's lr is 3×
    rep = opt.spectral_density(loss_fn, probes=1, iters=3)
    assert math.isnan(rep.threshold) and "threshold" not in str(rep)
    assert math.isnan(opt.history.column("density_threshold")[0])


def test_densities_survive_files_and_checkpoints(tmp_path):
    opt, loss_fn, _, first, second = _two_densities()
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    assert _same(History.load(path).densities(), [first, second])
    fresh = stableopt.Adam(opt.param_groups[0]["params"], lr=1e-2, weight_decay=0.1)
    fresh.load_state_dict(opt.state_dict())
    assert _same(fresh.history.densities(), [first, second])
    third = fresh.spectral_density(loss_fn, probes=1, iters=4)  # continues after the loaded ones
    assert _same(fresh.history.densities(), [first, second, third])
    assert fresh.history.column("node_density").tolist()[-4:] == [2] * 4


def test_a_non_finite_density_is_recorded_without_nodes(tmp_path):
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    opt = stableopt.SGD([w], lr=0.1)
    with pytest.warns(RuntimeWarning, match="not finite"):
        rep = opt.spectral_density(lambda: (w**2).sum() * float("nan"), probes=2, iters=3)
    assert rep.nodes == () and _same(opt.history.densities(), [rep])
    opt.history.save(tmp_path / "nan.safetensors")
    loaded = History.load(tmp_path / "nan.safetensors")
    assert _same(loaded.densities(), [rep]) and len(loaded.column("node")) == 0
    with pytest.raises(ValueError, match="no measurements"):
        stableopt.plot_history(loaded, tmp_path / "nan.png")  # nothing to draw: a clear error


def _density(step, nodes, weights, probes=None, iters=5, **kw):
    return stableopt.DensityReport(
        step, nodes, weights, len(nodes) if probes is None else probes, iters, iters * len(nodes), size=4, **kw
    )


@pytest.mark.parametrize(
    "report,problem",
    [
        (_density(3, ((1.0, 2.0),), ((0.5, 0.4),)), "sum to 0.9"),
        (_density(3, ((1.0, 2.0),), ((1.0,),)), "nodes and weights differ in shape"),
        (_density(3, ((1.0, math.inf),), ((0.5, 0.5),)), "'node' holds NaN or infinite"),
        (_density(3, ((1.0, 2.0),), ((1.5, -0.5),)), "'node_weight' holds values outside"),
        (_density(3, ((1.0,), (2.0,)), ((1.0,), (1.0,)), probes=1), "names probe 1 of density 0"),
        (_density(3, ((1.0, 2.0, 3.0),), ((0.2, 0.3, 0.5),), iters=2), "3 nodes on one probe"),
        (_density(1, ((1.0,),), ((1.0,),)), "went back from 2"),
        (_density(3, ((1.0,),), ((1.0,),), threshold=-math.inf), "'density_threshold' holds values outside"),
    ],
    ids=["weights-sum", "ragged", "inf-node", "negative-weight", "probe-count", "over-iters", "step-back", "threshold"],
)
def test_a_bad_density_is_refused_and_records_nothing(report, problem):
    h = History()
    good = _density(2, ((1.0, 2.0),), ((0.25, 0.75),), threshold=4.0)
    h.append_density(good)
    with pytest.raises(ValueError, match="cannot record this density") as info:
        h.append_density(report)
    assert problem in str(info.value)
    assert _same(h.densities(), [good]) and len(h.column("node")) == 2  # all or nothing


def test_the_report_row_shows_the_latest_density():
    from rich.console import Console

    opt, _, _, first, second = _two_densities()
    console = Console(width=200, record=True, color_system=None)
    console.print(stableopt.render_report(opt.history))
    text = console.export_text()
    lo, hi = second.support
    assert "spectral density" in text and f"step {second.step}" in text and "eigenvalues of H in" in text
    assert "2 densities recorded" in text and f"{first.hvps + second.hvps:,} HVPs" in text
    only = History()
    only.append_density(first)  # no sharpness measurement: the panel still shows the density
    console = Console(width=200, record=True, color_system=None)
    console.print(stableopt.render_report(only))
    text = console.export_text()
    assert (
        "No measurements yet" in text and "top node / τ" in text and f"{first.support[1] / first.threshold:.3f}" in text
    )


def _density_axis(fig):
    axes = [a for a in fig.axes if a.get_xlabel().startswith("eigenvalue of")]
    assert len(axes) == 1
    return axes[0]


def _curves(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "-"]


def test_plot_history_draws_the_recorded_densities(tmp_path):
    pytest.importorskip("matplotlib")
    opt, loss_fn, eig, first, _ = _two_densities()
    opt.sharpness(loss_fn)
    third = opt.spectral_density(loss_fn, probes=2, iters=6)
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    fig = stableopt.plot_history(History.load(path), tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 1000
    ax = _density_axis(fig)
    assert len(fig.axes) == 3  # sharpness, loss (no raw measured) and the density panel
    # the densities of P⁻¹H (the one of H has another axis), each as its nodes and weights give
    # it, with one σ: 1/100 of their common node range, on a log axis floored 8 decades down
    drawn = (first, third)
    assert [line.get_label() for line in _curves(ax)] == [f"step {d.step}" for d in drawn]
    sigma = (max(d.support[1] for d in drawn) - min(d.support[0] for d in drawn)) / 100
    xs = [np.asarray(line.get_xdata()) for line in _curves(ax)]
    floor = max(float(d.density(x, sigma).max()) for d, x in zip(drawn, xs)) * 1e-8
    for line, d, x in zip(_curves(ax), drawn, xs):
        assert np.allclose(line.get_ydata(), np.maximum(d.density(x, sigma), floor), rtol=1e-12, atol=0)
        assert x.min() < d.support[0] and x.max() > d.support[1]
    thresholds = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert thresholds == [first.threshold]


def test_plot_history_of_densities_only_has_one_panel(tmp_path):
    pytest.importorskip("matplotlib")
    h = History()
    reports = [_density(s, ((s, 2.0 * s),), ((0.5, 0.5),), threshold=10.0) for s in range(1, 8)]
    for rep in reports:
        h.append_density(rep)
    fig = stableopt.plot_history(h, tmp_path / "d.png")
    ax = _density_axis(fig)
    assert len(fig.axes) == 1
    labels = [line.get_label() for line in _curves(ax)]
    assert labels == ["step 1", "step 3", "step 5", "step 7"]  # four, spread, the latest included


def test_stableopt_report_plots_a_saved_density(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    opt, _, _, first, second = _two_densities()
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    assert main(["report", str(path), "--plot", str(tmp_path / "out.png")]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "spectral density" in out and "wrote" in out
    assert (tmp_path / "out.png").stat().st_size > 1000
