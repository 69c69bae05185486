"""Benchmark 1: cost of ``stableopt.X.step()`` against ``torch.optim.X.step()``.

Two identical models, one per optimizer, with the same fixed gradients; rounds of ``number``
steps alternate between the two and the ratio of median times is reported. Configurations:
Adam and SGD (momentum), foreach and fused implementations, an MLP and a small CNN; for
stableopt: no monitor, a monitor attached but not due (``every`` larger than the steps run),
and the lr guard on (``guard=True``), where those features exist in this build.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch
from common import QUICK, clock, make_cnn, make_mlp, save, target

import stableopt


def _grads(model, pb):
    model.zero_grad(set_to_none=True)
    pb.loss_of_output(model(pb.x), pb.y).backward()


def _ratio(make_torch, make_ours, pb, *, rounds: int, number: int) -> tuple[float, float, float]:
    m_t, m_o = copy.deepcopy(pb.model), copy.deepcopy(pb.model)
    _grads(m_t, pb)
    _grads(m_o, pb)
    opt_t, opt_o = make_torch(m_t.parameters()), make_ours(m_o.parameters())
    for o in (opt_t, opt_o):  # state allocation happens in the first step
        for _ in range(3):
            o.step()
    times = {"torch": [], "ours": []}
    for r in range(rounds):
        order = [("torch", opt_t), ("ours", opt_o)] if r % 2 == 0 else [("ours", opt_o), ("torch", opt_t)]
        for name, o in order:
            t0 = clock()
            for _ in range(number):
                o.step()
            times[name].append((clock() - t0) / number)
    # the minimum over rounds: the step's own cost, without the interruptions of a shared machine
    tt, to = min(times["torch"]), min(times["ours"])
    return to / tt, tt, to


def configs():
    lr = 1e-4
    for impl in ("foreach", "fused"):
        kw = {impl: True}
        yield (
            f"Adam-{impl}",
            (lambda p, kw=kw: torch.optim.Adam(p, lr=lr, **kw)),
            (lambda p, kw=kw, **extra: stableopt.Adam(p, lr=lr, **kw, **extra)),
        )
        if impl == "foreach" or _sgd_has_fused():
            yield (
                f"SGD-mom-{impl}",
                (lambda p, kw=kw: torch.optim.SGD(p, lr=lr, momentum=0.9, **kw)),
                (lambda p, kw=kw, **extra: stableopt.SGD(p, lr=lr, momentum=0.9, **kw, **extra)),
            )


def _sgd_has_fused() -> bool:
    try:
        torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, fused=True)
        return True
    except (TypeError, RuntimeError):
        return False


def _with_monitor(make):
    def build(params):
        opt = make(params)
        if hasattr(opt, "monitor"):
            opt.monitor(lambda: torch.zeros((), requires_grad=True), every=10**9)
        return opt

    return build


def _with_guard(make):
    def build(params):
        return make(params, guard=True)

    return build


def main() -> dict:
    t0 = time.perf_counter()
    rounds, number = (9, 20) if QUICK else (21, 20)
    torch.set_num_threads(1)  # a step is µs to ms: thread hand-offs would dominate the noise
    problems = [make_mlp(quick=QUICK), make_cnn(quick=True)]
    probe = stableopt.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    has_monitor = hasattr(probe, "monitor")
    try:
        stableopt.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3, guard=True)
        has_guard = True
    except TypeError:
        has_guard = False
    if not has_monitor:
        print("  note: this build has no opt.monitor(); the 'monitor not due' variant is skipped")
    if not has_guard:
        print("  note: this build has no guard= argument; the 'guard on' variant is skipped")
    rows, targets = [], []
    for pb in problems:
        for name, make_t, make_o in configs():
            variants = {"plain": make_o}
            if has_monitor:
                variants["monitor-not-due"] = _with_monitor(make_o)
            if has_guard:
                variants["guard"] = _with_guard(make_o)
            for variant, make in variants.items():
                ratio, tt, to = _ratio(make_t, make, pb, rounds=rounds, number=number)
                rows.append(
                    dict(
                        problem=pb.name,
                        optimizer=name,
                        variant=variant,
                        ratio=ratio,
                        torch_ms=tt * 1e3,
                        stableopt_ms=to * 1e3,
                    )
                )
                print(
                    f"  {pb.name:10s} {name:16s} {variant:16s} torch {tt * 1e3:7.3f} ms  stableopt {to * 1e3:7.3f} ms  ratio {ratio:.3f}"
                )
    for variant in sorted({r["variant"] for r in rows}):
        worst = max(r["ratio"] for r in rows if r["variant"] == variant)
        med = statistics.median(r["ratio"] for r in rows if r["variant"] == variant)
        targets.append(target(f"step overhead, {variant}: median over configs (worst {worst:.3f})", med, 1.02))
    return save(
        "step_overhead",
        dict(
            rows=rows,
            has_monitor=has_monitor,
            has_guard=has_guard,
            rounds=rounds,
            number=number,
            targets=targets,
            seconds=time.perf_counter() - t0,
        ),
    )


if __name__ == "__main__":
    main()
