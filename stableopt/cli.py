"""The ``stableopt`` command line: ``stableopt demo`` and ``stableopt report FILE``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ._text import literal

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

    console = Console(soft_wrap=True)  # plain lines stay whole in logs and pipes
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
                str(row.step),
                f"{row.loss:.5f}",
                f"{r.preconditioned:,.0f}",
                f"{r.threshold:,.0f}",
                f"[{colour}]{r.ratio:.3f}[/]",
                f"{r.raw:.2f}",
                str(r.hvps),
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


def _fail(message: object) -> int:
    """One line on stderr, shown literally (a hostile file name or field cannot reach the
    terminal as control codes or markup), and exit status 1."""
    sys.stderr.write(f"stableopt report: error: {literal(message, 600)}\n")
    sys.stderr.flush()
    return 1


def _report(args: argparse.Namespace) -> int:
    try:
        return _report_unchecked(args)
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130  # as a shell reports SIGINT
    except Exception as exc:  # never a traceback for a file: one line, exit 1
        return _fail(f"unexpected {type(exc).__name__}: {exc}")


def _report_unchecked(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from ._atomic import same_file
    from .history import History
    from .report import render_saved

    outputs = [(flag, path) for flag, path in (("--csv", args.csv), ("--plot", args.plot)) if path]
    for flag, path in outputs:
        if same_file(path, args.file):
            return _fail(f"{flag} {path} is the input file; refusing to overwrite the history")
    if len(outputs) == 2 and same_file(args.csv, args.plot):
        return _fail(f"--csv and --plot name the same file ({args.csv})")
    try:
        history = History.load(args.file)
    except ValueError as exc:
        return _fail(exc)
    console = Console()
    console.print(render_saved(history, args.file))
    if args.csv:
        try:
            written = _write_csv(history, args.csv)
        except ValueError as exc:
            return _fail(exc)
        except OSError as exc:
            return _fail(f"cannot write {args.csv}: {exc.strerror or exc}")
        console.print(Text(f"wrote {literal(written, 300)}"))
    if args.plot:
        from .plot import plot_history

        try:
            plot_history(history, args.plot)
        except (ImportError, ValueError) as exc:
            return _fail(exc)
        except OSError as exc:
            return _fail(f"cannot write {args.plot}: {exc.strerror or exc}")
        console.print(Text(f"wrote {literal(args.plot, 300)}"))
    return 0


def _write_csv(history: object, path: str) -> str:
    """The measurements as CSV (floats as ``repr``: exact), written atomically."""
    import csv

    from ._atomic import atomic_write

    cols = history.to_dict()  # type: ignore[attr-defined]
    names = list(cols)

    def write(f: object) -> None:
        writer = csv.writer(f)  # type: ignore[arg-type]
        writer.writerow(names)
        for i in range(len(history)):  # type: ignore[arg-type]
            writer.writerow([repr(float(cols[n][i])) if cols[n].dtype.kind == "f" else int(cols[n][i]) for n in names])

    return atomic_write(path, write, text=True)


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
    report = sub.add_parser(
        "report", help="print the report of a saved history (opt.history.save) and optionally plot it"
    )
    report.add_argument("file", metavar="FILE.safetensors", help="a history written by opt.history.save(path)")
    report.add_argument("--plot", metavar="OUT.png", help="write a Figure-1-style plot (needs matplotlib)")
    report.add_argument("--csv", metavar="OUT.csv", help="write the measurements as CSV")
    report.set_defaults(func=_report)
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
