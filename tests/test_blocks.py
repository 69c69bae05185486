"""Per-block sharpness (stableopt.blocks, CurvatureOperator.restrict) against eigvalsh of each
dense float64 diagonal block of P^{-1/2}·H·P^{-1/2}; names, warm starts, history and report."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import dense_hessian
from rich.console import Console
from test_sharpness import Bound, _equal, _noisy_model, _setup, _snapshot, mse
from torch import nn

import stableopt
from stableopt.blocks import MAX_STEM, column_stems
from stableopt.report_estimators import latest_blocks


def _dense(model, x, loss_of, opt):
    """(flat H_eff, P, τ per coordinate, offsets of each parameter in the flat vector)."""
    H = dense_hessian(Bound(model, x), loss_of)
    groups = opt.param_groups
    sign = -1.0 if groups[0].get("maximize", False) else 1.0
    lam = torch.cat(
        [
            torch.full((p.numel(),), opt.stability_rule.coupled_weight_decay(g), dtype=torch.float64)
            for g in groups
            for p in g["params"]
        ]
    )
    P = torch.cat([P.reshape(-1).double() for P in opt.preconditioner()])
    tau = torch.cat(
        [
            torch.full((p.numel(),), t, dtype=torch.float64)
            for g, t in zip(groups, opt.stability_threshold())
            for p in g["params"]
        ]
    )
    params = [p for g in groups for p in g["params"]]
    offsets, at = {}, 0
    for p in params:
        offsets[id(p)] = (at, at + p.numel())
        at += p.numel()
    return sign * H + torch.diag(lam), P, tau, offsets


def _block_reference(H, P, tau, offsets, params):
    idx = torch.cat([torch.arange(*offsets[id(p)]) for p in params])
    Hb, Pb, tb = H[idx][:, idx], P[idx], tau[idx]
    d = Pb.rsqrt()
    lam = torch.linalg.eigvalsh(d[:, None] * Hb * d[None, :])[-1]
    d = (tb * Pb).rsqrt()
    ratio = torch.linalg.eigvalsh(d[:, None] * Hb * d[None, :])[-1]
    return float(lam), float(ratio)


CONFIGS = [
    ("Adam", nn.Tanh, "ce", dict(lr=1e-2, weight_decay=0.1), True),
    ("AdamW", nn.ReLU, "mse", dict(lr=1e-2, weight_decay=0.5), True),
    ("RMSprop", nn.Tanh, "mse", dict(lr=1e-3, momentum=0.5, weight_decay=0.05), False),
    ("SGD", nn.Tanh, "mse", dict(lr=0.1, maximize=True), False),
]


@pytest.mark.parametrize("name,act,loss,kw,two", CONFIGS, ids=[c[0] + ("-2groups" if c[4] else "") for c in CONFIGS])
def test_each_block_lmax_and_ratio_equal_eigvalsh_of_its_dense_diagonal_block(name, act, loss, kw, two):
    model, x, loss_of, loss_fn, opt = _setup(name, act, loss, torch.float64, kw, two)
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    lin = [m for m in model if isinstance(m, nn.Linear)]
    mixed = [lin[0].bias, lin[1].weight]  # across the two groups when there are two (thresholds differ)
    specs = {
        "module": {"0": list(lin[0].parameters()), "2": list(lin[1].parameters())},
        "group": {f"group{g}": list(group["params"]) for g, group in enumerate(opt.param_groups)},
        "dict": {"mixed": mixed, "weight0": [lin[0].weight]},
    }
    for spec, expected in specs.items():
        rep = opt.sharpness(loss_fn, blocks=expected if spec == "dict" else spec, tol=1e-8, max_iters=80)
        assert list(rep.blocks) == list(expected), spec
        for block_name, params in expected.items():
            lam, ratio = _block_reference(H, P, tau, offsets, params)
            got = rep.blocks[block_name]
            assert got.preconditioned == pytest.approx(lam, rel=1e-7), (spec, block_name)
            assert got.ratio == pytest.approx(ratio, rel=1e-7), (spec, block_name)
            assert got.size == sum(p.numel() for p in params) and got.hvps >= 1
            assert got.preconditioned <= rep.preconditioned * (1 + 1e-8)  # Cauchy interlacing
    if two:  # the mixed block spans groups with different thresholds: its ratio needs its own solve
        assert rep.blocks["mixed"].threshold != rep.blocks["mixed"].threshold  # NaN


def test_restrict_is_the_dense_principal_submatrix_and_counts_one_product():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    H, P, tau, offsets = _dense(model, x, loss_of, opt)
    d = P.rsqrt()
    A = d[:, None] * H * d[None, :]
    params = list(model.parameters())
    with opt.measure(loss_fn) as m:
        op = m.operator("preconditioned")
        block = op.restrict([1, 3])
        idx = torch.cat([torch.arange(*offsets[id(params[i])]) for i in (1, 3)])
        v = block.random(torch.Generator().manual_seed(0))
        before = m.products
        assert torch.allclose(block.matvec(v), A[idx][:, idx] @ v, rtol=1e-10, atol=1e-12)
        assert m.products == before + 1 and block.size == block.local_size == idx.numel()
        assert float(block.dot(v, v)) == pytest.approx(float(v @ v))
        with pytest.raises(ValueError, match="distinct positions"):
            op.restrict([0, 0])
        with pytest.raises(ValueError, match="distinct positions"):
            op.restrict([len(params)])


def test_module_blocks_are_named_from_the_model_and_hooks_find_the_same():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    by_hook = opt.sharpness(loss_fn, blocks="module", tol=1e-8)
    by_model = opt.sharpness(loss_fn, blocks=model, tol=1e-8)
    assert list(by_hook.blocks) == list(by_model.blocks) == ["0", "2"]  # Linear, Tanh, Linear
    for name in by_hook.blocks:
        assert by_hook.blocks[name].preconditioned == pytest.approx(by_model.blocks[name].preconditioned, rel=1e-6)
    # the forward pre-hook is gone: another forward does not record anything
    assert not torch.nn.modules.module._global_forward_pre_hooks or all(
        "ModuleWatcher" not in repr(h) for h in torch.nn.modules.module._global_forward_pre_hooks.values()
    )


def test_parameters_outside_modules_form_the_block_other():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    scale = nn.Parameter(torch.tensor([1.5, 0.5], dtype=torch.float64))
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    loss_fn = lambda: mse(lin(x) * scale, y)
    opt = stableopt.SGD([*lin.parameters(), scale], lr=0.1)
    rep = opt.sharpness(loss_fn, blocks="module", tol=1e-10)
    assert list(rep.blocks) == ["Linear", "other"] and rep.blocks["other"].size == 2


def test_blocks_warm_start_from_their_own_vectors():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "ce", torch.float64, dict(lr=1e-2), True)
    first = opt.sharpness(loss_fn, blocks="module")
    assert {"block:0", "block:2"} <= set(opt.warm_starts)
    second = opt.sharpness(loss_fn, blocks="module")  # same state: warm starts at the answer
    for name in first.blocks:
        assert second.blocks[name].hvps < first.blocks[name].hvps
        assert second.blocks[name].preconditioned == pytest.approx(first.blocks[name].preconditioned, rel=1e-3)


def test_block_columns_reach_the_history_file_and_the_report_sorted_by_ratio(tmp_path):
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), True)
    rep = opt.sharpness(loss_fn, blocks="module", tol=1e-8)
    opt.sharpness(loss_fn)  # a later measurement without blocks: the table shows the latest blocks
    path = tmp_path / "h.safetensors"
    opt.history.save(path)
    loaded = stableopt.History.load(path)
    for h in (opt.history, loaded):
        assert (
            h.column("block_0_ratio")[0] == rep.blocks["0"].ratio
            and h.column("block_2_lmax")[0] == rep.blocks["2"].preconditioned
        )
        step, rows = latest_blocks(h)
        assert step == rep.step and [r[0] for r in rows] == sorted(rep.blocks, key=lambda n: -rep.blocks[n].ratio)
    console = Console(record=True, width=120)
    console.print(stableopt.render_report(loaded))
    text = console.export_text()
    assert "per block" in text and "2 blocks by ratio" in text


HOSTILE = ["[blink red]x[/]", "\x1b[2J\x1b]0;t\x07", "a" * 300, "layer.0", "layer_0", "", "???"]


def test_column_stems_are_safe_bounded_and_distinct():
    stems = column_stems(HOSTILE)
    assert len(set(stems.values())) == len(HOSTILE)
    for stem in stems.values():
        assert re.fullmatch(rf"[A-Za-z0-9_]{{1,{MAX_STEM}}}", stem)
        assert stableopt.history.BLOCK_COLUMN.match(f"block_{stem}_ratio")


def test_hostile_block_names_are_measured_and_recorded_safely(tmp_path):
    model, x, loss_of, loss_fn, opt = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1), False)
    params = list(model.parameters())
    rep = opt.sharpness(loss_fn, blocks={HOSTILE[0]: params[:2], HOSTILE[1]: params[2:]})
    assert set(rep.blocks) == set(HOSTILE[:2])
    opt.history.save(tmp_path / "h.safetensors")
    names = stableopt.History.load(tmp_path / "h.safetensors").columns()
    assert all(re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names)


BAD = [
    ("layer", ValueError, "blocks must be 'module', 'group'"),
    (3, TypeError, "blocks must be"),
    ({}, ValueError, "empty dict"),
    ({"a": []}, TypeError, "non-empty list of parameters"),
    ({"a": [1.0]}, TypeError, "non-empty list of parameters"),
    ({"": None}, TypeError, "non-empty strings"),
]


@pytest.mark.parametrize("blocks,exc,match", BAD, ids=[repr(b[0])[:20] for b in BAD])
def test_bad_blocks_raise_before_measuring(blocks, exc, match):
    model, x, loss_of, loss_fn, opt = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1), False)
    with pytest.raises(exc, match=match):
        opt.sharpness(loss_fn, blocks=blocks)
    assert opt.measurements_taken == 0 and len(opt.history) == 0


def test_a_block_of_parameters_the_optimizer_does_not_measure_is_an_error():
    model, x, loss_of, loss_fn, opt = _setup("SGD", nn.Tanh, "mse", torch.float64, dict(lr=0.1), False)
    other = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="block 'stray' has no parameter that this measurement measures"):
        opt.sharpness(loss_fn, blocks={"stray": [other]})


def noisy_adam():
    """Adam one step into training a model with BatchNorm and Dropout, a gradient left in .grad
    (the state every side-effect test measures)."""
    model = _noisy_model()
    xx, yy = torch.randn(32, 6), torch.randn(32, 2)
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda: mse(model(xx), yy)
    loss_fn().backward()
    opt.step()
    loss_fn().backward()
    return model, opt, loss_fn


def test_block_measurement_leaves_params_grads_state_rng_and_buffers_untouched():
    model, opt, loss_fn = noisy_adam()
    before = _snapshot(model, opt)
    rep = opt.sharpness(loss_fn, blocks="module")
    assert _equal(before, _snapshot(model, opt))
    assert list(rep.blocks) == ["0", "1", "4"]  # Linear, BatchNorm1d, Linear (Tanh, Dropout own none)
