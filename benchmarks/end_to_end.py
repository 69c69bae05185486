"""Benchmark 5: training time with a sharpness monitor every 1, 10 and 100 steps against none.

Full-batch Adam on the "mlp" problem (from its GD-200 state). Each monitored run and an
unmonitored run of the same length start from identical copies of the model; the overhead is
(time monitored / time unmonitored) − 1, with the unmonitored run timed before and after the
monitored one and averaged. Uses ``opt.monitor(loss_fn, every=N)`` when this build has it, else
calls ``opt.sharpness`` every N steps by hand (noted in the output). Runs with a monitor every
step or every 10 steps are shorter than the every-100 run; the overhead is a per-step ratio.
"""

from __future__ import annotations

import copy
import time

import torch

from common import CLOCK_NAME, QUICK, clock, save, target, trained_mlp

import stableopt


def train(pb, model, steps: int, every: int | None) -> tuple[float, int, list[int]]:
    x, y = pb.x, pb.y

    def loss_fn():
        return pb.loss_of_output(model(x), y)

    opt = stableopt.Adam(model.parameters(), lr=1e-3)
    use_monitor = every is not None and hasattr(opt, "monitor")
    if use_monitor:
        opt.monitor(loss_fn, every=every)
    measured = 0
    t0 = clock()
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
        if every is not None and not use_monitor and t % every == 0:
            opt.sharpness(loss_fn)
    secs = clock() - t0
    hvps: list[int] = []
    if use_monitor:
        measured = len(opt.history) if hasattr(opt, "history") else steps // every
        if measured:
            hvps = [int(h) for h in opt.history["hvps"]]
    elif every is not None:
        measured = steps // every
    return secs, measured, hvps


def main() -> dict:
    t0 = time.perf_counter()
    pb = trained_mlp(QUICK)
    has_monitor = hasattr(stableopt.Adam([torch.nn.Parameter(torch.zeros(1))]), "monitor")
    if not has_monitor:
        print("  note: this build has no opt.monitor(); measuring with opt.sharpness() every N steps by hand")
    # the every-100 run is long enough (five measurements, the first of them cold) to show
    # what a monitor costs over a training run rather than what its first, cold, solve costs
    plan = [(100, 500), (10, 50), (1, 10)] if QUICK else [(100, 500), (10, 40), (1, 8)]
    rows, targets = [], []
    for every, steps in plan:
        base1, _, _ = train(pb, copy.deepcopy(pb.model), steps, None)
        mon, measured, hvps = train(pb, copy.deepcopy(pb.model), steps, every)
        base2, _, _ = train(pb, copy.deepcopy(pb.model), steps, None)
        base = (base1 + base2) / 2
        overhead = mon / base - 1
        rows.append(dict(every=every, steps=steps, measurements=measured, seconds_monitored=mon,
                         seconds_unmonitored=[base1, base2], overhead=overhead, hvps=hvps))
        print(f"  every {every:3d} ({steps} steps, {measured} measurements): {mon:.2f} s vs {base:.2f} s "
              f"unmonitored → overhead {overhead*100:+.1f}%, HVPs per measurement {hvps}  [{CLOCK_NAME}]")
    every100 = rows[0]["overhead"]
    targets.append(target("end-to-end overhead, monitor every 100 steps", every100, 0.05, fmt="{:.3f}"))
    return save("end_to_end", dict(problem=pb.name, has_monitor=has_monitor, rows=rows, targets=targets,
                                   seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
