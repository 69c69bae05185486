"""Does the curvature along the preconditioned gradient predict Adam's loss spikes (Bai et al. 2025)?

Full-batch Adam at a large lr (default 2e-2) on the digits problem of docs/science.md spikes again and
again: the loss jumps, Adam's second moment v grows, P = √v̂ + ε rises, the run settles and sharpens
until the next jump. After every step the script measures, one Hessian-vector product each,

* the directional ratio along the update θ_t − θ_{t−1} (``opt.monitor(..., directional="update")``),
* the directional ratio along the preconditioned gradient u = P⁻¹g (Bai et al.'s quantity,
  ``opt.directional_sharpness(loss_fn, "gradient")``),

and every N steps (``--every``, default 10) the λ_max edge ratio (``opt.sharpness``, tol 1e-2),
and asks how often an upward crossing of 1 by each signal comes shortly before a spike.

Definitions (all on the full-batch loss L_t at θ_t):

* step t is *spiking* when L_t > 2·min(L_{t−20}, …, L_{t−1}); a spike's *onset* is a spiking step
  with no spiking step among the 20 before it;
* an *alarm* of a signal is a measurement above 1 whose previous measurement was ≤ 1;
* a spike is *preceded* when an alarm lies in [onset − W, onset) (``--window``, default 10); its *lead* is
  onset − the earliest such alarm; a *false alarm* has no onset in the W steps after it;
* *chance*: the spikes one would expect preceded if the onsets fell on random steps (the share of
  steps covered by the alarms' windows × the number of spikes).

Checks: the run spikes (≥ 10 spikes, ≥ 3 with --quick); both directional ratios stay below the
λ_max ratio at the steps where both were measured (they are lower bounds, up to λ_max's 2·tol
accuracy); alarms of the gradient direction precede at least half of the spikes and at least 3×
as many as chance; the update direction precedes fewer spikes than the gradient direction. The
table also shows how the λ_max ratio sampled every N steps does; nothing is claimed for it.

    python examples/spike_predictor.py               # 1500 steps, the run in the README
    python examples/spike_predictor.py --lr 1e-2     # fewer, larger spikes
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
from _common import Claims, console, describe, parse, parser, problem, pyplot, save_figure, save_history, table, train

import stableopt

#: a spike: the loss more than SPIKE_FACTOR × its minimum over the previous SPIKE_WINDOW steps
SPIKE_FACTOR, SPIKE_WINDOW = 2.0, 20
#: an alarm must come within this many steps before a spike's onset to count as preceding it
LEAD_WINDOW = 10
#: accuracy of the λ_max measurements (Lanczos tol); a directional ratio may exceed a Ritz value by ≤ 2·tol
LAMBDA_TOL = 1e-2


def spike_onsets(loss: np.ndarray) -> list[int]:
    """Indices t of spike onsets (see the module docs)."""
    k = SPIKE_WINDOW
    spiking = np.zeros(len(loss), bool)
    for t in range(k, len(loss)):
        spiking[t] = loss[t] > SPIKE_FACTOR * loss[t - k : t].min()
    return [t for t in range(k, len(loss)) if spiking[t] and not spiking[t - k : t].any()]


def alarms(steps: np.ndarray, ratio: np.ndarray) -> list[int]:
    """Steps where ``ratio`` crosses 1 upward between consecutive measurements."""
    return [int(steps[i]) for i in range(1, len(ratio)) if ratio[i] > 1.0 >= ratio[i - 1]]


def score(alarm_steps: list[int], onsets: list[int], n: int, window: int = LEAD_WINDOW) -> dict[str, Any]:
    """Spikes preceded, their leads, false alarms and the chance level (module docs)."""
    leads = []
    for s in onsets:
        before = [a for a in alarm_steps if s - window <= a < s]
        if before:
            leads.append(s - before[0])
    false = sum(1 for a in alarm_steps if not any(a < s <= a + window for s in onsets))
    covered = np.zeros(n + window + 1, bool)
    for a in alarm_steps:
        covered[a + 1 : a + window + 1] = True
    chance = (
        float(covered[SPIKE_WINDOW + 1 : n + 1].mean()) * len(onsets) if n > SPIKE_WINDOW else 0.0
    )  # onsets can be steps 21 … n
    return {"alarms": len(alarm_steps), "preceded": len(leads), "leads": leads, "false": false, "chance": chance}


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0], steps=1500, quick_steps=400)
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--lr", type=float, default=2e-2, help="Adam's learning rate (default 2e-2)")
    p.add_argument(
        "--window",
        type=int,
        default=LEAD_WINDOW,
        help=f"W: steps before an onset an alarm may come (default {LEAD_WINDOW})",
    )
    args = parse(p, argv, every=10, quick_every=10)
    started = time.perf_counter()

    prob = problem(seed=args.seed)
    opt = stableopt.Adam(prob.model.parameters(), lr=args.lr)
    console.print(
        f"[bold]Adam[/] (lr={args.lr:g}) on {describe(prob)}; {args.steps} full-batch steps; "
        f"directional ratios every step, λ_max every {args.every}"
    )
    opt.monitor(prob.loss_fn, every=args.every, tol=LAMBDA_TOL, directional="update")
    # the gradient direction, measured by hand after each step (.grad still holds the step's gradient)
    grad_reports = []
    train(
        opt,
        prob,
        args.steps,
        on_step=lambda t, _: grad_reports.append(opt.directional_sharpness(prob.loss_fn, "gradient")),
    )
    opt.report()

    h = opt.history
    save_history(h, args.out / "spike_predictor.safetensors")
    upd, grad = h.directional("update"), h.directional("gradient")
    steps = grad["directional_step"]
    loss = np.array([r.loss for r in grad_reports])  # L_t at θ_t for the steps t in ``steps``
    onsets = [int(steps[i]) for i in spike_onsets(loss)]
    signals = {
        "update direction (1 HVP/step)": (
            upd["directional_step"],
            upd["directional_ratio"],
            upd["directional_hvps"].sum(),
        ),
        "gradient direction (1 HVP/step)": (steps, grad["directional_ratio"], grad["directional_hvps"].sum()),
        f"λ_max ratio every {args.every} steps": (h.column("step"), h.column("ratio"), h.column("hvps").sum()),
    }
    scores = {name: score(alarms(s, r), onsets, args.steps, args.window) for name, (s, r, _) in signals.items()}

    def lead_text(leads: list[int]) -> str:
        return f"{int(np.median(leads))} ({min(leads)}–{max(leads)})" if leads else "—"

    console.print(
        f"{len(onsets)} spikes (L_t > {SPIKE_FACTOR:g}× its minimum over the previous {SPIKE_WINDOW} steps), "
        f"onsets at steps {onsets[:12]}{' …' if len(onsets) > 12 else ''}"
    )
    table(
        f"alarms = upward crossings of ratio 1; preceded = an alarm within W = {args.window} steps before the onset",
        ["signal", "alarms", "spikes preceded", "chance", "lead, steps: median (range)", "false alarms", "HVPs"],
        [
            (
                name,
                sc["alarms"],
                f"{sc['preceded']}/{len(onsets)}",
                f"{sc['chance']:.1f}",
                lead_text(sc["leads"]),
                sc["false"],
                int(signals[name][2]),
            )
            for name, sc in scores.items()
        ],
    )
    table(
        "sensitivity to W: spikes preceded (chance) / false alarms, lead median (range)",
        ["signal", *(f"W = {w}" for w in (5, 10, 20))],
        [
            (
                name,
                *(
                    f"{(sc := score(alarms(s, r), onsets, args.steps, w))['preceded']} ({sc['chance']:.1f}) / {sc['false']}, {lead_text(sc['leads'])}"
                    for w in (5, 10, 20)
                ),
            )
            for name, (s, r, _) in signals.items()
        ],
    )

    plt = pyplot()
    fig, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=False)
    zoom = (onsets[len(onsets) // 2] - 40, onsets[len(onsets) // 2] + 15) if onsets else (1, min(args.steps, 60))
    grad_alarms = alarms(steps, grad["directional_ratio"])
    for ax, (lo, hi) in zip(axes[1:], [(1, args.steps), zoom]):
        keep = (steps >= lo) & (steps <= hi)
        ku = (upd["directional_step"] >= lo) & (upd["directional_step"] <= hi)
        lam_s, lam_r = h.column("step"), h.column("ratio")
        kl = (lam_s >= lo) & (lam_s <= hi)
        ax.plot(upd["directional_step"][ku], upd["directional_ratio"][ku], color="C1", lw=0.7, label="along the update")
        ax.plot(steps[keep], grad["directional_ratio"][keep], color="C4", lw=0.7, label="along P⁻¹g (gradient)")
        ax.plot(lam_s[kl], lam_r[kl], "o-", color="C0", ms=2.5, lw=0.8, label=f"λ_max ratio (every {args.every})")
        ax.axhline(1.0, color="black", ls="--", lw=0.8)
        ka = [a for a in grad_alarms if lo <= a <= hi]
        ax.plot(ka, [1.0] * len(ka), "v", color="C4", ms=4, label="alarm (gradient)")
        for s in onsets:
            if lo <= s <= hi:
                ax.axvline(s, color="red", alpha=0.35, lw=0.8)
        ax.set_xlim(lo, hi)
        visible = np.concatenate([upd["directional_ratio"][ku], grad["directional_ratio"][keep], lam_r[kl]])
        ax.set_ylim(0 if hi - lo > 100 else max(0.0, float(np.nanmin(visible)) - 0.05), 1.1 if hi - lo <= 100 else 1.3)
        ax.set_ylabel("ratio (1 = edge)")
    axes[1].legend(loc="lower right", fontsize=7, frameon=False, ncol=4)
    axes[2].set_title(f"zoom: steps {zoom[0]}–{zoom[1]}", fontsize=9)
    axes[2].set_xlabel("step")
    axes[0].plot(steps, loss, color="C2", lw=0.8)
    for s in onsets:
        axes[0].axvline(s, color="red", alpha=0.35, lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_xlim(1, args.steps)
    axes[0].set_ylabel("full-batch loss")
    axes[0].set_title(f"Adam lr={args.lr:g}: {len(onsets)} spikes (red lines: onsets)", fontsize=10)
    save_figure(fig, args.out / "spike_predictor.png")

    claims = Claims()
    need = 3 if args.quick else 10
    claims.check(f"the run has loss spikes (≥ {need})", len(onsets) >= need, f"{len(onsets)} spikes")
    lam = dict(zip(h.column("step").tolist(), h.column("ratio").tolist()))
    for kind, cols in (("update", upd), ("gradient", grad)):
        excess = [
            r / lam[s]
            for s, r in zip(cols["directional_step"].tolist(), cols["directional_ratio"].tolist())
            if s in lam
        ]
        claims.check(
            f"the {kind}-direction ratio is a lower bound of the λ_max ratio (≤ 1 + 2·tol of it)",
            bool(excess) and max(excess) <= 1 + 2 * LAMBDA_TOL,
            f"largest directional/λ_max {max(excess):.4f} over {len(excess)} steps",
        )
    g, u = scores["gradient direction (1 HVP/step)"], scores["update direction (1 HVP/step)"]
    claims.check(
        "gradient-direction alarms precede at least half of the spikes and ≥ 3× chance",
        g["preceded"] >= 0.5 * len(onsets) and g["preceded"] >= 3 * g["chance"],
        f"{g['preceded']}/{len(onsets)} (chance {g['chance']:.1f}), lead {lead_text(g['leads'])}",
    )
    claims.check(
        "the update direction precedes fewer spikes than the gradient direction",
        u["preceded"] < g["preceded"],
        f"{u['preceded']} vs {g['preceded']}",
    )
    return claims.exit(started)


if __name__ == "__main__":
    sys.exit(main())
