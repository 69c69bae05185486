"""Does the lr guard widen the range of learning rates that train stably, and what does it cost?

The docs/science.md problem (full-batch, first 1000 scikit-learn digits, tanh MLP 64-128-128-10,
MSE ½‖f(x) − y‖²) trained with Adam over a sweep of learning rates, once with plain
``stableopt.Adam`` and once with ``stableopt.Adam(..., guard=LRGuard(every=N))``, from the same
initialisation. Per lr the table shows the final loss, the worst loss spike (the largest
loss_t / min_{s<t} loss_s: 1.0 = the loss never went up) and the number of guard actions, plus
the guard's final lr factor and its measuring overhead.

    python examples/guard.py            # the full sweep recorded in the README
    python examples/guard.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import stableopt
from stableopt.demo import digits_data, make_mlp, mse_loss


@dataclass
class Run:
    final_loss: float
    spike: float
    actions: int
    factor: float
    seconds: float
    losses: list[float]
    history: object = None


#: Adam's bias-correction transient (3/(1 − β1) steps), which the guard deliberately ignores:
#: loss spikes are counted from this step on.
TRANSIENT = 30
#: the "final loss" is the median of the last this-many losses
FINAL_WINDOW = 20


def train(lr: float, steps: int, *, guard: dict | None, seed: int, x: torch.Tensor, y: torch.Tensor) -> Run:
    """Full-batch Adam at ``lr`` for ``steps`` steps, with ``LRGuard(**guard)`` unless None."""
    model = make_mlp(seed=seed)
    loss_fn = lambda: mse_loss(model(x), y)  # noqa: E731
    lr_guard = stableopt.LRGuard(**guard).attach(loss_fn) if guard is not None else None
    opt = stableopt.Adam(model.parameters(), lr=lr, guard=lr_guard)
    best, spike, loss_value = math.inf, 1.0, math.nan
    losses: list[float] = []
    t0 = time.perf_counter()
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            spike = math.inf
            break
        if t > TRANSIENT:
            spike = max(spike, loss_value / best)
        if t >= TRANSIENT:
            best = min(best, loss_value)
        losses.append(loss_value)
        loss.backward()
        opt.step()
    else:
        with torch.no_grad():
            loss_value = loss_fn().item()
        if math.isfinite(loss_value):
            spike = max(spike, loss_value / best)
            losses.append(loss_value)
            # chaotic runs jump around: the median of the last steps, not one sample
            loss_value = statistics.median(losses[-FINAL_WINDOW:])
    seconds = time.perf_counter() - t0
    actions = len(lr_guard.events) if lr_guard is not None else 0
    factor = lr_guard.factors[0] if lr_guard is not None else 1.0
    return Run(loss_value, spike, actions, factor, seconds, losses, getattr(opt, "history", None))


def _loss(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else "[red]diverged[/]"


def _spike(value: float) -> str:
    if not math.isfinite(value):
        return "[red]∞[/]"
    colour = "green" if value < 1.5 else ("yellow" if value < 10 else "red")
    return f"[{colour}]{value:.2f}×[/]"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 learning rates, 200 steps (a few seconds)")
    parser.add_argument("--steps", type=int, default=None, help="full-batch steps per run (default 600, quick 200)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates to sweep")
    parser.add_argument("--every", type=int, default=5, help="guard measures every N steps (default 5)")
    parser.add_argument("--trigger", type=float, default=None, help="LRGuard trigger (default: LRGuard's)")
    parser.add_argument("--out", type=Path, default=None, help="write the guarded runs' histories (.safetensors) here")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (default 1: the chaotic high-lr runs amplify the last-bit "
        "differences of multithreaded reductions, so one thread makes the table reproducible)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps or (200 if args.quick else 600)
    lrs = args.lrs or ([1e-3, 1e-1] if args.quick else [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    guard_kwargs: dict = {"every": args.every}
    if args.trigger is not None:
        guard_kwargs["trigger"] = args.trigger
    console = Console()
    x, y, source = digits_data()
    console.print(
        f"[bold]LR guard sweep[/]: full-batch Adam on {source}, tanh MLP 64-128-128-10, MSE, "
        f"{steps} steps, seed {args.seed}; the guard measures every {args.every} steps "
        f"({stableopt.LRGuard(**guard_kwargs)!r})."
    )
    table = Table(show_edge=False)
    for col in (
        "lr",
        "final loss¹\nplain",
        "final loss¹\nguard",
        "worst spike²\nplain",
        "worst spike²\nguard",
        "guard\nactions",
        "final\nfactor",
        "time\nguard/plain",
    ):
        table.add_column(col, justify="right")
    results = []
    for lr in lrs:
        plain = train(lr, steps, guard=None, seed=args.seed, x=x, y=y)
        guarded = train(lr, steps, guard=guard_kwargs, seed=args.seed, x=x, y=y)
        results.append((lr, plain, guarded))
        if args.out is not None and guarded.history is not None and hasattr(guarded.history, "save"):
            args.out.mkdir(parents=True, exist_ok=True)
            guarded.history.save(args.out / f"guard_lr{lr:g}.safetensors")
        table.add_row(
            f"{lr:g}",
            _loss(plain.final_loss),
            _loss(guarded.final_loss),
            _spike(plain.spike),
            _spike(guarded.spike),
            str(guarded.actions),
            f"{guarded.factor:.3f}",
            f"{guarded.seconds / plain.seconds:.2f}",
        )
        if not console.is_terminal:
            console.print(f"lr {lr:g} done")
    console.print(table)
    console.print(
        f"¹ median of the last {FINAL_WINDOW} steps. ² max loss_t / min_(s<t) loss_s from step {TRANSIENT} on "
        "(1.00× = the loss never rose above its best so far)."
    )
    # the claims this example makes; exit 1 when one does not hold
    untouched = [(lr, p, g) for lr, p, g in results if g.actions == 0]
    top_lr, top_plain, top_guard = max(results, key=lambda r: r[0])
    claims = [
        (
            "a guard that never acts changes nothing: the run is the plain run, loss for loss",
            all(p.losses == g.losses for _, p, g in untouched),
            f"{len(untouched)} of {len(results)} learning rates untouched",
        ),
        (
            f"at the largest lr ({top_lr:g}) the guarded run ends lower",
            top_guard.final_loss < top_plain.final_loss or not math.isfinite(top_plain.final_loss),
            f"final loss {top_guard.final_loss:.4g} vs {top_plain.final_loss:.4g}",
        ),
    ]
    claims_table = Table(show_edge=False)
    for col in ("claim", "holds", "measured"):
        claims_table.add_column(col)
    for text, ok, measured in claims:
        claims_table.add_row(text, "[green]yes[/]" if ok else "[red]NO[/]", measured)
    console.print(claims_table)
    return 0 if all(ok for _, ok, _ in claims) else 1


if __name__ == "__main__":
    raise SystemExit(main())
