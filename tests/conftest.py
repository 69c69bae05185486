"""Shared fixtures: small models and a dense float64 Hessian reference (row-by-row double backward)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The suite's models are tiny: one intra-op thread is fastest, and avoids oversubscribing a
# 2-core CI machine (several threads per process made small HVPs ~20x slower under load).
torch.set_num_threads(1)


def make_model(
    activation: type[nn.Module] = nn.Tanh, dtype: torch.dtype = torch.float64, seed: int = 0, widths=(5, 7, 3)
) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / a**0.5)
            lin.bias.copy_(torch.randn(b, generator=g, dtype=dtype) * 0.1)
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def make_data(n: int = 16, d: int = 5, c: int = 3, dtype: torch.dtype = torch.float64, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, c, generator=g, dtype=dtype)
    labels = torch.randint(0, c, (n,), generator=g)
    return x, y, labels


def hessian_rows(g: torch.Tensor, flat: torch.Tensor, batched: bool = True) -> torch.Tensor:
    """Rows ∂g_i/∂flat of the gradient ``g`` (built with ``create_graph=True``) by double backward.

    ``batched``: 256 rows per backward (``is_grads_batched``: the same double backward, vmapped
    over the output cotangents); otherwise one row per backward. The two agree to rounding on
    LayerNorm/attention models (tests/test_fd_accuracy.py checks it), 4x faster batched.
    """
    n = flat.numel()
    if not batched:
        rows = [torch.autograd.grad(g[i], flat, retain_graph=True, allow_unused=True)[0] for i in range(n)]
        return torch.stack([torch.zeros_like(flat) if r is None else r for r in rows]).detach()
    eye = torch.eye(n, dtype=g.dtype, device=g.device)
    out = []
    for a in range(0, n, 256):
        (r,) = torch.autograd.grad(
            g, flat, grad_outputs=eye[a : a + 256], retain_graph=True, is_grads_batched=True, allow_unused=True
        )
        out.append(torch.zeros_like(eye[a : a + 256]) if r is None else r)
    return torch.cat(out).detach()


def dense_hessian(model: nn.Module, loss_of_output, params=None) -> torch.Tensor:
    """The float64 Hessian of loss_of_output(model()) w.r.t. ``params`` (default: all), flattened.

    Row by row: double backward of each gradient entry (:func:`hessian_rows`) through a float64
    evaluation of the model (attention on the math kernel, which has a second derivative). Not
    ``torch.func.hessian``: in torch 2.13 it is wrong through LayerNorm (asymmetric, entries off
    by up to 0.47; pytorch issues 196700, functorch 534). The result is checked to be symmetric.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = list(model.parameters()) if params is None else list(params)
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    flat = torch.cat([p.detach().reshape(-1).double() for p in params]).requires_grad_(True)
    chosen = {id(q) for q in params}
    others = {n: p.detach().double() for n, p in model.named_parameters() if id(p) not in chosen}
    buffers = {n: b.detach().clone().double() if b.is_floating_point() else b.clone() for n, b in model.named_buffers()}
    chunks = flat.split(numels)
    new = {names[id(p)]: c.view(s) for p, c, s in zip(params, chunks, shapes)}
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        out = torch.func.functional_call(model, {**others, **new, **buffers}, ())
        (g,) = torch.autograd.grad(loss_of_output(out).double(), flat, create_graph=True)
        H = hessian_rows(g, flat)
    assert torch.allclose(H, H.T, rtol=1e-7, atol=1e-9 * float(H.abs().max())), "the reference is not symmetric"
    return H


@pytest.fixture
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
