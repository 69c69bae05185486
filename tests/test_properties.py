"""Property tests (hypothesis): exactness of the measurement and of the history's file format.

* A quadratic loss ½wᵀHw with a random symmetric H and a random diagonal preconditioner P: the
  reported λ_max(P⁻¹H) (and the top k) equal eigvalsh(P^{-1/2}HP^{-1/2}).
* Random training traces: History.save/History.load round-trips every column and event exactly.
* Random byte strings, and valid files with random damage: History.load raises ValueError and
  nothing else.
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import stableopt
from stableopt import SharpnessGroup, SharpnessReport, estimate_sharpness

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def quadratic_problem(draw):
    n = draw(st.integers(1, 7))
    elems = st.floats(-10, 10, allow_nan=False, allow_infinity=False)
    a = np.array(draw(st.lists(elems, min_size=n * n, max_size=n * n)), dtype=np.float64).reshape(n, n)
    H = (a + a.T) / 2
    # keep a spectral scale: an all-zero H has no top eigenvector to speak of
    H += np.diag(draw(st.lists(st.floats(0.1, 5), min_size=n, max_size=n)))
    p = np.array(draw(st.lists(st.floats(1e-2, 1e2), min_size=n, max_size=n)), dtype=np.float64)
    k = draw(st.integers(1, n))
    return H, p, k


@FAST
@given(quadratic_problem(), st.floats(1e-3, 1e3))
def test_preconditioned_sharpness_is_eigvalsh_of_the_symmetrised_operator(problem, tau):
    H, p, k = problem
    n = len(p)
    Ht = torch.from_numpy(H)
    w = torch.nn.Parameter(torch.randn(n, dtype=torch.float64))
    group = SharpnessGroup([w], [torch.from_numpy(p)], threshold=tau)
    rep = estimate_sharpness(lambda: 0.5 * w @ Ht @ w, [group], k=k, tol=1e-10, raw=True)
    d = 1 / np.sqrt(p)
    expected = np.linalg.eigvalsh(d[:, None] * H * d[None, :])[::-1]
    scale = max(1.0, float(np.abs(expected).max()))
    assert abs(rep.preconditioned - expected[0]) <= 1e-8 * scale
    assert np.allclose(rep.eigenvalues, expected[:k], rtol=0, atol=1e-7 * scale)
    assert math.isclose(rep.ratio, rep.preconditioned / tau, rel_tol=1e-12, abs_tol=1e-300)
    raw = np.linalg.eigvalsh(H)[-1]
    assert abs(rep.raw - raw) <= 1e-8 * max(1.0, float(np.abs(np.linalg.eigvalsh(H)).max()))
    assert rep.dtype == "float64"


@FAST
@given(quadratic_problem())
def test_optimizer_sharpness_matches_with_adam_preconditioner(problem):
    """Through stableopt.Adam: P is the optimizer's √v̂ + ε, read back with opt.preconditioner()."""
    H, _, _ = problem
    n = H.shape[0]
    Ht = torch.from_numpy(H)
    w = torch.nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))
    opt = stableopt.Adam([w], lr=1e-2)
    loss_fn = lambda: 0.5 * w @ Ht @ w  # noqa: E731
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    p = opt.preconditioner()[0].detach().numpy()
    rep = opt.sharpness(loss_fn, tol=1e-10)
    d = 1 / np.sqrt(p)
    expected = np.linalg.eigvalsh(d[:, None] * H * d[None, :])[-1]
    assert abs(rep.preconditioned - expected) <= 1e-7 * max(1.0, abs(expected))


# -- history ---------------------------------------------------------------------------------

finite_or_not = st.floats(allow_nan=True, allow_infinity=True, width=64)
# the columns a history checks (stableopt._columns.RULES): wall times, guard factors and ratios
times = st.floats(min_value=0.0, allow_infinity=False, width=64)
factors = st.floats(min_value=0.0, exclude_min=True, allow_infinity=False, width=64)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def trace(draw):
    k = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    rows = draw(st.integers(0, 12))
    reports = []
    for step in sorted(draw(st.lists(st.integers(0, 10**9), min_size=rows, max_size=rows))):
        reports.append(
            SharpnessReport(
                step=step,
                preconditioned=draw(finite_or_not),
                threshold=draw(finite_or_not),
                ratio=draw(finite_or_not),
                raw=draw(st.none() | finite_or_not),
                eigenvalues=tuple(draw(finite_or_not) for _ in range(k)),
                hvps=draw(st.integers(0, 10**6)),
                residual=draw(finite_or_not),
                converged=draw(st.booleans()),
                seconds=draw(times),
                thresholds=tuple(draw(finite_or_not) for _ in range(groups)),
                loss=draw(finite_or_not),
            )
        )
    events = draw(
        st.lists(
            st.tuples(
                st.integers(0, 10**9),
                st.integers(0, groups - 1),
                factors,
                factors,
                finite,
                st.text(max_size=40),
            ),
            max_size=5,
        )
    )
    return reports, sorted(events, key=lambda e: e[0])  # guard events come in step order


def _history_from(reports, events):
    history = stableopt.History()
    for r in reports:
        history.record(None, r)
    for e in events:
        history.append_event(*e)
    return history


@FAST
@given(trace())
def test_history_save_load_is_exact(tr):
    reports, events = tr
    history = _history_from(reports, events)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.safetensors")
        history.save(path)
        loaded = stableopt.History.load(path)
    assert len(loaded) == len(history) == len(reports)
    for table in ("measurements", "secant", "events"):
        a, b = history.to_dict(table), loaded.to_dict(table)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype, key
            # bitwise: NaN payloads and signed zeros included
            assert a[key].tobytes() == b[key].tobytes(), key
    assert [e.as_dict() for e in loaded.events()] == [e.as_dict() for e in history.events()] or all(
        _same_event(x.as_dict(), y.as_dict()) for x, y in zip(loaded.events(), history.events())
    )


def _same_event(a, b):
    return a.keys() == b.keys() and all(
        (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def _load_bytes(data: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.safetensors")
        with open(path, "wb") as fh:
            fh.write(data)
        return stableopt.History.load(path)


@FAST
@given(st.binary(max_size=512))
def test_history_load_of_random_bytes_raises_value_error_only(data):
    with pytest.raises(ValueError):
        _load_bytes(data)


@pytest.fixture(scope="module")
def valid_file_bytes():
    reports = [
        SharpnessReport(
            step=i,
            preconditioned=1.0 + i,
            threshold=2.0,
            ratio=0.5,
            raw=None,
            eigenvalues=(1.0 + i,),
            hvps=3,
            residual=1e-4,
            converged=True,
            seconds=0.1,
            thresholds=(2.0,),
            loss=0.25,
        )
        for i in range(3)
    ]
    history = _history_from(reports, [(1, 0, 1.0, 0.5, 1.2, "ratio above trigger")])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "h.safetensors")
        history.save(path)
        with open(path, "rb") as fh:
            return fh.read()


@FAST
@given(data=st.data())
def test_history_load_of_damaged_files_raises_value_error_only(valid_file_bytes, data):
    blob = bytearray(valid_file_bytes)
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    else:
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(min_size=1, max_size=16))
    try:
        loaded = _load_bytes(bytes(blob))
    except ValueError:
        return
    # damage that left a valid file (e.g. inside a float's bytes) must still load consistently
    assert isinstance(loaded, stableopt.History)
