"""The ``stableopt demo`` job: full-batch Adam on scikit-learn's digits reaching the edge.

The docs/science.md setting: the first 1000 digits, standardised, one-hot targets, tanh MLP
64-128-128-10, loss ½‖f(x) − y‖² averaged over samples, Adam(η = 1e-3, β = (0.9, 0.999),
ε = 1e-8). Without scikit-learn the data is a synthetic teacher–student problem of the same shape.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .optimizers import Adam
from .sharpness import SharpnessReport

__all__ = ["DemoRow", "digits_data", "make_mlp", "mse_loss", "run_demo", "teacher_student_data"]


def digits_data(n: int = 1000, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, str]:
    """The first ``n`` scikit-learn digits, standardised, with one-hot targets.

    Falls back to :func:`teacher_student_data` when scikit-learn is not installed; the third
    value names the source.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        x, y = teacher_student_data(n, dtype=dtype)
        return x, y, "synthetic teacher-student (scikit-learn not installed)"
    data = load_digits()
    x = torch.as_tensor(data.data[:n], dtype=torch.float64)
    std = x.std(dim=0)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    y = torch.nn.functional.one_hot(torch.as_tensor(data.target[:n]), 10).to(torch.float64)
    return x.to(dtype), y.to(dtype), f"scikit-learn digits (first {n})"


def teacher_student_data(
    n: int = 1000, d: int = 64, classes: int = 10, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Gaussian inputs labelled (one-hot) by a random tanh teacher network; seeded, no globals."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w1 = torch.randn(d, 64, generator=g, dtype=torch.float64) / d**0.5
    w2 = torch.randn(64, classes, generator=g, dtype=torch.float64) / 8.0
    labels = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return x.to(dtype), torch.nn.functional.one_hot(labels, classes).to(dtype)


def make_mlp(
    widths: tuple[int, ...] = (64, 128, 128, 10),
    *,
    activation: type[nn.Module] = nn.Tanh,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """A fully connected network with PyTorch's default initialisation drawn from ``seed``.

    Uses a private generator via ``torch.random.fork_rng``, so the global RNG is untouched.
    """
    layers: list[nn.Module] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b, dtype=dtype))
            if i < len(widths) - 2:
                layers.append(activation())
    return nn.Sequential(*layers)


def mse_loss(output: Tensor, target: Tensor) -> Tensor:
    """½‖f(x) − y‖² averaged over samples (the EoS papers' square loss)."""
    return 0.5 * ((output - target) ** 2).sum(dim=1).mean()


@dataclass(frozen=True)
class DemoRow:
    step: int
    loss: float
    report: SharpnessReport


def run_demo(
    steps: int = 1500, every: int = 100, *, lr: float = 1e-3, seed: int = 0, raw: bool = True, tol: float = 1e-3
) -> Iterator[DemoRow]:
    """Train full-batch and yield a :class:`DemoRow` every ``every`` steps."""
    x, y, _ = digits_data()
    model = make_mlp(seed=seed)
    opt = Adam(model.parameters(), lr=lr)
    loss_fn: Callable[[], Tensor] = lambda: mse_loss(model(x), y)
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        if t % every == 0:
            yield DemoRow(t, loss.item(), opt.sharpness(loss_fn, raw=raw, tol=tol))
