"""Regenerate the README's monitoring images: docs/report.svg, docs/report.png, docs/figure1.png.

    python docs/make_images.py                     # trains: a few minutes on 2 CPU cores
    python docs/make_images.py run.safetensors     # only renders a saved history

Full-batch Adam (η = 1e-3) on the first 1000 scikit-learn digits, tanh MLP 64-128-128-10 (the
``stableopt demo`` setting), with two monitors: λ_max(P⁻¹H) every 25 steps with the secant
estimate, raw λ_max(H) every 100 steps; and the spectral density of P⁻¹H at steps
:data:`DENSITY_STEPS` (8 probes × 40 Lanczos steps each). The history is saved and rendered exactly as
``stableopt report FILE --plot docs/figure1.png`` does. The PNG of the terminal report needs
``pip install cairosvg`` (the SVG is written without it).
"""

from __future__ import annotations

import io
import os
import sys
import tempfile

import torch
from rich.console import Console

import stableopt
from stableopt.demo import digits_data, make_mlp, mse_loss
from stableopt.report import render_saved

HERE = os.path.dirname(os.path.abspath(__file__))
#: the steps at which the figure's density panel measures the spectrum of P⁻¹H
DENSITY_STEPS = (100, 300, 500, 800)


def train(steps: int = 800) -> str:
    """Train with two monitors and return the path of the saved history."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x, y, _ = digits_data()
    model = make_mlp(seed=0)
    opt = stableopt.Adam(model.parameters(), lr=1e-3)
    loss_fn = lambda: mse_loss(model(x), y)
    opt.monitor(loss_fn, every=25, secant=True)
    opt.monitor(loss_fn, every=100, raw=True)
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        if step in DENSITY_STEPS:
            print(opt.spectral_density(loss_fn), file=sys.stderr)
    path = os.path.join(tempfile.mkdtemp(), "digits-adam.safetensors")
    opt.history.save(path)
    print(f"saved {path}", file=sys.stderr)
    return path


def render(path: str) -> None:
    history = stableopt.History.load(path)
    console = Console(record=True, width=90, file=io.StringIO(), force_terminal=True, color_system="truecolor")
    console.print("[dim]$[/] stableopt report digits-adam.safetensors --plot figure1.png")
    console.print(render_saved(history, "digits-adam.safetensors"))
    svg = os.path.join(HERE, "report.svg")
    console.save_svg(svg, title="stableopt report")
    stableopt.plot_history(
        history, os.path.join(HERE, "figure1.png"), title="Adam on digits, full batch: the Adaptive Edge of Stability"
    )
    try:
        import cairosvg
    except ImportError:
        print("cairosvg not installed: wrote docs/report.svg and docs/figure1.png only", file=sys.stderr)
        return
    with open(svg, encoding="utf-8") as f:  # cairo has no web fonts: use a local monospace font
        text = (
            f.read()
            .replace('"Fira Code"', '"DejaVu Sans Mono"')
            .replace("Fira Code, monospace", "DejaVu Sans Mono, monospace")
        )
    cairosvg.svg2png(bytestring=text.encode(), write_to=os.path.join(HERE, "report.png"), output_width=1400)


if __name__ == "__main__":
    render(sys.argv[1] if len(sys.argv) > 1 else train())
