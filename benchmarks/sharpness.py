"""Benchmark 3: cost and accuracy of a sharpness measurement, cold and warm-started in training.

At the ANCHORS "mlp" state (200 GD steps; P from 10 Adam steps after it) every stopping rule
and tolerance is run cold several times (each call draws a new start vector) and compared with a
float64 Lanczos reference at tol 1e-9. Then Adam trains on and a warm-started measurement is
taken every few steps, for each stopping rule from its own warm-start vectors; every warm
estimate is checked against a fresh cold float32 solve at tol 1e-5 (rigorous residual bound),
so a warm start that locked onto a no-longer-top eigenvector shows up as an error.
"""

from __future__ import annotations

import dataclasses
import time

import common
import torch
from common import (
    CLOCK_NAME,
    QUICK,
    adam_state,
    clock,
    flat_preconditioner,
    make_cnn,
    peak_memory,
    reference_eigs,
    save,
    target,
    trained_mlp,
)

import stableopt
import stableopt.sharpness as S

common.exact_rss_malloc()  # this script measures peak memory: exact RSS (see common.exact_rss_malloc)


def measure(opt, pb, *, bound: str, tol: float, warm: dict | None, raw: bool = False):
    """One ``opt.sharpness`` call with the given stopping rule and warm-start dict.

    ``bound`` is "residual" or "gap" (that rule for cold and warm solves alike) or "default"
    (the library's choice: ``S.STOP_BOUND`` cold, ``S.WARM_STOP_BOUND`` warm)."""
    saved = S.STOP_BOUND, S.WARM_STOP_BOUND, opt.warm_starts
    if bound != "default":
        S.STOP_BOUND = S.WARM_STOP_BOUND = bound
    opt.warm_starts = {} if warm is None else warm
    try:
        t0 = clock()
        rep = opt.sharpness(pb.loss_fn, tol=tol, raw=raw)
        return dataclasses.replace(rep, seconds=clock() - t0)  # the benchmarks' clock
    finally:
        S.STOP_BOUND, S.WARM_STOP_BOUND, opt.warm_starts = saved


def cold_table(pb, opt, ref_pre: float, ref_raw: float, repeats: int) -> list[dict]:
    rows = []
    settings = (
        [("residual", 1e-3), ("gap", 1e-3)]
        if QUICK
        else [("residual", 1e-3), ("residual", 1e-2), ("gap", 1e-3), ("gap", 1e-2)]
    )
    sgd = stableopt.SGD(pb.params, lr=0.05)  # P = I: λ_max(H)
    for which, o, ref in [("preconditioned", opt, ref_pre), ("raw", sgd, ref_raw)]:
        for bound, tol in settings:
            for _r in range(repeats):
                rep = measure(o, pb, bound=bound, tol=tol, warm=None)
                err = abs(rep.preconditioned - ref) / abs(ref)
                rows.append(
                    dict(
                        quantity=which,
                        bound=bound,
                        tol=tol,
                        hvps=rep.hvps,
                        seconds=rep.seconds,
                        rel_error=err,
                        converged=rep.converged,
                    )
                )
                print(
                    f"  cold {which:14s} {bound:8s} tol={tol:g}: {rep.hvps:3d} HVPs {rep.seconds:6.2f} s "
                    f"rel.err {err:.1e}"
                )
    return rows


def warm_run(pb, opt, *, steps: int, every: int, tol: float, bounds: list[str]) -> list[dict]:
    warms = {b: {} for b in bounds}
    rows = []
    for b in bounds:  # first (cold) measurement of each rule seeds its warm dict
        measure(opt, pb, bound=b, tol=tol, warm=warms[b])
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        pb.loss_fn().backward()
        opt.step()
        if t % every:
            continue
        opt.zero_grad(set_to_none=True)
        ref = measure(opt, pb, bound="residual", tol=1e-5, warm=None)
        for b in bounds:
            rep = measure(opt, pb, bound=b, tol=tol, warm=warms[b])
            err = abs(rep.preconditioned - ref.preconditioned) / abs(ref.preconditioned)
            rows.append(
                dict(
                    step=opt.steps_taken,
                    bound=b,
                    hvps=rep.hvps,
                    seconds=rep.seconds,
                    value=rep.preconditioned,
                    reference=ref.preconditioned,
                    second=ref.eigenvalues[0] if len(ref.eigenvalues) == 1 else ref.eigenvalues[1],
                    rel_error=err,
                    converged=rep.converged,
                )
            )
            print(
                f"  warm step {opt.steps_taken:4d} {b:8s}: {rep.hvps:3d} HVPs {rep.seconds:5.2f} s "
                f"λ={rep.preconditioned:.6g} ref={ref.preconditioned:.6g} rel.err {err:.1e}"
            )
    return rows


def memory(pb, opt) -> dict:
    """Peak memory of one full-batch training step and of one cold and one warm measurement.

    ``*_extra``: peak resident bytes above the level before the call, with the model, the data,
    the gradients and the Adam state already held. ``*_in_use``: that plus what training keeps
    resident anyway (parameters, gradients, Adam's two moments: 4 × parameter bytes, and the
    data set): the memory a training step needs in total versus a measurement. The target is
    judged on the in-use ratio; both are recorded.
    """

    def train_step():
        opt.zero_grad(set_to_none=False)
        pb.loss_fn().backward()
        opt.step()

    train_step()
    step_peak = min(peak_memory(train_step)[0] for _ in range(3))
    saved = opt.warm_starts
    opt.warm_starts = {}
    cold_peak = peak_memory(lambda: opt.sharpness(pb.loss_fn))[0]
    warm_peak = peak_memory(lambda: opt.sharpness(pb.loss_fn))[0]
    opt.warm_starts = saved
    opt.zero_grad(set_to_none=True)
    resident = 4 * 4 * pb.n_params + pb.x.numel() * pb.x.element_size() + pb.y.numel() * pb.y.element_size()
    out = dict(
        problem=pb.name,
        train_step_extra=step_peak,
        cold_measurement_extra=cold_peak,
        warm_measurement_extra=warm_peak,
        resident_training_state=resident,
        ratio_extra=cold_peak / max(step_peak, 1),
        ratio_in_use=(resident + cold_peak) / (resident + step_peak),
    )
    print(
        f"  {pb.name} peak memory above baseline: training step {step_peak / 1e6:.1f} MB, cold measurement "
        f"{cold_peak / 1e6:.1f} MB, warm {warm_peak / 1e6:.1f} MB; resident training state {resident / 1e6:.1f} MB "
        f"→ in-use ratio {out['ratio_in_use']:.2f}"
    )
    return out


def main() -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pb = trained_mlp(QUICK)
    opt = adam_state(pb, steps=10)
    d = flat_preconditioner(opt)
    ref_pre = reference_eigs(pb, d, tol=1e-8)
    ref_raw = reference_eigs(pb, None, tol=1e-8)
    print(
        f"{pb.name}: {pb.n_params} params; reference λ_max(P⁻¹H)={ref_pre[0]:.8g} (λ2/λ1={ref_pre[1] / ref_pre[0]:.3f}), "
        f"λ_max(H)={ref_raw[0]:.8g} (λ2/λ1={ref_raw[1] / ref_raw[0]:.3f}) [{time.perf_counter() - t0:.0f} s]"
    )
    cold = cold_table(pb, opt, ref_pre[0], ref_raw[0], repeats=2)
    bounds = ["residual", "gap"]  # the default is residual cold, gap warm
    warm = warm_run(pb, opt, steps=20 if QUICK else 48, every=5 if QUICK else 6, tol=1e-3, bounds=bounds)

    # the crowded-spectrum stress case (i.i.d. Gaussian inputs): cold solves only, not a target
    gauss = trained_mlp(QUICK, inputs="gaussian")
    gopt = adam_state(gauss, steps=10)
    gref_pre = reference_eigs(gauss, flat_preconditioner(gopt), k=4, tol=1e-8)
    gref_raw = reference_eigs(gauss, None, k=4, tol=1e-8)
    print(
        f"{gauss.name}: reference λ(P⁻¹H) top 4 ratios {[round(x / gref_pre[0], 4) for x in gref_pre]}, "
        f"λ(H) {[round(x / gref_raw[0], 4) for x in gref_raw]}"
    )
    crowded = cold_table(gauss, gopt, gref_pre[0], gref_raw[0], repeats=2)
    del gauss, gopt

    mem = memory(pb, opt)
    cnn = make_cnn(quick=True)
    mem_cnn = memory(cnn, adam_state(cnn, steps=3))
    default = S.STOP_BOUND
    pre_cold = [r for r in cold if r["quantity"] == "preconditioned" and r["bound"] == default and r["tol"] == 1e-3]
    w = [r for r in warm if r["bound"] == S.WARM_STOP_BOUND]
    mean = lambda xs: sum(xs) / len(xs)
    print(f"default stopping rules: {default!r} cold, {S.WARM_STOP_BOUND!r} warm, tol=1e-3")
    targets = [
        target("cold λ_max(P⁻¹H) HVPs to 1e-3 (max over starts)", max(r["hvps"] for r in pre_cold), 30, fmt="{:.0f}"),
        target("cold λ_max(P⁻¹H) worst relative error", max(r["rel_error"] for r in pre_cold), 1e-3, fmt="{:.1e}"),
        target("warm λ_max(P⁻¹H) mean HVPs", mean([r["hvps"] for r in w]), 10, fmt="{:.1f}"),
        target("warm worst relative error vs tight reference", max(r["rel_error"] for r in w), 1e-3, fmt="{:.1e}"),
        target(
            f"peak memory in use, cold measurement / training step ({pb.name})", mem["ratio_in_use"], 3.0, fmt="{:.2f}"
        ),
        target(
            f"peak memory in use, cold measurement / training step ({mem_cnn['problem']})",
            mem_cnn["ratio_in_use"],
            3.0,
            fmt="{:.2f}",
        ),
    ]
    summary = {}
    for b in bounds:
        wb = [r for r in warm if r["bound"] == b]
        summary[b] = dict(
            warm_mean_hvps=mean([r["hvps"] for r in wb]),
            warm_max_error=max(r["rel_error"] for r in wb),
            warm_mean_seconds=mean([r["seconds"] for r in wb]),
        )
        print(
            f"  warm {b:8s}: mean {summary[b]['warm_mean_hvps']:.1f} HVPs, {summary[b]['warm_mean_seconds']:.2f} s, "
            f"max rel.err {summary[b]['warm_max_error']:.1e}"
        )
    return save(
        "sharpness",
        dict(
            problem=pb.name,
            n_params=pb.n_params,
            reference_preconditioned=ref_pre,
            reference_raw=ref_raw,
            crowded=dict(
                problem="mlp-gauss" + ("-quick" if QUICK else ""),
                reference_preconditioned=gref_pre,
                reference_raw=gref_raw,
                cold=crowded,
            ),
            max_basis=S.MAX_BASIS,
            default_bound=default,
            default_warm_bound=S.WARM_STOP_BOUND,
            gap_residual_cap=stableopt.eigen.GAP_RESIDUAL_CAP,
            warm_min_iters=S.WARM_MIN_ITERS,
            warm_mix=S.WARM_MIX,
            clock=CLOCK_NAME,
            memory=[mem, mem_cnn],
            cold=cold,
            warm=warm,
            warm_summary=summary,
            targets=targets,
            seconds=time.perf_counter() - t0,
        ),
    )


if __name__ == "__main__":
    main()
