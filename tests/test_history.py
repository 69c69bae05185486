"""History: columns, exact safetensors round trips, and the bad-file table."""

from __future__ import annotations

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

import stableopt
from stableopt.history import FORMAT, MAX_REASON_CHARS, SCHEMA_VERSION, History


def _trained_history(steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    loss_fn = lambda: ((model(x) - y) ** 2).mean()
    opt = stableopt.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02}],
        lr=0.01,
        betas=(0.8, 0.99),
        weight_decay=0.1,
    )
    opt.monitor(loss_fn, every=2, secant=True)
    opt.monitor(loss_fn, every=3, raw=True, k=3)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    opt.history.append_event(4, 1, 1.0, 0.5, 1.234, "ratio 1.234 > 1.2 — halve the lr ✓")
    opt.history.append_event(6, 0, 0.5, 0.75, 0.8, "")
    return opt


def test_columns_and_accessors():
    opt = _trained_history()
    h = opt.history
    assert len(h) == 5  # steps 2, 3, 4, 6, 6
    cols = h.to_dict()
    assert {len(v) for v in cols.values()} == {5}  # pandas-friendly: one length
    for name in (
        "step",
        "loss",
        "preconditioned",
        "raw",
        "threshold",
        "ratio",
        "hvps",
        "seconds",
        "converged",
        "lr_0",
        "lr_1",
        "threshold_0",
        "threshold_1",
        "eig_0",
        "eig_1",
        "eig_2",
        "elapsed",
        "monitor",
    ):
        assert name in cols
    assert cols["step"].dtype == np.int64 and cols["converged"].dtype == np.bool_ and cols["ratio"].dtype == np.float64
    assert cols["lr_1"].tolist() == [0.02] * 5
    assert np.array_equal(cols["eig_0"], cols["preconditioned"])
    assert h.columns()[: len(stableopt.history.MEASUREMENT_COLUMNS)] == list(stableopt.history.MEASUREMENT_COLUMNS)
    cols["ratio"][:] = 0  # accessors return copies
    assert h.column("ratio")[0] != 0
    assert h.last()["step"] == 6 and list(h.rows())[0]["step"] == 2
    events = h.events()
    assert [e.step for e in events] == [4, 6] and events[0]["reason"].endswith("✓") and events[0].new_factor == 0.5
    assert len(h.secant()["secant"]) == 5 and h["secant_step"].tolist() == [1, 2, 3, 4, 5]
    with pytest.raises(KeyError, match="no column 'nope'"):
        h.column("nope")


def test_new_group_columns_are_backfilled_and_reasons_bounded():
    w = nn.Parameter(torch.ones(2))
    opt = stableopt.SGD([w], lr=0.1)
    loss_fn = lambda: (w**2).sum() + (v**2).sum()
    v = nn.Parameter(torch.ones(3))
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    opt.sharpness(loss_fn)
    opt.add_param_group({"params": [v], "lr": 0.05})
    opt.sharpness(loss_fn)
    lr1 = opt.history.column("lr_1")
    assert math.isnan(lr1[0]) and lr1[1] == 0.05
    opt.history.append_event(1, 0, 1, 1, 1, "x" * 10_000)
    assert len(opt.history.events()[0].reason) == MAX_REASON_CHARS


def test_save_load_round_trip_is_exact(tmp_path):
    opt = _trained_history()
    h = opt.history
    path = tmp_path / "run.safetensors"
    h.save(path)
    loaded = History.load(path)
    for table in ("measurements", "secant", "events", "tracking"):
        assert loaded.columns(table) == h.columns(table)
        for name in h.columns(table):
            a, b = h.column(name), loaded.column(name)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name  # bit for bit, NaN included
    assert loaded.events() == h.events()
    meta = loaded.metadata
    assert meta["format"] == FORMAT and meta["schema"] == str(SCHEMA_VERSION)
    assert meta["optimizer"] == "AdamW" and meta["stableopt_version"] == stableopt.__version__
    assert meta["torch_version"] == torch.__version__
    groups = json.loads(meta["hyperparameters"])
    assert [g["lr"] for g in groups] == [0.01, 0.02] and groups[0]["betas"] == [0.8, 0.99]
    # one contiguous 1-D tensor per column
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == {n for t in ("measurements", "secant", "events") for n in h.columns(t)}
        assert all(f.get_tensor(k).ndim == 1 for k in f.keys())
    # a loaded history saves again to the same content
    again = tmp_path / "again.safetensors"
    loaded.save(again)
    assert History.load(again).to_dict().keys() == loaded.to_dict().keys()
    assert History.load(again).metadata["optimizer"] == "AdamW"


def test_empty_history_round_trip(tmp_path):
    h = History()
    h.save(tmp_path / "empty.safetensors")
    loaded = History.load(tmp_path / "empty.safetensors")
    assert len(loaded) == 0 and loaded.events() == []


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.sentinel}",))


def _bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    _trained_history(3).history.save(good)
    data = good.read_bytes()
    from safetensors import safe_open

    with safe_open(str(good), framework="np") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()

    def write(name, content):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    def safetensors_file(name, tensors, metadata):
        p = tmp_path / name
        save_file(tensors, str(p), metadata=metadata)
        return p

    newer = dict(meta, schema=str(SCHEMA_VERSION + 1))
    _Evil.sentinel = tmp_path / "pwned"
    return [
        (tmp_path / "missing.safetensors", "no such file"),
        (tmp_path, "is a directory"),
        (write("empty.safetensors", b""), "empty file"),
        (write("random.safetensors", os.urandom(4096)), "not a readable safetensors file"),
        (write("zeros.safetensors", b"\0" * 64), "not a readable safetensors file"),
        (write("truncated.safetensors", data[: len(data) // 2]), "not a readable safetensors file"),
        (write("header-only.safetensors", data[:8]), "not a readable safetensors file"),
        (write("pickle.safetensors", pickle.dumps(_Evil())), "not a readable safetensors file"),
        (
            safetensors_file("foreign.safetensors", {"weight": np.ones((2, 3), np.float32)}, None),
            "not a stableopt history",
        ),
        (
            safetensors_file("foreign-meta.safetensors", {"weight": np.ones(3)}, {"format": "pt"}),
            "not a stableopt history",
        ),
        (safetensors_file("newer.safetensors", tensors, newer), f"schema {SCHEMA_VERSION + 1}, newer"),
        (safetensors_file("noschema.safetensors", tensors, {**meta, "schema": "one"}), "without a valid schema"),
        (safetensors_file("2d.safetensors", {**tensors, "loss": np.ones((3, 1))}, meta), "expected a 1-D tensor"),
        (safetensors_file("dtype.safetensors", {**tensors, "step": np.ones(3, np.float32)}, meta), "dtype float32"),
        (safetensors_file("ragged.safetensors", {**tensors, "ratio": np.ones(7)}, meta), "rows"),
        (
            safetensors_file("missing-col.safetensors", {k: v for k, v in tensors.items() if k != "ratio"}, meta),
            "without the column",
        ),
        (safetensors_file("unknown-col.safetensors", {**tensors, "weights": np.ones(3)}, meta), "unknown column"),
        (safetensors_file("reasons.safetensors", tensors, dict(meta, event_reasons="[1, 2]")), "event_reasons"),
    ]


def test_bad_files_raise_value_error_naming_file_and_problem(tmp_path):
    for path, problem in _bad_files(tmp_path):
        with pytest.raises(ValueError) as info:
            History.load(path)
        message = str(info.value)
        assert message.startswith(str(path)), message
        assert problem in message, (path.name, message)
        assert "\n" not in message
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled


def test_state_dict_is_weights_only_loadable():
    opt = _trained_history(4)
    import io

    buffer = io.BytesIO()
    torch.save(opt.history.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    h = History()
    h.load_state_dict(state)
    assert h.to_dict().keys() == opt.history.to_dict().keys()
    assert h.column("ratio").tobytes() == opt.history.column("ratio").tobytes()
    assert h.events() == opt.history.events()
    with pytest.raises(ValueError, match="newer"):
        h.load_state_dict({**state, "schema": SCHEMA_VERSION + 1})
