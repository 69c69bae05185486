"""Full-batch Adam on scikit-learn's digits reaches the Adaptive Edge of Stability and stays there.

The setting of docs/science.md (Cohen et al. 2022, arXiv:2207.14484, Figure 1): the first 1000
digits, standardised, one-hot targets, tanh MLP 64-128-128-10, loss ½‖f(x) − y‖² averaged over
samples, Adam(η = 1e-3, β = (0.9, 0.999), ε = 1e-8). The preconditioned sharpness λ_max(P⁻¹H)
rises ("progressive sharpening") until it meets Adam's stability threshold 38/η and then hovers
there, while the raw sharpness λ_max(H) keeps rising.

Checks: the ratio λ_max(P⁻¹H)/threshold starts at least 20 % below its peak (progressive
sharpening); in the second half of the run its median is within 10 % of 1 and its 10th–90th
percentiles within 15 %. With --quick (500 steps): the same start, a peak within [0.95, 1.2] and
a median over the last 100 steps within 15 % of 1.

    python examples/adaptive_edge.py                 # 1500 steps, measured every 10
    python examples/adaptive_edge.py --optimizer rmsprop       # lr 1e-4, threshold 2/η
    python examples/adaptive_edge.py --optimizer sgd           # GD, lr 0.5, threshold 2/η
"""

from __future__ import annotations

import sys
import time

import numpy as np
from _common import ACTIVATIONS, Claims, console, describe, parse, parser, problem, save_history, table, train, window

import stableopt

DEFAULT_LR = {"adam": 1e-3, "adamw": 1e-3, "rmsprop": 1e-4, "sgd": 0.5}


def make_optimizer(name: str, params, args):
    lr = DEFAULT_LR[name] if args.lr is None else args.lr
    if name in ("adam", "adamw"):
        cls = stableopt.Adam if name == "adam" else stableopt.AdamW
        kw = {} if name == "adam" else {"weight_decay": args.weight_decay}
        return cls(params, lr=lr, betas=(args.beta1, args.beta2), **kw)
    if name == "rmsprop":
        return stableopt.RMSprop(params, lr=lr, alpha=args.beta2 if args.beta2_given else 0.99, momentum=args.momentum)
    return stableopt.SGD(params, lr=lr, momentum=args.momentum)


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0], steps=1500, quick_steps=500)
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--optimizer", choices=sorted(DEFAULT_LR), default="adam", help="the method (default adam)")
    p.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: adam/adamw 1e-3, rmsprop 1e-4, sgd 0.5)"
    )
    p.add_argument("--beta1", type=float, default=0.9, help="Adam's β1 (default 0.9)")
    p.add_argument("--beta2", type=float, default=None, help="Adam's β2 (default 0.999) or RMSprop's α (default 0.99)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD / RMSprop momentum (default 0)")
    p.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW's decoupled weight decay (default 1e-2)")
    p.add_argument("--width", type=int, default=128, help="hidden width (default 128)")
    p.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="tanh", help="default tanh")
    p.add_argument("--loss", choices=("mse", "ce"), default="mse", help="½‖f−y‖² or cross-entropy (default mse)")
    args = parse(p, argv, every=10, quick_every=25)
    args.beta2_given = args.beta2 is not None
    if args.beta2 is None:
        args.beta2 = 0.999
    started = time.perf_counter()

    prob = problem(seed=args.seed, width=args.width, depth=args.depth, activation=args.activation, loss=args.loss)
    opt = make_optimizer(args.optimizer, prob.model.parameters(), args)
    console.print(
        f"[bold]{type(opt).__name__}[/] (lr={opt.param_groups[0]['lr']:g}) on {describe(prob)}; "
        f"{args.steps} full-batch steps, sharpness every {args.every}"
    )
    opt.monitor(prob.loss_fn, every=args.every, raw=True)
    train(opt, prob, args.steps)
    opt.report()

    h = opt.history
    name = "adaptive_edge" if args.optimizer == "adam" else f"adaptive_edge_{args.optimizer}"
    save_history(h, args.out / f"{name}.safetensors")
    stableopt.plot_history(
        h,
        args.out / f"{name}.png",
        dpi=80,
        title=f"{type(opt).__name__} lr={opt.param_groups[0]['lr']:g}: λ_max(P⁻¹H) meets its threshold",
    )
    console.print(f"figure: {args.out / f'{name}.png'}")

    marks = [s for s in (100, 200, 300, 400, 800, 1000, 1500) if s <= args.steps]
    steps, ratio, raw = h.column("step"), h.column("ratio"), h.column("raw")
    table(
        "milestones",
        ["step", "ratio", "raw λ_max(H)"],
        [(s, f"{ratio[np.argmin(abs(steps - s))]:.3f}", f"{raw[np.argmin(abs(steps - s))]:.2f}") for s in marks],
    )

    claims = Claims()
    first = float(ratio[0])
    claims.check(
        "progressive sharpening: the ratio starts ≥ 20 % below its peak",
        first <= 0.8 * ratio.max(),
        f"{first:.3f} at step {int(steps[0])}, peak {ratio.max():.3f}",
    )
    if args.quick:
        late = window(h, "ratio", args.steps - 100)
        claims.check(
            "it reaches the edge and does not overshoot (max ratio in [0.95, 1.2])",
            0.95 <= ratio.max() <= 1.2,
            f"max {ratio.max():.3f}",
        )
        claims.check(
            "the last 100 steps hover at the edge (median within 15 % of 1)",
            abs(np.median(late) - 1) <= 0.15,
            f"median {np.median(late):.3f}, range {late.min():.3f}–{late.max():.3f}",
        )
    else:
        late = window(h, "ratio", args.steps // 2 + 1)
        med, (p10, p90) = float(np.median(late)), np.percentile(late, [10, 90])
        claims.check("second half: median ratio within 10 % of 1", abs(med - 1) <= 0.10, f"median {med:.3f}")
        claims.check(
            "second half: 80 % of measurements (10th–90th percentile) within 15 % of 1",
            0.85 <= p10 and p90 <= 1.15,
            f"{p10:.3f}–{p90:.3f} (range {late.min():.3f}–{late.max():.3f})",
        )
    return claims.exit(started)


if __name__ == "__main__":
    sys.exit(main())
