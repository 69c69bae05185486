"""The ``stableopt`` command line: ``stableopt demo`` (more commands in later releases)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .demo import digits_data, run_demo

    console = Console()
    _, _, source = digits_data()
    console.print(
        f"[bold]stableopt demo[/]: full-batch Adam (lr={args.lr:g}) on {source}, tanh MLP "
        f"64-128-128-10, MSE. The edge: ratio = λ_max(P⁻¹H) / (38/η) = 1."
    )
    table = Table(title=None, show_edge=False)
    for col in ("step", "loss", "λ_max(P⁻¹H)", "threshold", "ratio", "raw λ_max(H)", "HVPs"):
        table.add_column(col, justify="right")
    t0 = time.perf_counter()
    late = []
    with console.status("training…") if console.is_terminal else _null():
        for row in run_demo(args.steps, args.every, lr=args.lr, seed=args.seed):
            r = row.report
            colour = "green" if r.ratio < 0.9 else ("yellow" if r.ratio <= 1.1 else "red")
            table.add_row(
                str(row.step), f"{row.loss:.5f}", f"{r.preconditioned:,.0f}", f"{r.threshold:,.0f}",
                f"[{colour}]{r.ratio:.3f}[/]", f"{r.raw:.2f}", str(r.hvps),
            )
            if not console.is_terminal:
                console.print(
                    f"step {row.step:5d}  loss {row.loss:.5f}  λ_max(P⁻¹H) {r.preconditioned:10.1f}  "
                    f"threshold {r.threshold:8.1f}  ratio {r.ratio:6.3f}  raw {r.raw:6.2f}"
                )
            if row.step > args.steps // 2:
                late.append(r.ratio)
    if console.is_terminal:
        console.print(table)
    if late:
        console.print(
            f"Second half: ratio {min(late):.3f}–{max(late):.3f} (1 = the Adaptive Edge of "
            f"Stability) in {time.perf_counter() - t0:.1f} s."
        )
    return 0


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stableopt", description="Optimizers that watch their own edge of stability.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="train an MLP on digits with stableopt.Adam and watch it reach the edge")
    demo.add_argument("--steps", type=_positive_int, default=1500, help="full-batch steps (default 1500)")
    demo.add_argument("--every", type=_positive_int, default=100, help="measure every N steps (default 100)")
    demo.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    demo.add_argument("--seed", type=int, default=0, help="initialisation seed (default 0)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
