"""Shared fixtures: small models and a dense float64 Hessian reference built with torch.func."""

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


def dense_hessian(model: nn.Module, loss_of_output, params=None) -> torch.Tensor:
    """The float64 Hessian of loss_of_output(model) w.r.t. ``params`` (default: all), flattened."""
    params = list(model.parameters()) if params is None else list(params)
    names = {id(p): n for n, p in model.named_parameters()}
    shapes = [p.shape for p in params]
    numels = [p.numel() for p in params]
    flat0 = torch.cat([p.detach().reshape(-1).double() for p in params])
    others = {n: p.detach().double() for n, p in model.named_parameters() if id(p) not in {id(q) for q in params}}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in model.named_buffers()}
    model64 = model  # functional_call does not modify the module

    def f(flat):
        chunks = flat.split(numels)
        new = {names[id(p)]: c.view(s) for p, c, s in zip(params, chunks, shapes)}
        out = torch.func.functional_call(model64, {**others, **new, **buffers}, ())
        return loss_of_output(out)

    return torch.func.hessian(f)(flat0)


@pytest.fixture
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
