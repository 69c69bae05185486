"""Benchmark 2: the cost of one Hessian-vector product in gradients, by route, and its memory.

Routes, all on the same batch and parameters (float32):

* ``grad``: one gradient, forward + backward (the unit);
* ``reuse``: double backward through a gradient graph built once (``stableopt.make_hvp``; the
  one-off graph build is reported separately as ``reuse_build``);
* ``fresh``: a new forward and gradient graph for every product, then double backward;
* ``func``: ``torch.func`` forward-over-reverse, ``jvp(grad(f))`` with ``functional_call``
  (hand-written MSE: ``nn.MSELoss`` fails under jvp(grad), pytorch issue 123996).

Times are medians of interleaved rounds; memory is the peak resident set above the level before
the call (see ``common.peak_memory``). This measurement decides the HVP route of the engine.
"""

from __future__ import annotations

import time

import common
import torch
from common import QUICK, interleaved, make_cnn, peak_memory, save, target, trained_mlp
from torch.func import functional_call, grad, jvp

import stableopt

common.exact_rss_malloc()  # this script measures peak memory: exact RSS (see common.exact_rss_malloc)


def routes(pb):
    params = pb.params
    names = [n for n, p in pb.model.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g) for p in params]
    hvp = stableopt.make_hvp(pb.loss_fn, params)

    def f_grad():
        return torch.autograd.grad(pb.loss_fn(), params)

    def f_reuse():
        return hvp(v)

    def f_build():
        return stableopt.make_hvp(pb.loss_fn, params)

    def f_fresh():
        return stableopt.hessian_vector_product(pb.loss_fn, params, v)

    primals = {n: p.detach() for n, p in zip(names, params)}
    tangents = dict(zip(names, v))

    def loss_of(pdict):
        return pb.loss_of_output(functional_call(pb.model, pdict, (pb.x,)), pb.y)

    def f_func():
        return jvp(grad(loss_of), (primals,), (tangents,))[1]

    return {"grad": f_grad, "reuse": f_reuse, "reuse_build": f_build, "fresh": f_fresh, "func": f_func}


def agree(fns) -> float:
    """Largest relative difference between the three HVP routes (sanity check)."""
    a = torch.cat([t.reshape(-1) for t in fns["reuse"]()])
    b = torch.cat([t.reshape(-1) for t in fns["fresh"]()])
    c = torch.cat([t.reshape(-1) for t in fns["func"]().values()])
    return float(max((a - b).norm(), (a - c).norm()) / a.norm())


def bench(pb, rounds: int, number: int) -> dict:
    fns = routes(pb)
    err = agree(fns)
    t = interleaved(fns, rounds=rounds, number=number)
    mem = {k: peak_memory(fn)[0] for k, fn in fns.items() if k != "reuse_build"}
    # the reused graph's own memory: build it inside the measured call
    mem["reuse_incl_graph"] = peak_memory(lambda: fns["reuse_build"]()(routes_v(pb)))[0]
    row = {
        "problem": pb.name,
        "n_params": pb.n_params,
        "seconds": t,
        "route_max_rel_diff": err,
        "x_gradient": {k: t[k] / t["grad"] for k in t if k != "grad"},
        "peak_bytes": mem,
    }
    print(f"{pb.name} ({pb.n_params} params): gradient {t['grad'] * 1e3:.1f} ms; routes agree to {err:.1e}")
    for k in ("reuse", "fresh", "func", "reuse_build"):
        print(f"  {k:12s} {t[k] * 1e3:8.1f} ms = {t[k] / t['grad']:.2f} × gradient")
    print("  peak memory above baseline (MB): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in mem.items()))
    return row


def routes_v(pb):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(p.shape, generator=g) for p in pb.params]


def main() -> dict:
    t0 = time.perf_counter()
    rows = [bench(trained_mlp(QUICK), rounds=3 if QUICK else 7, number=2 if QUICK else 3)]
    rows.append(bench(make_cnn(quick=True), rounds=3 if QUICK else 5, number=1))
    mlp = rows[0]
    best = min(("reuse", "fresh", "func"), key=lambda k: mlp["x_gradient"][k])
    print(f"fastest HVP route on {mlp['problem']}: {best} (engine uses 'reuse')")
    targets = [
        target(
            f"HVP / gradient on {mlp['problem']} (engine route: reuse)", mlp["x_gradient"]["reuse"], 2.5, fmt="{:.2f}"
        )
    ]
    return save("hvp", dict(rows=rows, fastest_route=best, targets=targets, seconds=time.perf_counter() - t0))


if __name__ == "__main__":
    main()
