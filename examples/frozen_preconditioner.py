"""Freeze Adam's preconditioner at its edge and it behaves like GD: held at its threshold.

Adam trains the docs/science.md network full batch (digits, tanh MLP 64-128-128-10, MSE, η = 1e-3)
for ``--freeze-at`` steps (default 400, where λ_max(P⁻¹H) first meets 38/η). From that
checkpoint two branches continue:

* **Adam**, unchanged: λ_max(P⁻¹H) hovers at 38/η and the raw sharpness λ_max(H) keeps rising,
  because P = √v̂ + ε keeps adapting.
* **Adam with P frozen** at P₀ = √v̂ + ε of the checkpoint: θ ← θ − η·m̂/P₀, the same momentum
  m ← β1·m + (1 − β1)·g carried over from Adam. This is a *non-adaptive* preconditioned
  momentum method. It is exactly torch's SGD with momentum = dampening = β1 run on the
  gradient P₀⁻¹g (buf ← β1·buf + (1 − β1)·P₀⁻¹g = P₀⁻¹m), so it is written below as a small
  subclass of ``stableopt.SGD`` whose preconditioner is P₀; its threshold, from the library's
  own table, is (2 + 2β1)/((1 − β1)η) = 38/η — Adam's. With P₀ fixed the linear stability
  analysis behind that number is exact, and the method is GD in the coordinates P₀^{1/2}θ
  (with momentum): when it meets the threshold it is thrown back (a catapult: a loss spike, the
  sharpness drops) and afterwards stays just below it; its raw sharpness stays where it was.

Why not just set Adam's β2 to 1? torch divides v by its bias correction 1 − β2ᵗ, which is then
0: the update becomes m̂/∞ = 0 and training stops. β2 = 1 − δ does not freeze v either (v̂ is
renormalised every step). The subclass is the honest "Adam with v̂ frozen": its first step is
checked against that formula (up to m's bias correction, 1 − 0.9⁴⁰⁰ ≈ 1).

Freezing earlier is instructive too: frozen at step 200 (ratio 0.53) the method never reaches
its edge — its ratio levels off near 0.78 while raw sharpness saturates — so on this problem it
is P *shrinking* that carries Adam the rest of the way to 38/η.

Checks: the frozen branch never exceeds its threshold by more than 10 %, its median ratio over
the second half of its run is within [0.85, 1.05] (held at the edge, from below), its raw
sharpness never rises more than 10 % above its first value, while Adam's grows by more than
10 % over the same steps. With --quick (500 steps): the step check, the frozen branch stays
≤ 1.1 and ends less sharp than Adam.

    python examples/frozen_preconditioner.py                 # 1500 steps, frozen at step 400
    python examples/frozen_preconditioner.py --freeze-at 200 # freeze while still sharpening
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from _common import Claims, console, describe, parse, parser, problem, pyplot, save_figure, save_history, table, train

import stableopt

LR, BETA1 = 1e-3, 0.9


@dataclass(frozen=True)
class FrozenRule(stableopt.rules.SGDRule):
    """SGD's thresholds, with the frozen P₀ (set by :meth:`FrozenPreconditionerAdam.freeze`)."""

    needs_state: bool = True  # no preconditioner before freeze()

    def preconditioner(self, param, state, group):
        return state["frozen_preconditioner"]


class FrozenPreconditionerAdam(stableopt.SGD, rule=FrozenRule()):
    """θ ← θ − η·m̂/P₀: SGD with momentum = dampening = β1 on P₀⁻¹g, P₀ fixed by :meth:`freeze`.

    ``step()`` divides ``p.grad`` by P₀ in place before torch's SGD step; the preconditioner the
    sharpness measurements pair with H is P₀ (the rule above), and the threshold is SGD's with
    dampening, (2 + 2β1)/((1 − β1)η) = 38/η.
    """

    def freeze(self, preconditioner, exp_avg):
        """Fix P₀ (one tensor per parameter) and start from Adam's bias-corrected momentum m̂."""
        params = [p for group in self.param_groups for p in group["params"]]
        for p, p0, m in zip(params, preconditioner, exp_avg):
            self.state[p]["frozen_preconditioner"] = p0.clone()
            self.state[p]["momentum_buffer"] = m / p0

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(self.state[p]["frozen_preconditioner"])
        return super().step(closure)


def frozen_branch(prob_model, adam: stableopt.Adam) -> FrozenPreconditionerAdam:
    """The frozen-preconditioner method continuing ``adam``'s run on ``prob_model``."""
    t = adam.steps_taken
    exp_avg = [adam.state[p]["exp_avg"] / (1 - BETA1**t) for p in adam.param_groups[0]["params"]]
    frozen = FrozenPreconditionerAdam(prob_model.parameters(), lr=LR, momentum=BETA1, dampening=BETA1)
    frozen.freeze(adam.preconditioner(), exp_avg)
    return frozen


def check_one_step(prob, adam: stableopt.Adam) -> float:
    """Largest difference between one frozen step and θ − η·m̂/P₀ by hand (Adam's rule, v̂ fixed)."""
    model = copy.deepcopy(prob.model)
    frozen = frozen_branch(model, adam)
    theta = [p.detach().clone() for p in model.parameters()]
    loss = prob.criterion(model(prob.x), prob.y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    frozen.step()
    t = adam.steps_taken + 1
    worst = 0.0
    adam_params = adam.param_groups[0]["params"]
    for p, th, g, q, p0 in zip(model.parameters(), theta, grads, adam_params, adam.preconditioner()):
        m = BETA1 * adam.state[q]["exp_avg"] + (1 - BETA1) * g
        expected = th - LR * (m / (1 - BETA1**t)) / p0
        worst = max(worst, float((p.detach() - expected).abs().max() / expected.abs().max()))
    return worst


def main(argv=None) -> int:
    p = parser(__doc__.split("\n\n")[0], steps=1500, quick_steps=500)
    p.epilog = __doc__.split("\n\n", 1)[1]
    p.add_argument("--freeze-at", type=int, default=400, help="step at which P is frozen (default 400)")
    args = parse(p, argv, every=10, quick_every=20)
    started = time.perf_counter()
    t0 = args.freeze_at
    if not 0 < t0 < args.steps:
        p.error(f"--freeze-at must be between 1 and --steps - 1 ({args.steps - 1}), got {t0}")

    prob = problem(seed=args.seed)
    adam = stableopt.Adam(prob.model.parameters(), lr=LR, betas=(BETA1, 0.999))
    adam.monitor(prob.loss_fn, every=args.every, raw=True)
    train(adam, prob, t0)

    # the branch point: a copy of the model and the frozen method continuing from it
    twin = problem(seed=args.seed)
    twin.model.load_state_dict(prob.model.state_dict())
    step_error = check_one_step(prob, adam)
    frozen = frozen_branch(twin.model, adam)
    frozen.monitor(twin.loss_fn, every=args.every, raw=True)
    console.print(f"{describe(prob)}; P frozen at step {t0}")

    tic = time.perf_counter()
    train(adam, prob, args.steps - t0)
    console.print(f"Adam branch: {args.steps - t0} steps in {time.perf_counter() - tic:.1f} s")
    tic = time.perf_counter()
    train(frozen, twin, args.steps - t0)
    console.print(f"frozen branch: {args.steps - t0} steps in {time.perf_counter() - tic:.1f} s")
    save_history(adam.history, args.out / "frozen_preconditioner_adam.safetensors")
    save_history(frozen.history, args.out / "frozen_preconditioner_frozen.safetensors")

    a, f = adam.history, frozen.history
    a_step, a_ratio, a_raw = a.column("step"), a.column("ratio"), a.column("raw")
    f_step, f_ratio, f_raw = f.column("step") + t0, f.column("ratio"), f.column("raw")
    a_same = a_raw[a_step >= f_step[0]]  # Adam over the frozen branch's measured steps
    f_late = f_ratio[f_step > (t0 + args.steps) // 2]
    table(
        f"from the freeze (step {t0}) to step {args.steps}",
        ["", "Adam (adaptive P)", "Adam, P frozen"],
        [
            ("threshold", f"{a.column('threshold')[-1]:,.0f}", f"{f.column('threshold')[-1]:,.0f}"),
            (
                "ratio at the freeze",
                f"{a_ratio[np.argmin(abs(a_step - t0))]:.3f}",
                f"{f_ratio[0]:.3f} at step {int(f_step[0])}",
            ),
            (
                "median ratio, 2nd half of the branch",
                f"{np.median(a_ratio[a_step > (t0 + args.steps) // 2]):.3f}",
                f"{np.median(f_late):.3f}",
            ),
            (
                f"raw λ_max(H) from step {int(f_step[0])} → end",
                f"{a_same[0]:.2f} → {a_same[-1]:.2f}",
                f"{f_raw[0]:.2f} → {f_raw[-1]:.2f}",
            ),
            ("max raw λ_max(H)", f"{a_same.max():.2f}", f"{f_raw.max():.2f}"),
            ("final loss", f"{a.column('loss')[-1]:.5f}", f"{f.column('loss')[-1]:.5f}"),
        ],
    )

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.2))
    for ax, (ya, yf, title) in zip(
        axes,
        [
            (a_ratio, f_ratio, "λ_max(P⁻¹H) / (38/η)"),
            (a_raw, f_raw, "raw sharpness λ_max(H)"),
            (a.column("loss"), f.column("loss"), "training loss"),
        ],
    ):
        ax.plot(a_step, ya, color="C3", label="Adam")
        ax.plot(f_step, yf, color="C0", label=f"P frozen at step {t0}")
        ax.axvline(t0, color="gray", lw=0.8, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
    axes[0].axhline(1.0, color="black", ls="--", lw=1.0)
    axes[0].set_ylim(0, 1.4)
    axes[0].legend(fontsize=7, frameon=False, loc="lower right")
    axes[1].set_ylim(bottom=0)
    axes[2].set_yscale("log")
    save_figure(fig, args.out / "frozen_preconditioner.png")

    claims = Claims()
    claims.check(
        "the frozen method is Adam's step with v̂ fixed", step_error < 1e-5, f"relative difference {step_error:.1e}"
    )
    claims.check(
        "P frozen: never pushed above its threshold (max ratio ≤ 1.1)", f_ratio.max() <= 1.1, f"max {f_ratio.max():.3f}"
    )
    if args.quick:
        claims.check(
            "P frozen: ends less sharp than Adam",
            f_raw[-1] < a_raw[-1],
            f"raw λ_max(H) {f_raw[-1]:.2f} vs {a_raw[-1]:.2f}",
        )
    else:
        rise, a_rise = f_raw.max() / f_raw[0] - 1, a_same[-1] / a_same[0] - 1
        claims.check(
            "P frozen: held at the edge from below (median ratio in [0.85, 1.05])",
            0.85 <= np.median(f_late) <= 1.05,
            f"median {np.median(f_late):.3f}, range {f_late.min():.3f}–{f_late.max():.3f}",
        )
        claims.check(
            "P frozen: raw sharpness never > 10 % above its first value",
            rise < 0.10,
            f"{f_raw[0]:.2f} → max {f_raw.max():.2f} ({100 * rise:+.0f} %)",
        )
        claims.check(
            "Adam: raw sharpness keeps rising over the same steps (> 10 %)",
            a_rise > 0.10,
            f"{a_same[0]:.2f} → {a_same[-1]:.2f} ({100 * a_rise:+.0f} %)",
        )
    return claims.exit(started)


if __name__ == "__main__":
    sys.exit(main())
