"""Shared plumbing of the example scripts: arguments, the docs/science.md problem, training, outputs.

Every example trains the network of docs/science.md — the first 1000 scikit-learn digits,
standardised, one-hot targets, a tanh MLP 64-128-128-10, loss ½‖f(x) − y‖² averaged over
samples — unless told otherwise, and leaves three things behind in ``--out``: a history
(``.safetensors``, reload it with ``stableopt.History.load``), a PNG figure, and a verdict on the
claim it demonstrates (the exit status is 1 when the claim does not hold).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn

import stableopt
from stableopt.demo import digits_data, make_mlp, mse_loss

#: 110 columns when writing to a file or pipe (rich's default there is 80, too narrow for the tables)
console = Console(width=None if Console().is_terminal else 110)

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU}


# -- arguments --------------------------------------------------------------------------------
def parser(description: str, *, steps: int, quick_steps: int) -> argparse.ArgumentParser:
    """The options every example has: --quick, --steps, --every, --seed, --out."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"short CI run ({quick_steps} steps, weaker assertions)")
    p.add_argument(
        "--steps", type=positive_int, default=None, help=f"training steps (default {steps}; {quick_steps} with --quick)"
    )
    p.add_argument("--every", type=positive_int, default=None, help="measure the sharpness every N steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation (and batch order) seed (default 0)")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("out"),
        help="folder for the .safetensors history and the .png figure (default ./out)",
    )
    p.set_defaults(_steps=steps, _quick_steps=quick_steps)
    return p


def parse(
    p: argparse.ArgumentParser, argv: Sequence[str] | None = None, *, every: int, quick_every: int
) -> argparse.Namespace:
    """Parse, fill ``steps``/``every`` from the --quick defaults, seed torch, create ``--out``."""
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = args._quick_steps if args.quick else args._steps
    if args.every is None:
        args.every = quick_every if args.quick else every
    torch.manual_seed(args.seed)  # scripts may seed; the library never does
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


# -- the problem ------------------------------------------------------------------------------
@dataclass
class Problem:
    """The model, its full data and the loss ``loss_fn()`` (full batch) / ``loss_fn(batch)``."""

    model: nn.Module
    x: Tensor
    y: Tensor
    source: str
    criterion: Callable[[Tensor, Tensor], Tensor]

    def loss_fn(self, batch: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x, y = (self.x, self.y) if batch is None else batch
        return self.criterion(self.model(x), y)


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy against one-hot targets, averaged over samples."""
    return torch.nn.functional.cross_entropy(output, target.argmax(dim=1))


def problem(
    *, seed: int = 0, width: int = 128, depth: int = 2, activation: str = "tanh", loss: str = "mse", n: int = 1000
) -> Problem:
    """The docs/science.md digits problem (or a variant of its network and loss)."""
    x, y, source = digits_data(n)
    widths = (x.shape[1],) + (width,) * depth + (y.shape[1],)
    model = make_mlp(widths, activation=ACTIVATIONS[activation], seed=seed)
    return Problem(model, x, y, source, mse_loss if loss == "mse" else cross_entropy)


def describe(prob: Problem) -> str:
    widths = [m.in_features for m in prob.model if isinstance(m, nn.Linear)] + [prob.y.shape[1]]
    act = next((type(m).__name__ for m in prob.model if not isinstance(m, nn.Linear)), "linear")
    loss = "½‖f−y‖² (MSE)" if prob.criterion is mse_loss else "cross-entropy"
    return f"{prob.source}, {act} MLP {'-'.join(map(str, widths))}, {loss}"


def train(
    opt: torch.optim.Optimizer,
    prob: Problem,
    steps: int,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """``steps`` optimizer steps, full batch or on shuffled mini-batches; returns the last loss.

    Raises:
        FloatingPointError: the loss stopped being finite (training diverged).
    """
    n = prob.x.shape[0]
    order: list[Tensor] = []
    loss = float("nan")
    for t in range(1, steps + 1):
        if batch_size is None or batch_size >= n:
            batch = None
        else:
            if not order:  # a fresh permutation every epoch, dropping the ragged tail
                perm = torch.randperm(n, generator=generator)
                order = list(perm[: n - n % batch_size].split(batch_size))
            idx = order.pop(0)
            batch = (prob.x[idx], prob.y[idx])
        opt.zero_grad(set_to_none=True)
        value = prob.loss_fn(batch)
        value.backward()
        opt.step()
        loss = value.item()
        if not np.isfinite(loss):
            raise FloatingPointError(f"the loss became {loss} at step {t}: training diverged")
        if on_step is not None:
            on_step(t, loss)
    return loss


# -- reading a history --------------------------------------------------------------------------
def window(history: stableopt.History, name: str, start: int, stop: int | None = None) -> np.ndarray:
    """The column ``name`` restricted to measurements with start ≤ step ≤ stop."""
    step = history.column("step")
    values = history.column(name)
    keep = (step >= start) & (step <= (np.inf if stop is None else stop))
    return values[keep]


# -- verdicts ---------------------------------------------------------------------------------
class Claims:
    """Checks of the claim an example demonstrates; ``exit()`` returns 1 if any failed."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool, str]] = []

    def check(self, claim: str, ok: bool, detail: str) -> bool:
        self.results.append((claim, bool(ok), detail))
        return bool(ok)

    def exit(self, started: float) -> int:
        table = Table(title="claims", show_edge=False, title_justify="left")
        table.add_column("")
        table.add_column("claim")
        table.add_column("measured")
        for claim, ok, detail in self.results:
            table.add_row("[green]✓[/]" if ok else "[red]✗[/]", claim, detail)
        console.print(table)
        failed = [c for c, ok, _ in self.results if not ok]
        wall = time.perf_counter() - started
        if failed:
            console.print(f"[red bold]FAILED[/] ({len(failed)} of {len(self.results)} claims) in {wall:.1f} s")
            return 1
        console.print(f"[green bold]OK[/]: {len(self.results)} claims hold; {wall:.1f} s")
        return 0


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a rich table (all columns right-aligned but the first)."""
    t = Table(title=title, show_edge=False, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[str(v) for v in row])
    console.print(t)


# -- figures ----------------------------------------------------------------------------------
def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or a clear error."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise SystemExit("the examples draw figures with matplotlib: pip install -e '.[examples]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 90, "font.size": 9, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def save_figure(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    console.print(f"figure: {path}")
    return path


def save_history(history: stableopt.History, path: Path) -> Path:
    history.save(path)
    console.print(f"history: {path} ({len(history)} measurements)")
    return path
