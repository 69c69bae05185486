"""The docs/science.md digits setting reproduces the Adaptive Edge of Stability with stableopt's code."""

from __future__ import annotations

import pytest

from stableopt.demo import run_demo

pytest.importorskip("sklearn", reason="the reference figures are on scikit-learn's digits")


def test_adam_on_digits_hovers_at_the_edge_from_step_800_to_1500():
    early, late = {}, []
    for row in run_demo(steps=1500, every=50, raw=False):
        assert row.report.converged
        if row.step in (100, 400):
            early[row.step] = row.report.ratio
        if row.step >= 800:
            late.append(row.report.ratio)
    # progressive sharpening first (docs/science.md: 0.19 at step 100, 0.98 at step 400) ...
    assert early[100] < 0.3 and early[400] > 0.9
    # ... then λ_max(P⁻¹H)·η/38 within 10% of 1 over steps 800–1500
    assert len(late) == 15
    assert all(0.9 <= r <= 1.1 for r in late), late
