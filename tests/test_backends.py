"""The HVP backends against dense float64 Hessians and against each other; where double backward
does not exist (custom once_differentiable kernels, fused SDPA, torch.compile) "auto" measures
with finite differences and says so; side effects stay nil on every backend."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from test_sharpness import CONFIGS, _equal, _noisy_model, _reference, _setup, _snapshot, mse
from torch import nn

import stableopt
from stableopt.backends import BackendChoice

IDS = [f"{c[0]}-{c[1].__name__}-{c[2]}-{c[3]}-groups{2 if c[4] else 1}" for c in CONFIGS]


@pytest.mark.parametrize("hvp", ["fd", "forward"])
@pytest.mark.parametrize("name,activation,loss,kwargs,two_groups", CONFIGS, ids=IDS)
def test_float64_backend_matches_dense_reference_to_1e6(hvp, name, activation, loss, kwargs, two_groups):
    model, x, loss_of, loss_fn, opt = _setup(name, activation, loss, torch.float64, kwargs, two_groups)
    pre, ratio, raw = _reference(model, x, loss_of, opt)
    # fd's products carry ~1e-9 of rounding in float64, which its error estimate (conservative
    # by up to ~8x) must vouch for: converged is asked at 1e-7 there
    rep = opt.sharpness(loss_fn, raw=True, k=2, tol=1e-9 if hvp == "forward" else 1e-7, max_iters=200, hvp=hvp)
    assert rep.converged and rep.hvp_backend == hvp and rep.dtype == "float64"
    assert rep.preconditioned == pytest.approx(float(pre[0]), rel=1e-6)
    assert rep.eigenvalues == pytest.approx(pre[:2].tolist(), rel=1e-6)
    assert rep.ratio == pytest.approx(ratio, rel=1e-6)
    assert rep.raw == pytest.approx(raw, rel=1e-6)


@pytest.mark.parametrize("name,activation,loss,kwargs,two_groups", CONFIGS, ids=IDS)
def test_float32_fd_matches_dense_reference_to_2e3(name, activation, loss, kwargs, two_groups):
    model, x, loss_of, loss_fn, opt = _setup(name, activation, loss, torch.float32, kwargs, two_groups)
    pre, ratio, raw = _reference(model, x, loss_of, opt)
    rep = opt.sharpness(loss_fn, raw=True, tol=1e-4, hvp="fd")
    assert rep.hvp_backend == "fd" and rep.dtype == "float32"
    assert rep.preconditioned == pytest.approx(float(pre[0]), rel=2e-3)
    assert rep.ratio == pytest.approx(ratio, rel=2e-3)
    assert rep.raw == pytest.approx(raw, rel=2e-3)


def test_all_three_backends_agree_on_the_same_state():
    model, x, loss_of, loss_fn, opt = _setup(
        "AdamW", nn.Tanh, "ce", torch.float64, dict(lr=1e-2, weight_decay=0.3), True
    )
    reports = {}
    for hvp in ("autograd", "fd", "forward"):
        opt._stableopt_warm.clear()  # the same cold start for each
        reports[hvp] = opt.sharpness(loss_fn, raw=True, k=3, tol=1e-10, max_iters=200, hvp=hvp)
    for hvp in ("fd", "forward"):
        assert reports[hvp].eigenvalues == pytest.approx(reports["autograd"].eigenvalues, rel=1e-7)
        assert reports[hvp].ratio == pytest.approx(reports["autograd"].ratio, rel=1e-7)
        assert reports[hvp].raw == pytest.approx(reports["autograd"].raw, rel=1e-7)


def test_fd_products_match_autograd_products_and_restore_parameters_bitwise():
    model, x, _, loss_fn, opt = _setup("Adam", nn.ReLU, "mse", torch.float32, dict(lr=1e-2), False)
    before = [p.detach().clone() for p in model.parameters()]
    g = torch.Generator().manual_seed(3)
    with opt.measure(loss_fn, hvp="autograd") as ad:
        vectors = [ad.operator("raw").random(g) for _ in range(3)]
        exact = [ad.operator("raw").matvec(v) for v in vectors]
    with opt.measure(loss_fn, hvp="fd") as fd:
        op = fd.operator("raw")
        for v, a in zip(vectors, exact):
            f = op.matvec(v)
            assert float((a - f).norm() / a.norm()) < 1e-3
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))  # after every product
        assert fd.backend == "fd" and ad.backend == "autograd" and fd.products == 3


class _OnceTanh(torch.autograd.Function):
    """tanh with a hand-written backward that cannot itself be differentiated (a custom kernel)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _CustomKernelMLP(nn.Sequential):
    def forward(self, x):
        return self[1](_OnceTanh.apply(self[0](x)))


def _custom_kernel_setup(dtype=torch.float64):
    model, x, loss_of, _, opt = _setup("Adam", nn.Tanh, "mse", dtype, dict(lr=1e-2), False)
    custom = _CustomKernelMLP(model[0], model[2])  # the same layers, tanh by the custom kernel
    return model, x, loss_of, (lambda: loss_of(custom(x))), opt


def test_auto_measures_a_once_differentiable_model_with_fd_and_says_so():
    model, x, loss_of, custom_loss, opt = _custom_kernel_setup()
    pre, ratio, _ = _reference(model, x, loss_of, opt)  # the same function with torch's tanh
    with pytest.warns(RuntimeWarning, match="measuring with hvp='fd'.*@once_differentiable"):
        rep = opt.sharpness(custom_loss, tol=1e-7)  # what fd vouches for in float64 (~1e-9 rounding)
    assert rep.hvp_backend == "fd" and opt.hvp_backend == "fd"
    assert rep.preconditioned == pytest.approx(float(pre[0]), rel=1e-6)
    assert rep.ratio == pytest.approx(ratio, rel=1e-6)
    with warnings.catch_warnings():  # decided once: no second probe, no second warning
        warnings.simplefilter("error")
        again = opt.sharpness(custom_loss, tol=1e-7)
    assert again.hvp_backend == "fd" and again.preconditioned == pytest.approx(rep.preconditioned, rel=1e-7)


def test_autograd_on_a_once_differentiable_model_raises_the_documented_error():
    _, _, _, custom_loss, opt = _custom_kernel_setup()
    with pytest.raises(stableopt.DoubleBackwardError, match=r"once_differentiable.*hvp='fd'.*hvp='auto'") as info:
        opt.sharpness(custom_loss, hvp="autograd")
    assert isinstance(info.value, RuntimeError)
    assert opt.hvp_backend is None  # an explicit backend decides nothing for "auto"


def test_auto_keeps_autograd_where_double_backward_works():
    _, _, _, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float64, dict(lr=1e-2), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rep = opt.sharpness(loss_fn)
    assert rep.hvp_backend == "autograd" and opt.hvp_backend == "autograd"


class _Attention(nn.Module):
    """One causal self-attention block (SDPA), LayerNorm and GELU, on a tiny sequence."""

    def __init__(self, d=8, heads=2, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, dtype=dtype)
        self.out = nn.Linear(d, d, dtype=dtype)
        self.norm = nn.LayerNorm(d, dtype=dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.4)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        return x + F.gelu(self.out(y))


def test_fused_sdpa_is_measured_with_fd_and_equals_the_math_kernel():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _Attention()
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 5, 8, generator=g, dtype=torch.float64),
    )
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    loss_fn = lambda: mse(model(x), y)
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()

    def math_loss():
        with sdpa_kernel(SDPBackend.MATH):
            return loss_fn()

    reference = stableopt.Adam(model.parameters(), lr=1e-2)
    reference.load_state_dict(opt.state_dict())
    ref = reference.sharpness(math_loss, raw=True, tol=1e-10, hvp="autograd")
    with pytest.warns(RuntimeWarning, match="scaled_dot_product_flash_attention"):
        rep = opt.sharpness(loss_fn, raw=True, tol=1e-10)  # the fused CPU kernel: no double backward
    assert rep.hvp_backend == "fd" and ref.hvp_backend == "autograd"
    assert rep.preconditioned == pytest.approx(ref.preconditioned, rel=1e-6)
    assert rep.raw == pytest.approx(ref.raw, rel=1e-6)


@pytest.mark.parametrize("hvp", ["auto", "fd"])
def test_activation_checkpointing_equals_the_unchecked_model(hvp):
    from torch.utils.checkpoint import checkpoint

    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "ce", torch.float64, dict(lr=1e-2), True)
    checked = lambda: loss_of(model[2](checkpoint(lambda t: model[1](model[0](t)), x, use_reentrant=False)))  # noqa: E731
    pre, ratio, raw = _reference(model, x, loss_of, opt)
    rep = opt.sharpness(checked, raw=True, tol=1e-9, hvp=hvp)
    assert rep.preconditioned == pytest.approx(float(pre[0]), rel=1e-6)
    assert rep.ratio == pytest.approx(ratio, rel=1e-6) and rep.raw == pytest.approx(raw, rel=1e-6)


def _compiles() -> str | None:
    try:
        f = torch.compile(lambda t: torch.tanh(t) * 2)
        f(torch.ones(2))
    except Exception as exc:  # noqa: BLE001 - any failure means no compiler here
        return f"torch.compile does not work on this machine: {type(exc).__name__}: {exc}"
    return None


@pytest.mark.skipif(_compiles() is not None, reason=str(_compiles()))
def test_torch_compile_is_measured_and_agrees_with_eager():
    model, x, loss_of, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float32, dict(lr=1e-2), False)
    compiled = torch.compile(model)
    eager = opt.sharpness(loss_fn, raw=True, tol=1e-5, hvp="autograd")
    opt._stableopt_warm.clear()
    with pytest.warns(RuntimeWarning, match="measuring with hvp='fd'.*double backward"):
        rep = opt.sharpness(lambda: loss_of(compiled(x)), raw=True, tol=1e-5)
    assert rep.hvp_backend == "fd"
    assert rep.preconditioned == pytest.approx(eager.preconditioned, rel=1e-4)
    assert rep.raw == pytest.approx(eager.raw, rel=1e-4)


@pytest.mark.parametrize("hvp", ["autograd", "fd", "forward"])
def test_every_backend_leaves_params_grads_state_rng_and_buffers_untouched(hvp):
    import random

    import numpy as np

    model = _noisy_model()
    if hvp == "forward":  # forward-mode AD cannot run BatchNorm's in-place running-stat update
        model[1].eval()
    x, y = torch.randn(32, 6), torch.randn(32, 2)

    def loss_fn():  # also consumes Python and NumPy randomness
        random.random(), np.random.rand()
        return mse(model(x), y)

    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    loss_fn().backward()
    opt.step()
    loss_fn().backward()  # leave a gradient in .grad
    before = _snapshot(model, opt)
    rep = opt.sharpness(loss_fn, raw=True, k=2, hvp=hvp)
    assert math.isfinite(rep.preconditioned) and rep.hvp_backend == hvp
    assert _equal(before, _snapshot(model, opt))


class _TiedLM(nn.Module):
    """Tied input/output embeddings plus a parameter of the root module itself: the owner lookup
    of hvp="forward" finds the root and both modules holding the tied weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx) * self.scale))


@pytest.mark.parametrize("hvp", ["forward", "fd", "autograd"])
def test_tied_weights_and_root_parameters_match_the_dense_hessian(hvp):
    torch.manual_seed(0)
    model = _TiedLM().double()
    idx, y = torch.tensor([0, 1, 2, 3, 4, 1]), torch.tensor([1, 2, 3, 4, 0, 0])
    params = list(model.parameters())  # the tied weight once: [scale, emb.weight]
    assert [p.shape for p in params] == [(3,), (5, 3)]

    def loss_of(flat):
        s, E = flat[:3], flat[3:].view(5, 3)
        return F.cross_entropy(torch.tanh(E[idx] * s) @ E.T, y)

    theta = torch.cat([p.detach().reshape(-1) for p in params])
    H = torch.func.hessian(loss_of)(theta)
    group = stableopt.MeasuredGroup(params, [torch.ones_like(p) for p in params], threshold=1.0)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with stableopt.measure(lambda: F.cross_entropy(model(idx), y), [group], hvp=hvp) as m:
        hv = m.operator("raw").matvec(v)
    assert torch.allclose(hv, H @ v, rtol=0, atol=1e-7 * float((H @ v).norm()))


def test_forward_backend_explains_what_it_cannot_differentiate():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))  # used outside any module
    opt = stableopt.SGD([w], lr=0.1)
    with pytest.raises(stableopt.ForwardADError, match="belong to no module.*hvp='fd'"):
        opt.sharpness(lambda: (w**3).sum(), hvp="forward")
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = stableopt.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3)
    with pytest.raises(stableopt.ForwardADError, match="in-place.*hvp='fd'"):
        opt.sharpness(lambda: model(x).square().mean(), hvp="forward")


@pytest.mark.parametrize(
    "bad,exc,pattern",
    [
        ("double", ValueError, r"hvp must be one of \('auto', 'autograd', 'fd', 'forward'\), got 'double'"),
        (2, TypeError, "hvp must be one of .* got int"),
    ],
)
def test_bad_hvp_values_are_rejected_everywhere(bad, exc, pattern):
    w = nn.Parameter(torch.ones(2))
    opt = stableopt.SGD([w], lr=0.1)
    loss_fn = lambda: (w**2).sum()  # noqa: E731
    for call in (
        lambda: opt.sharpness(loss_fn, hvp=bad),
        lambda: opt.monitor(loss_fn, hvp=bad),
        lambda: opt.measure(loss_fn, hvp=bad),
        lambda: stableopt.LRGuard(hvp=bad),
        lambda: stableopt.estimate_sharpness(loss_fn, opt._sharpness_groups(), hvp=bad),
    ):
        with pytest.raises(exc, match=pattern):
            call()


def test_monitor_and_guard_pass_their_backend_on():
    _, _, _, custom_loss, opt = _custom_kernel_setup()
    opt.monitor(custom_loss, every=1, hvp="fd")
    guard = stableopt.LRGuard(every=2).bind(opt)
    guard.attach(custom_loss, hvp="fd")
    opt.step()
    opt.step()
    assert opt.history.hvp_backends() == ["fd", "fd", "fd"]  # two by the monitor, one by the guard
    assert opt.history.column("hvp_backend").tolist() == [1, 1, 1]
    assert isinstance(opt._stableopt_backend, BackendChoice) and opt.hvp_backend is None


def test_the_backend_is_a_history_column_shown_in_the_report_and_saved(tmp_path):
    import io

    from rich.console import Console
    from safetensors.numpy import load_file, save_file

    model, x, loss_of, custom_loss, opt = _custom_kernel_setup()
    with pytest.warns(RuntimeWarning):
        opt.sharpness(custom_loss)  # auto -> fd
    opt.sharpness(lambda: loss_of(model(x)), hvp="forward")  # torch's tanh: forward AD works
    console = Console(file=io.StringIO(), width=120)
    opt.report(console=console)
    assert "HVPs by" in console.file.getvalue() and "fd (1), forward (1)" in console.file.getvalue()
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    assert stableopt.History.load(path).hvp_backends() == ["fd", "forward"]
    # a file written before the column existed still loads, its backend unknown
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    columns = {k: v for k, v in load_file(str(path)).items() if k != "hvp_backend"}
    old = tmp_path / "old.safetensors"
    save_file(columns, str(old), metadata=metadata)
    assert stableopt.History.load(old).hvp_backends() == ["unknown", "unknown"]


def test_the_product_error_is_a_history_column_shown_in_the_report_and_saved(tmp_path):
    import io

    from rich.console import Console
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    _, _, _, loss_fn, opt = _setup("Adam", nn.Tanh, "mse", torch.float32, dict(lr=1e-2), False)
    fd = opt.sharpness(loss_fn, hvp="fd")
    exact = opt.sharpness(loss_fn, hvp="autograd")
    assert 0 < fd.hvp_error <= 1e-3 and exact.hvp_error == 0.0
    assert f"product error ~{fd.hvp_error:.1e}" in str(fd) and "product error" not in str(exact)
    assert opt.history.column("hvp_error").tolist() == [fd.hvp_error, 0.0]
    console = Console(file=io.StringIO(), width=120)
    opt.report(console=console)
    assert f"product error ≤ {fd.hvp_error:.1e}" in console.file.getvalue()
    path = tmp_path / "run.safetensors"
    opt.history.save(path)
    assert stableopt.History.load(path).column("hvp_error").tolist() == [fd.hvp_error, 0.0]
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
    old = tmp_path / "old.safetensors"  # written before the column existed: unknown (NaN)
    save_file({k: v for k, v in load_file(str(path)).items() if k != "hvp_error"}, str(old), metadata=metadata)
    assert all(math.isnan(e) for e in stableopt.History.load(old).column("hvp_error"))
