"""Sharpness under torch.distributed: 2 CPU processes, gloo, a DistributedDataParallel model.

One spawn runs every scenario (process start-up dominates the cost); each rank checks what it
can see and rank 0 checks what needs both ranks' results (gathered with all_gather_object).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import stableopt

WORLD = 2
N_TRAIN = 8  # samples per rank for training (DistributedSampler-like equal shards)
UNEVEN = (5, 9)  # samples per rank for the uneven `batches` measurement


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _train(model, opt, x, y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()


def _fields(report) -> tuple:
    return (
        report.step,
        report.preconditioned,
        report.threshold,
        report.ratio,
        report.raw,
        report.eigenvalues,
        report.hvps,
        report.residual,
        report.converged,
        report.seconds,
        report.loss,
        report.dtype,
    )


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    _scenarios(rank)  # an exception reaches mp.spawn, which shows its traceback in the parent
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an
    # active exception", SIGABRT, about one run in ten here): leave without it once all is done
    os._exit(0)


def _gather(obj):
    out = [None] * WORLD
    dist.all_gather_object(out, obj)
    return out


def _scenarios(rank: int) -> None:
    assert stableopt.distributed.active()
    x_all, y_all = _data(N_TRAIN * WORLD, seed=1)
    x, y = x_all[rank * N_TRAIN : (rank + 1) * N_TRAIN], y_all[rank * N_TRAIN : (rank + 1) * N_TRAIN]

    # --- DDP training with measurements, and a twin that never measures --------------------
    ddp = DDP(_model())
    twin = DDP(_model())
    opt = stableopt.Adam(ddp.parameters(), lr=0.05)
    opt_twin = stableopt.Adam(twin.parameters(), lr=0.05)
    _train(ddp, opt, x, y, 3)
    _train(twin, opt_twin, x, y, 3)

    params0 = [p.detach().clone() for p in ddp.parameters()]
    grads0 = [p.grad.clone() for p in ddp.parameters()]
    loss_fn = lambda: mse(ddp(x), y)  # noqa: E731 - through the DDP wrapper, as users write it
    rep = opt.sharpness(loss_fn, raw=True, k=2, tol=1e-9)
    assert all(torch.equal(a, p) for a, p in zip(params0, ddp.parameters()))
    assert all(torch.equal(a, p.grad) for a, p in zip(grads0, ddp.parameters()))
    assert ddp.require_backward_grad_sync and ddp.require_forward_param_sync

    # Every rank gets the same report, field for field (seconds included).
    reps = _gather(_fields(rep))
    assert reps[0] == reps[1], reps
    # ... and the same warm-start vectors (start vectors agreed).
    warm = _gather({k: v.clone() for k, v in opt.state_dict()["stableopt"]["warm"].items()})
    assert warm[0].keys() == warm[1].keys() and all(torch.equal(warm[0][k], warm[1][k]) for k in warm[0])

    # Training continues bitwise as the twin that never measured (DDP state undisturbed).
    _train(ddp, opt, x, y, 2)
    _train(twin, opt_twin, x, y, 2)
    assert all(torch.equal(a, b) for a, b in zip(ddp.parameters(), twin.parameters()))

    # --- uneven shards with batches: ranks weighted by sample count ------------------------
    lo = sum(UNEVEN[:rank])
    xb_all, yb_all = _data(sum(UNEVEN), seed=2)
    xb, yb = xb_all[lo : lo + UNEVEN[rank]], yb_all[lo : lo + UNEVEN[rank]]
    batches = [(xb[i : i + 3], yb[i : i + 3]) for i in range(0, len(xb), 3)]
    rep_b = opt.sharpness(lambda b: mse(ddp(b[0]), b[1]), batches=batches, raw=True, tol=1e-9)
    reps_b = _gather(_fields(rep_b))
    assert reps_b[0] == reps_b[1]

    # --- the single-process reference on the union of the shards --------------------------
    rep = opt.sharpness(loss_fn, raw=True, k=2, tol=1e-9)  # at the current parameters
    with stableopt.distributed.local():
        assert not stableopt.distributed.active()
        ref_opt = stableopt.Adam(ddp.module.parameters(), lr=0.05)
        ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # the same preconditioner
        x_u, y_u = x_all, y_all  # union of the training shards (equal sizes)
        ref = ref_opt.sharpness(lambda: mse(ddp.module(x_u), y_u), raw=True, k=2, tol=1e-9)
        ref_b = ref_opt.sharpness(lambda: mse(ddp.module(xb_all), yb_all), raw=True, tol=1e-9)
        # a local measurement on one shard differs from the global one
        local = ref_opt.sharpness(loss_fn, raw=True, tol=1e-9)
    assert math.isclose(rep.preconditioned, ref.preconditioned, rel_tol=1e-6)
    assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(rep.eigenvalues, ref.eigenvalues))
    assert math.isclose(rep.raw, ref.raw, rel_tol=1e-6)
    assert math.isclose(rep.loss, ref.loss, rel_tol=1e-9)
    assert math.isclose(rep_b.preconditioned, ref_b.preconditioned, rel_tol=1e-6)
    assert math.isclose(rep_b.raw, ref_b.raw, rel_tol=1e-6)
    assert math.isclose(rep_b.loss, ref_b.loss, rel_tol=1e-9)
    assert not math.isclose(local.preconditioned, ref.preconditioned, rel_tol=1e-3)

    # --- directional sharpness: one all-reduced product, the union's value on every rank ------
    directional = opt.directional_sharpness(loss_fn, "gradient")  # .grad: DDP's averaged gradient
    assert _gather((directional.value, directional.ratio, directional.hvps, directional.seconds))[0] == (
        directional.value,
        directional.ratio,
        1,
        directional.seconds,
    )
    with stableopt.distributed.local():
        directional_ref = ref_opt.directional_sharpness(lambda: mse(ddp.module(x_u), y_u), "gradient")
    assert math.isclose(directional.value, directional_ref.value, rel_tol=1e-9)
    assert math.isclose(directional.ratio, directional_ref.ratio, rel_tol=1e-9)

    # --- ranks that disagree get the same clear error, and stay in step --------------------
    with pytest.raises(RuntimeError, match="ranks disagree on k"):
        opt.sharpness(loss_fn, k=1 + rank)

    def flaky():
        if rank == 1:
            raise ValueError("rank 1's data loader broke")
        return loss_fn()

    err = ValueError if rank == 1 else RuntimeError
    with pytest.raises(err, match="rank 1's data loader broke" if rank == 1 else "loss_fn raised on 1 of 2 ranks"):
        opt.sharpness(flaky)
    assert all(torch.equal(a, b) for a, b in zip(ddp.parameters(), twin.parameters()))

    # --- a rank that fails mid-solve (after the first evaluation): every rank raises after the
    # same product's collective, and the process group stays in step for training -----------
    calls = [0]

    def fails_later():
        calls[0] += 1
        if rank == 1 and calls[0] == 4:
            raise ValueError("rank 1 failed in its 4th loss evaluation")
        return loss_fn()

    for hvp in ("autograd", "fd"):  # (autograd re-evaluates loss_fn per product only with batches)
        calls[0] = 0
        err = ValueError if rank == 1 else RuntimeError
        pattern = "4th loss evaluation" if rank == 1 else "Hessian-vector product failed on 1 of 2 ranks"
        with pytest.raises(err, match=pattern):
            opt.sharpness(lambda batch: fails_later(), batches=[(x, y)], tol=1e-12, hvp=hvp)
    _train(ddp, opt, x, y, 1)
    _train(twin, opt_twin, x, y, 1)
    assert all(torch.equal(a, b) for a, b in zip(ddp.parameters(), twin.parameters()))

    # --- every backend through DDP: the same values, identical on every rank -----------------
    opt._stableopt_warm.clear()
    by_backend = {}
    for hvp in ("autograd", "fd", "forward"):
        r = opt.sharpness(loss_fn, raw=True, k=2, tol=1e-7 if hvp == "fd" else 1e-10, hvp=hvp)  # fd: ~1e-9 rounding
        assert r.hvp_backend == hvp and r.converged
        by_backend[hvp] = _gather(_fields(r))
        assert by_backend[hvp][0] == by_backend[hvp][1]
    for hvp in ("fd", "forward"):
        got, want = by_backend[hvp][0], by_backend["autograd"][0]
        assert all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(got[5], want[5]))  # eigenvalues
        assert math.isclose(got[4], want[4], rel_tol=1e-6)  # raw

    # a NaN loss on one rank is NaN for all: every rank reports NaN (no rank left waiting)
    nan_fn = lambda: loss_fn() * (float("nan") if rank == 0 else 1.0)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rep_nan = opt.sharpness(nan_fn)
    assert math.isnan(rep_nan.preconditioned) and not rep_nan.converged

    # --- monitors and the guard inside DDP training -----------------------------------------
    if hasattr(opt, "monitor"):
        handle = opt.monitor(loss_fn, every=1, raw=True)
        _train(ddp, opt, x, y, 3)
        handle.remove()
        hist = _gather({k: v for k, v in opt.history.to_dict().items() if k not in ("seconds", "elapsed")})
        assert hist[0].keys() == hist[1].keys() and len(hist[0]["step"]) > 3
        for key in hist[0]:
            assert np.array_equal(hist[0][key], hist[1][key], equal_nan=hist[0][key].dtype.kind == "f"), key
    if hasattr(stableopt, "LRGuard"):
        g_model = DDP(_model())
        g_opt = stableopt.Adam(g_model.parameters(), lr=20.0, guard=stableopt.LRGuard(warmup=0))  # ratio ≈ 23
        g_fn = lambda: mse(g_model(x), y)  # noqa: E731
        if hasattr(g_opt, "monitor"):
            g_opt.monitor(g_fn, every=1)
        _train(g_model, g_opt, x, y, 4)
        for _ in range(3):
            g_opt.sharpness(g_fn)
        scales = _gather(
            (
                g_opt.effective_lr(),
                [(e.step, e.new_factor) for e in g_opt.history.events()] if hasattr(g_opt, "history") else None,
            )
        )
        assert scales[0] == scales[1]
        assert scales[0][1], "the guard was expected to act (ratio far above the edge)"
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                _gather([p.detach() for p in g_model.parameters()])[0],
                _gather([p.detach() for p in g_model.parameters()])[1],
            )
        )

    # --- ranks whose warm starts differ (rank 1 lost its vectors): rank 0's start and its
    # cold/warm stopping rule are used everywhere, so the solves stay in step and agree ---------
    if rank == 1:
        opt._stableopt_warm.clear()
    rep_w = opt.sharpness(loss_fn, tol=1e-3)
    reps_w = _gather(_fields(rep_w))
    assert reps_w[0] == reps_w[1] and rep_w.converged

    # --- DDP options that change its reducer: measuring between steps stays transparent ---------
    for options in (dict(find_unused_parameters=True), dict(static_graph=True), dict(gradient_as_bucket_view=True)):
        a, b = DDP(_model(), **options), DDP(_model(), **options)
        oa, ob = stableopt.Adam(a.parameters(), lr=0.05), stableopt.Adam(b.parameters(), lr=0.05)
        for _ in range(3):
            _train(a, oa, x, y, 1)
            _train(b, ob, x, y, 1)
            r = oa.sharpness(lambda a=a: mse(a(x), y), tol=1e-6)
            assert r.converged and math.isfinite(r.ratio), options
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), options


def _free_init_file() -> str:
    fd, path = tempfile.mkstemp(prefix="stableopt-dist-")
    os.close(fd)
    os.unlink(path)  # FileStore wants a path that does not exist yet (or is empty)
    return path


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_processes_match_single_process_on_the_union():
    init_file = _free_init_file()
    try:
        mp.spawn(_worker, args=(init_file,), nprocs=WORLD, join=True)
    finally:
        if os.path.exists(init_file):
            os.unlink(init_file)


def test_not_active_without_a_process_group():
    assert not stableopt.distributed.active()
    stableopt.distributed.configure(enabled=False)
    try:
        assert not stableopt.distributed.active()
    finally:
        stableopt.distributed.configure(enabled=True)
    with pytest.raises(TypeError, match="enabled must be a bool, got str"):
        stableopt.distributed.configure(enabled="yes")
