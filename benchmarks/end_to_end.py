"""Benchmark 5: training time with a sharpness monitor every 1, 10 and 100 steps against none.

Full-batch Adam on the "mlp" problem (from its GD-200 state). A monitored run
(``opt.monitor(loss_fn, every=N)``) and an unmonitored one start from identical copies of the
model and train side by side, alternating step by step (see :func:`paired`); the overhead is
(time monitored / time unmonitored) − 1. Runs with a monitor every step or every 10 steps are
shorter than the every-100 run; the overhead is a per-step ratio.
"""

from __future__ import annotations

import copy
import time

from common import CLOCK_NAME, QUICK, clock, save, target, trained_mlp

import stableopt


def paired(pb, steps: int, every: int) -> dict:
    """Train two identical copies side by side, one with ``opt.monitor(every=...)`` and one
    without, alternating step by step and timing each step of each; drift of a shared machine
    (other tenants, frequency) then hits both runs alike, where two runs one after the other
    differed by up to 7% between identical unmonitored runs."""
    runs = {}
    for name in ("monitored", "unmonitored"):
        model = copy.deepcopy(pb.model)
        opt = stableopt.Adam(model.parameters(), lr=1e-3)

        def loss_fn(model=model):
            return pb.loss_of_output(model(pb.x), pb.y)

        if name == "monitored":
            opt.monitor(loss_fn, every=every)
        runs[name] = (opt, loss_fn)
    seconds = {name: 0.0 for name in runs}
    for _ in range(steps):
        for name, (opt, loss_fn) in runs.items():
            t0 = clock()
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()  # the monitor's measurement, when due, runs inside this call
            seconds[name] += clock() - t0
    opt = runs["monitored"][0]
    hvps = [int(h) for h in opt.history["hvps"]] if len(opt.history) else []
    return dict(seconds=seconds, measurements=len(opt.history), hvps=hvps)


def main() -> dict:
    t0 = time.perf_counter()
    pb = trained_mlp(QUICK)
    # the every-100 run is long enough (five measurements, the first of them cold) to show
    # what a monitor costs over a training run rather than what its first, cold, solve costs
    plan = [(100, 500), (10, 50), (1, 10)] if QUICK else [(100, 500), (10, 40), (1, 8)]
    rows, targets = [], []
    for every, steps in plan:
        r = paired(pb, steps, every)
        mon, base = r["seconds"]["monitored"], r["seconds"]["unmonitored"]
        overhead = mon / base - 1
        rows.append(dict(every=every, steps=steps, measurements=r["measurements"], seconds_monitored=mon,
                         seconds_unmonitored=base, overhead=overhead, hvps=r["hvps"]))
        print(f"  every {every:3d} ({steps} steps, {r['measurements']} measurements): {mon:.2f} s vs {base:.2f} s "
              f"unmonitored → overhead {overhead*100:+.1f}%, HVPs per measurement {r['hvps']}  [{CLOCK_NAME}]")
    every100 = rows[0]["overhead"]
    targets.append(target("end-to-end overhead, monitor every 100 steps", every100, 0.05, fmt="{:.3f}"))
    return save("end_to_end", dict(problem=pb.name, has_monitor=True, paired=True, rows=rows, targets=targets,
                                   seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
