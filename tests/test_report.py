"""The rich report, the terminal chart and the Figure-1-style plot."""

from __future__ import annotations

import io
import math
import sys

import pytest
import torch
from rich.console import Console

import stableopt
from stableopt.history import History
from stableopt.report import render_report, sparkline, terminal_chart, trend
from stableopt.sharpness import SharpnessReport


class _FakeOptimizer:
    param_groups = [{"params": [], "lr": 1e-3}, {"params": [], "lr": 2e-3}]

    def effective_lr(self):
        return [1e-3, 2e-3]


def _report(step, ratio, raw=None, seconds=0.5, hvps=12, k=1):
    tau = 38_000.0
    pre = ratio * tau
    return SharpnessReport(
        step=step,
        preconditioned=pre,
        threshold=tau,
        ratio=ratio,
        raw=raw,
        eigenvalues=tuple(pre * (1 - 0.01 * i) for i in range(k)),
        hvps=hvps,
        residual=1e-4,
        converged=True,
        seconds=seconds,
        thresholds=(tau, tau / 2),
        loss=0.25 / step,
    )


def _history(ratios=(0.5, 0.8, 0.95, 1.015), raws=(10.0, 12.0, 15.0, 19.93)):
    h = History()
    fake = _FakeOptimizer()
    for i, (ratio, raw) in enumerate(zip(ratios, raws)):
        h.source = 0
        h.record(fake, _report(100 * (i + 1), ratio, raw, k=2))
    h.source = -1
    h.record(fake, _report(500, 1.015, None))
    h.append_event(300, 1, 1.0, 0.5, 1.25, "ratio above 1.2")
    return h


def _render(renderable, width=110):
    console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system="truecolor", record=True)
    console.print(renderable)
    return console.export_text(), console


def test_report_shows_the_expected_numbers():
    text, _ = _render(render_report(_history()))
    assert "λ_max(P⁻¹H)" in text and "38,570" in text  # 1.015 × 38,000
    assert "threshold 38,000" in text and "1.015" in text and "at the edge" in text
    assert "0.001" in text and "0.002" in text and "19,000" in text  # per-group lr and τ
    assert "19.93" in text and "↑ +99.3% since step 100" in text  # raw sharpness and its trend
    assert "60 HVPs" in text and "2.50 s" in text and "4 scheduled, 1 manual" in text
    assert "step 300 group 1: lr ×1 → ×0.5 at ratio 1.250 (ratio above 1.2)" in text
    assert "5 measurements" in text and "ratio history" in text


@pytest.mark.parametrize(
    "ratio, words, colour",
    [(0.5, "below the edge", "\x1b[32m"), (1.0, "at the edge", "\x1b[33m"), (1.5, "above the edge", "\x1b[1;31m")],
)
def test_ratio_is_coloured_by_zone(ratio, words, colour):
    h = History()
    h.record(_FakeOptimizer(), _report(10, ratio))
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard")
    console.print(render_report(h))
    out = console.file.getvalue()
    assert f"{colour}{ratio:.3f}" in out and words in out


def test_empty_and_nan_histories_render():
    text, _ = _render(render_report(History()))
    assert "No measurements yet" in text
    h = History()
    h.record(_FakeOptimizer(), _report(3, math.nan))
    text, _ = _render(render_report(h))
    assert "not measured (NaN)" in text


def test_sparkline_trend_and_chart():
    assert sparkline([0.0, 0.5, 1.0]).plain == "▁▅█"
    assert sparkline([1.0, math.nan, 2.0], top=2.0).plain == "▅ █"
    assert len(sparkline(range(1000), width=40).plain) == 40
    import numpy as np

    assert trend(np.array([1, 2, 3]), np.array([2.0, math.nan, 3.0]))[0] == "↑"
    assert trend(np.array([1]), np.array([2.0])) is None
    text, _ = _render(terminal_chart(_history()), width=100)
    assert "the edge, ratio 1" in text and "raw sharpness λ_max(H)" in text and "step 500" in text
    assert "╭" in text and "╌" in text


def test_opt_report_prints_the_panel():
    w = torch.nn.Parameter(torch.tensor([1.0, -1.0]))
    opt = stableopt.SGD([w], lr=0.5)
    loss_fn = lambda: (w**2).sum()
    loss_fn().backward()
    opt.step()
    opt.sharpness(loss_fn, raw=True)
    out = io.StringIO()
    opt.report(console=Console(file=out, width=100))
    text = out.getvalue()
    assert "stableopt · SGD" in text and "0.500" in text and "at the edge" not in text  # ratio 2/4
    assert "\x1b" not in text  # no terminal, no control codes


def test_plot_writes_a_readable_png(tmp_path):
    mpimg = pytest.importorskip("matplotlib.image")
    h = _history()
    h.append_secant(150, 20_000.0, 0.53)
    path = tmp_path / "figure.png"
    fig = stableopt.plot_history(h, path, title="test")
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.05  # not blank
    assert len(fig.axes) == 3
    with pytest.raises(ValueError, match="no measurements"):
        stableopt.plot_history(History(), tmp_path / "empty.png")


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install"):
        stableopt.plot_history(_history(), tmp_path / "x.png")
