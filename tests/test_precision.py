"""Mixed precision (bf16/fp16 parameters, autocast) and stateful layers (BatchNorm, dropout).

Semantics under test (docs in README "Distributed and mixed precision"):
* half-precision parameters are measured in float32 (report.dtype == "float32") and left bitwise
  as they were; autocast is off inside the measurement; a dtype clash outside modules raises a
  RuntimeError that says why instead of measuring in half precision;
* the measurement uses the model's current mode: train-mode BatchNorm normalises with batch
  statistics, eval mode with the running ones; train-mode dropout uses one mask (the one the
  RNG would draw next) for every Hessian-vector product; buffers and RNG streams are restored.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stableopt


def _mlp(dtype, *extra: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), *extra, nn.Tanh(), nn.Linear(8, 2)).to(dtype)


def _functional_hessian(model: nn.Module, loss_of_out, x, rng_state=None) -> torch.Tensor:
    """Dense float64 Hessian of loss_of_out(model(x)) in the model's current mode (one forward:
    one dropout mask, drawn from ``rng_state`` when given; buffers are not modified)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    buffers = {n: b.detach().clone().double() if b.is_floating_point() else b.clone() for n, b in model.named_buffers()}
    flat0 = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    m64 = model.double() if next(model.parameters()).dtype != torch.float64 else model

    def f(flat):
        params = {n: c.view(s) for n, c, s in zip(names, flat.split(numels), shapes)}
        return loss_of_out(torch.func.functional_call(m64, {**params, **buffers}, (x.double(),)))

    with torch.random.fork_rng():
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        return torch.autograd.functional.hessian(f, flat0)


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_are_measured_in_float32(dtype):
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    model = _mlp(dtype)
    twin = _mlp(dtype)
    opt = stableopt.Adam(model.parameters(), lr=1e-2, eps=1e-3)  # 1e-8 underflows in float16
    opt_twin = stableopt.Adam(twin.parameters(), lr=1e-2, eps=1e-3)
    xs, ys = x.to(dtype), y.to(dtype)
    loss_fn = lambda: mse(model(xs), ys)  # noqa: E731 - half-precision inputs, as in training
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        mse(m(xs), ys).backward()
        o.step()  # noqa: E702
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]

    rep = opt.sharpness(loss_fn, raw=True, tol=1e-6)

    assert rep.dtype == "float32" and rep.converged
    assert all(p.dtype == dtype for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    assert all(p.grad.dtype == dtype and torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    # λ_max(H) of the same (rounded) weights and data, in float64
    H = _functional_hessian(model, lambda out: mse(out, ys.double()), xs)
    model.to(dtype)  # _functional_hessian cast it to float64 for the reference
    for a, p in zip(params, model.parameters()):
        with torch.no_grad():
            p.copy_(a)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert math.isclose(rep.raw, lam, rel_tol=1e-4), (rep.raw, lam)
    # training goes on exactly as in the twin that never measured
    for m, o in ((model, opt), (twin, opt_twin)):
        o.zero_grad()
        mse(m(xs), ys).backward()
        o.step()  # noqa: E702
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_autocast_inside_loss_fn_and_around_the_call_is_switched_off():
    x, y = torch.randn(32, 4), torch.randn(32, 2)
    model = _mlp(torch.float32)
    opt = stableopt.SGD(model.parameters(), lr=0.1)

    def amp_loss():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        return mse(out.float(), y)

    ref = opt.sharpness(lambda: mse(model(x), y), tol=1e-7)
    rep = opt.sharpness(amp_loss, tol=1e-7)
    assert rep.dtype == "float32"
    assert math.isclose(rep.preconditioned, ref.preconditioned, rel_tol=1e-5)
    assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a monitor fired inside an amp block
        rep2 = opt.sharpness(lambda: mse(model(x).float(), y), tol=1e-7)
        assert torch.is_autocast_enabled("cpu")  # restored
    assert math.isclose(rep2.preconditioned, ref.preconditioned, rel_tol=1e-5)
    assert not torch.is_autocast_enabled("cpu")


def test_half_precision_clash_outside_modules_is_a_clear_error():
    w = nn.Parameter(torch.randn(4, 2, dtype=torch.bfloat16))
    x = torch.randn(8, 4, dtype=torch.bfloat16)
    opt = stableopt.SGD([w], lr=0.1)
    with pytest.raises(RuntimeError, match="measures bfloat16/float16 models in float32") as info:
        opt.sharpness(lambda: (x @ w).float().pow(2).mean())
    assert isinstance(info.value.__cause__, RuntimeError)
    assert w.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
    # the fix the message suggests works
    rep = opt.sharpness(lambda: (x.to(w.dtype) @ w).pow(2).mean(), tol=1e-6)
    assert rep.dtype == "float32" and rep.converged


@pytest.mark.parametrize("train", [True, False])
def test_batchnorm_uses_the_current_mode_and_restores_buffers(train):
    torch.manual_seed(1)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    model = _mlp(torch.float64, nn.BatchNorm1d(8))
    opt = stableopt.SGD(model.parameters(), lr=0.01)
    for _ in range(3):  # move the running statistics away from their initial values
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()  # noqa: E702
    model.train(train)
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    rep = opt.sharpness(lambda: mse(model(x), y), raw=True, tol=1e-9)

    assert model.training is train
    assert all(torch.equal(buffers[n], b) for n, b in model.named_buffers())
    H = _functional_hessian(model, lambda out: mse(out, y), x)
    assert math.isclose(rep.raw, float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-6)


def test_dropout_uses_one_mask_and_restores_the_rng():
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    model = _mlp(torch.float64, nn.Dropout(0.3))
    opt = stableopt.SGD(model.parameters(), lr=0.01)
    state = torch.get_rng_state()
    rep = opt.sharpness(lambda: mse(model(x), y), raw=True, tol=1e-9)
    assert torch.equal(torch.get_rng_state(), state)
    assert rep.converged  # one mask: a fixed symmetric operator
    H = _functional_hessian(model, lambda out: mse(out, y), x, rng_state=state)
    assert math.isclose(rep.raw, float(torch.linalg.eigvalsh(H)[-1]), rel_tol=1e-6)
    model.eval()  # eval mode: no dropout at all
    rep_eval = opt.sharpness(lambda: mse(model(x), y), raw=True, tol=1e-9)
    H_eval = _functional_hessian(model, lambda out: mse(out, y), x)
    assert math.isclose(rep_eval.raw, float(torch.linalg.eigvalsh(H_eval)[-1]), rel_tol=1e-6)
