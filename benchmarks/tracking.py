"""Tracking mode (``opt.monitor(loss_fn, every=1, budget=b)``) against full measurements.

Two problems, full-batch Adam (lr 1e-3) from the start of training: the docs/science.md digits MLP
(64-128-128-10 tanh, 1000 samples; 1500 steps, 300 with ``--quick``), which sharpens to the
edge by step ~400 and stays there, and the benchmark "mlp" from its GD-200 state (600 steps;
"mlp-quick", 300 steps, with ``--quick``).

Copies of the model train side by side, one step each in turn (as in end_to_end.py, so drift of
a shared machine hits them alike): no monitor, tracking monitors with b = 1, 2 and 4, and a
monitor with a full measurement every 100 steps (the library default tol 1e-3), and, as a middle
ground, tracking with b = 2 every 10 steps ("b=2/10"). Monitoring does
not perturb training, so every copy follows the same trajectory bit for bit (checked), and every
``REF_EVERY`` steps one tight solve on the unmonitored copy (tol ``REF_TOL``, not timed) is the
reference for all of them at that step. Reported per configuration:

* the relative error of the tracked ratio against the reference at the same steps (median, 90th
  percentile, max), for the first ``WARMUP`` steps (convergence from the random first start),
  after them, and in the second half of the run (the digits run is at the edge by then);
* for every=100, the error of its latest measurement *as held* until the next one (what a user
  sees between measurements) and at its own steps;
* the overhead: the copy's training time over the unmonitored copy's, minus 1, in %.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
from common import CLOCK_NAME, QUICK, clock, save, trained_mlp

import stableopt
from stableopt.demo import digits_data, make_mlp, mse_loss

BUDGETS = (1, 2, 4)
#: (label, every, budget) of the tracking configurations
TRACKING = [*((f"b={b}", 1, b) for b in BUDGETS), ("b=2/10", 10, 2)]
REF_EVERY = 10
REF_TOL = 1e-6
TRACKING_LABELS = [label for label, _, _ in TRACKING]
#: errors in the first this-many steps are reported apart (the tracker starts from a random vector)
WARMUP = 100


def _problems() -> list[tuple[str, torch.nn.Module, Callable, int]]:
    x, y, source = digits_data()
    digits = make_mlp(seed=0)
    pb = trained_mlp(QUICK)
    return [
        ("digits", digits, lambda model: mse_loss(model(x), y), 300 if QUICK else 1500),
        (pb.name, pb.model, lambda model, pb=pb: pb.loss_of_output(model(pb.x), pb.y), 300 if QUICK else 600),
    ]


def _quantiles(errors: list[float]) -> dict:
    if not errors:
        return {"n": 0}
    s = sorted(errors)
    return {"n": len(s), "median": statistics.median(s), "p90": s[min(len(s) - 1, int(0.9 * len(s)))], "max": s[-1]}


def run(name: str, base: torch.nn.Module, loss_of, steps: int) -> dict:
    configs = ["none", *(label for label, _, _ in TRACKING), "every=100"]
    schedule = {label: (every, b) for label, every, b in TRACKING}
    copies = {}
    for c in configs:
        model = copy.deepcopy(base)
        opt = stableopt.Adam(model.parameters(), lr=1e-3)
        loss_fn = lambda model=model: loss_of(model)
        monitor = None
        if c in schedule:
            monitor = opt.monitor(loss_fn, every=schedule[c][0], budget=schedule[c][1])
        elif c == "every=100":
            monitor = opt.monitor(loss_fn, every=100)
        copies[c] = dict(model=model, opt=opt, loss_fn=loss_fn, monitor=monitor, seconds=0.0)
    refs: dict[int, float] = {}
    held: dict[int, float] = {}
    for t in range(1, steps + 1):
        for c in configs:
            cp = copies[c]
            t0 = clock()
            cp["opt"].zero_grad(set_to_none=True)
            cp["loss_fn"]().backward()
            cp["opt"].step()
            cp["seconds"] += clock() - t0
        if t % REF_EVERY == 0:
            plain = copies["none"]
            for c in configs[1:]:  # monitoring must not have changed the trajectory
                assert all(
                    torch.equal(a, b) for a, b in zip(plain["model"].parameters(), copies[c]["model"].parameters())
                ), c
            refs[t] = plain["opt"].sharpness(plain["loss_fn"], tol=REF_TOL, max_iters=300).ratio
            last = copies["every=100"]["monitor"].last
            held[t] = last.ratio if last is not None else float("nan")
        if t % max(1, steps // 10) == 0:
            print(f"  {name} step {t}/{steps}: ratio {refs.get(t, float('nan')):.4f}", flush=True)
    base_s = copies["none"]["seconds"]
    out = {
        "steps": steps,
        "params": sum(p.numel() for p in base.parameters()),
        "seconds_unmonitored": base_s,
        "configs": {},
    }
    for c in configs[1:]:
        cp = copies[c]
        row = {"overhead_pct": 100 * (cp["seconds"] / base_s - 1), "seconds": cp["seconds"]}
        h = cp["opt"].history
        if c in schedule:
            tr = h.tracking()
            value = dict(zip(tr["track_step"].tolist(), tr["track_ratio"].tolist()))
            hvps = tr["track_hvps"].tolist()
            row["hvps_per_step_max"] = max(hvps)
            row["hvps_per_step_mean"] = statistics.fmean(hvps)
            errs = {t: abs(value[t] - r) / r for t, r in refs.items()}
            row["error_warmup"] = _quantiles([e for t, e in errs.items() if t <= WARMUP])
            row["error_after"] = _quantiles([e for t, e in errs.items() if t > WARMUP])
            row["error_second_half"] = _quantiles([e for t, e in errs.items() if t > steps // 2])
            row["residual_after_median"] = statistics.median(
                [float(x) for s, x in zip(tr["track_step"].tolist(), tr["track_residual"].tolist()) if s > WARMUP]
                or [float("nan")]
            )
        else:
            own = dict(zip(h["step"].tolist(), h["ratio"].tolist()))
            row["error_at_its_steps"] = _quantiles([abs(own[t] - r) / r for t, r in refs.items() if t in own])
            row["error_held"] = _quantiles(
                [abs(held[t] - r) / r for t, r in refs.items() if t >= 100 and held[t] == held[t]]
            )
            row["error_held_second_half"] = _quantiles(
                [abs(held[t] - r) / r for t, r in refs.items() if t > steps // 2]
            )
            row["hvps_per_measurement_mean"] = statistics.fmean(h["hvps"].tolist())
        out["configs"][c] = row
    out["reference_ratio"] = {str(t): r for t, r in refs.items()}
    return out


def _fmt(q: dict) -> str:
    return "—" if not q.get("n") else f"{q['median']:.1e} / {q['p90']:.1e} / {q['max']:.1e}"


def main() -> None:
    results = {}
    for name, model, loss_of, steps in _problems():
        print(f"== {name}: {steps} steps ==", flush=True)
        results[name] = run(name, model, loss_of, steps)
    print(
        f"\nerrors: relative error of the ratio vs a tol-{REF_TOL:g} solve every {REF_EVERY} steps, median / p90 / max; clock: {CLOCK_NAME}"
    )
    for name, r in results.items():
        print(f"\n{name} ({r['params']:,} parameters, {r['steps']} steps)")
        print(
            f"  {'config':<10} {'overhead':>9}  {'HVPs':>4}  {f'error, steps ≤ {WARMUP}':<26} {'error after':<26} {'error, 2nd half':<26}"
        )
        for c, row in r["configs"].items():
            if c in TRACKING_LABELS:
                print(
                    f"  {c:<10} {row['overhead_pct']:8.1f}%  {row['hvps_per_step_max']:>4}  {_fmt(row['error_warmup']):<26} {_fmt(row['error_after']):<26} {_fmt(row['error_second_half']):<26}"
                )
            else:
                print(
                    f"  {c:<10} {row['overhead_pct']:8.1f}%  {'—':>4}  at its steps {_fmt(row['error_at_its_steps'])}; held {_fmt(row['error_held'])}, 2nd half {_fmt(row['error_held_second_half'])}"
                )
    save(
        "tracking",
        {
            "budgets": list(BUDGETS),
            "tracking": TRACKING,
            "ref_every": REF_EVERY,
            "ref_tol": REF_TOL,
            "warmup": WARMUP,
            "problems": results,
        },
    )


if __name__ == "__main__":
    main()
