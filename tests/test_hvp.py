"""Hessian-vector products against dense float64 Hessians from torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_hessian, make_data, make_model
from torch import nn

from stableopt.hvp import batch_size, hessian_vector_product, make_hvp


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _split(flat, params):
    return [c.view_as(p) for c, p in zip(flat.split([p.numel() for p in params]), params)]


@pytest.mark.parametrize("activation", [nn.Tanh, nn.ReLU])
def test_hvp_matches_dense_hessian(activation):
    model = make_model(activation)
    x, y, _ = make_data()
    loss_of = lambda out: 0.5 * ((out - y) ** 2).sum(1).mean()
    params = list(model.parameters())
    H = dense_hessian(model_with_input(model, x), loss_of)
    hvp = make_hvp(lambda: loss_of(model(x)), params)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        v = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
        torch.testing.assert_close(_flat(hvp(_split(v, params))), H @ v, rtol=1e-10, atol=1e-12)
    assert hvp.calls == 3


class model_with_input(nn.Module):  # noqa: N801 - a tiny adapter for functional_call
    def __init__(self, model, x):
        super().__init__()
        self.model, self.x = model, x

    def forward(self):
        return self.model(self.x)


def test_batches_give_the_size_weighted_full_data_hessian():
    model = make_model()
    x, _, labels = make_data(n=23)
    ce = nn.functional.cross_entropy
    params = list(model.parameters())
    full = make_hvp(lambda: ce(model(x), labels), params)
    batches = [(x[:10], labels[:10]), (x[10:20], labels[10:20]), (x[20:], labels[20:])]  # uneven
    batched = make_hvp(lambda b: ce(model(b[0]), b[1]), params, batches=batches)
    v = _split(torch.randn(sum(p.numel() for p in params), dtype=torch.float64), params)
    torch.testing.assert_close(_flat(batched(v)), _flat(full(v)), rtol=1e-10, atol=1e-12)
    assert float(batched.loss) == pytest.approx(float(full.loss), rel=1e-12)


def test_nothing_is_written_to_grad_and_unused_params_get_zeros():
    w = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    w.grad = torch.tensor([7.0, 7.0], dtype=torch.float64)
    out = hessian_vector_product(
        lambda: (w**3).sum(), [w, unused], [torch.ones(2, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    )
    torch.testing.assert_close(out[0], torch.tensor([6.0, 12.0], dtype=torch.float64))
    assert torch.equal(out[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(w.grad, torch.tensor([7.0, 7.0], dtype=torch.float64)) and unused.grad is None


def test_loss_linear_in_params_has_zero_hessian():
    w = nn.Parameter(torch.ones(3))
    out = hessian_vector_product(lambda: (2 * w).sum(), [w], [torch.ones(3)])
    assert torch.equal(out[0], torch.zeros(3))


def test_batch_size_reads_the_leading_dimension():
    assert batch_size(torch.zeros(4, 2)) == 4
    assert batch_size({"x": torch.zeros(6, 1), "y": torch.zeros(6)}) == 6
    assert batch_size(("meta", [torch.zeros(2)])) == 2
    with pytest.raises(TypeError, match="cannot tell the size of a batch of type str"):
        batch_size("abc")


@pytest.mark.parametrize(
    "loss_fn,kwargs,exc,pattern",
    [
        (lambda: [1.0], {}, TypeError, "loss_fn must return a scalar tensor, got list"),
        (lambda: W.sum(0), {}, ValueError, r"must return a scalar tensor, got shape \(3,\)"),
        (lambda: torch.tensor(1.0), {}, ValueError, "does not depend on the optimizer's parameters"),
        (lambda: (OTHER**2).sum(), {}, ValueError, "does not depend on any of the optimizer's parameters"),
        (lambda b: (W * b).sum(), {"batches": iter([torch.ones(2, 3)])}, TypeError, "batches must be re-iterable"),
        (lambda b: (W * b).sum(), {"batches": []}, ValueError, "batches must hold at least one sample"),
        ("not callable", {}, TypeError, "loss_fn must be callable, got str"),
    ],
)
def test_bad_loss_functions(loss_fn, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make_hvp(loss_fn, [W], **kwargs)


W = nn.Parameter(torch.ones(2, 3))
OTHER = nn.Parameter(torch.ones(2))
