"""Benchmark 4: stableopt against the peer tools, same model, data, state and accuracy target.

Peers (installed from the ``bench`` extra with ``pip install --no-deps``; a missing one is
skipped with a message): PyHessian (power iteration on a reused gradient graph),
hessian-eigenthings (Lanczos on its HessianOperator), curvlinops' HessianLinearOperator with
scipy's ``eigsh``, and the recipe a user writes with plain torch and scipy, ``eigsh`` on a
graph-reusing double-backward HVP operator (needs only scipy). None of them reads optimizer
state, so for λ_max(P⁻¹H) each gets what a user would write today: its Hessian operator wrapped
as v ↦ D·H·(D·v) with D = P^{-1/2}.

Each peer runs a small grid of its own settings (the cheapest settings that ANCHORS.md found to
reach 1e-3) and is credited with its fastest setting that actually reaches 1e-3 relative error
here, judged against a float64 Lanczos reference — a tuning no user could do without the answer.
Every setting and every stableopt variant runs ``REPEAT`` times, interleaved round by round
(:func:`contest`), and is timed by its median.
stableopt runs with its defaults (tol=1e-3): cold (no warm vectors) and warm (during a training
run measured every few steps, the way a monitor uses it). Those are the judged ratios.

Two informational ratios say where the judged ones come from: at the *same* tolerance
(``eigsh(tol=1e-3)`` on the graph-reusing operator against stableopt's default), and with *both*
tuned (stableopt also run at ``LOOSE_TOL``, the loosest setting a peer is credited with, cold
and along the same warm run, and credited with it only if it reaches 1e-3 too).
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # first: BLAS threads
    CLOCK_NAME,
    QUICK,
    adam_state,
    clock,
    flat_preconditioner,
    reference_eigs,
    save,
    target,
    trained_mlp,
)

#: the loosest tolerance a peer is credited with (``eigsh(tol=1e-2)``); stableopt is also run at
#: it, cold and warm, for the informational "both tuned" ratios (the judged ones use its default)
LOOSE_TOL = 1e-2
#: rounds of :func:`contest`: each peer setting and stableopt variant runs once per round
REPEAT = 3


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        return self.fn(*a, **kw)


def _cleanup(pb) -> None:
    pb.model.train()
    for p in pb.model.parameters():
        p.grad = None


def run_pyhessian(pb, d, tol):
    import sys

    import pyhessian  # noqa: F401  (the package exports a class that shadows its module)

    ph = sys.modules["pyhessian.hessian"]

    original = ph.hessian_vector_product
    numels = [p.numel() for p in pb.params]

    def split(flat):
        return [c.view_as(p) for c, p in zip(flat.split(numels), pb.params)]

    def hvp(gradsH, params, v):
        if d is None:
            return original(gradsH, params, v)
        flat = torch.cat([t.reshape(-1) for t in v]) * d
        out = original(gradsH, params, split(flat))
        return split(torch.cat([t.reshape(-1) for t in out]) * d)

    counter = Counter(hvp)
    ph.hessian_vector_product = counter
    try:
        torch.manual_seed(0)
        t0 = clock()
        h = ph.hessian(pb.model, pb.loss_of_output, data=(pb.x, pb.y), cuda=False)
        eig, _ = h.eigenvalues(maxIter=200, tol=tol, top_n=1)
        secs = clock() - t0
    finally:
        ph.hessian_vector_product = original
        _cleanup(pb)
    return float(eig[0]), counter.calls, secs


def run_eigenthings(pb, d, max_iter):
    import hessian_eigenthings as he

    t0 = clock()
    op = he.HessianOperator(pb.model, [(pb.x, pb.y)], lambda model, batch: pb.loss_of_output(model(batch[0]), batch[1]))
    if d is None:
        counter = Counter(op.matvec)
    else:
        counter = Counter(lambda v: d * op.matvec(d * v))
    wrapped = he.LambdaOperator(counter, size=op.size)
    res = he.lanczos(wrapped, k=1, max_iter=max_iter, which="LA", seed=0)
    secs = clock() - t0
    _cleanup(pb)
    return float(torch.as_tensor(res.eigenvalues).reshape(-1)[0]), counter.calls, secs


class _HalfSumMSE(torch.nn.Module):
    """½‖f − y‖²/N with N the full batch: curvlinops reads ``reduction`` ("sum": no rescaling)."""

    reduction = "sum"

    def forward(self, out, y):
        return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def run_curvlinops(pb, d, ncv, tol):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    loss = _HalfSumMSE() if pb.loss_of_output.__name__ == "mse" else torch.nn.CrossEntropyLoss()
    t0 = clock()
    H = HessianLinearOperator(pb.model, loss, pb.params, [(pb.x, pb.y)], check_deterministic=False).to_scipy()
    dn = None if d is None else d.double().numpy()

    def mv(v):
        v = np.asarray(v).reshape(-1)
        if dn is None:
            return H @ v
        return dn * (H @ (dn * v))

    counter = Counter(mv)
    op = LinearOperator(H.shape, matvec=counter, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(H.shape[0]).astype(np.float32)
    val = eigsh(op, k=1, which="LA", ncv=ncv, tol=tol, v0=v0, return_eigenvectors=False)
    secs = clock() - t0
    _cleanup(pb)
    return float(val[0]), counter.calls, secs


def run_eigsh_reuse(pb, d, ncv, tol):
    """What a user writes with plain torch and scipy: the gradient graph built once
    (``create_graph=True``), each matvec a double backward through it, scipy's ``eigsh``
    (ARPACK, implicitly restarted Lanczos) on top — the issue's "scipy eigsh on a graph-reusing
    HVP operator"."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = pb.params
    numels = [p.numel() for p in params]
    n = sum(numels)
    t0 = clock()
    graph = {"grads": torch.autograd.grad(pb.loss_fn(), params, create_graph=True)}

    def mv(v):
        x = torch.from_numpy(np.asarray(v, dtype=np.float32).reshape(-1))
        if d is not None:
            x = d * x
        out = torch.autograd.grad(
            graph["grads"],
            params,
            grad_outputs=[c.view_as(p) for c, p in zip(x.split(numels), params)],
            retain_graph=True,
        )
        y = torch.cat([o.reshape(-1) for o in out])
        return (y if d is None else d * y).numpy()

    counter = Counter(mv)
    op = LinearOperator((n, n), matvec=counter, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    val = eigsh(op, k=1, which="LA", ncv=ncv, tol=tol, v0=v0, return_eigenvectors=False)
    secs = clock() - t0
    graph.clear()  # frees the gradient graph before the cleanup
    _cleanup(pb)
    return float(val[0]), counter.calls, secs


GRID = {
    "pyhessian": [dict(tol=1e-3), dict(tol=1e-4)],
    "hessian-eigenthings": [dict(max_iter=m) for m in ((10, 14) if QUICK else (12, 16, 20))],
    "curvlinops+eigsh": [dict(ncv=8, tol=1e-2), dict(ncv=8, tol=1e-3)],
    "torch graph+eigsh": [dict(ncv=8, tol=1e-2), dict(ncv=8, tol=1e-3), dict(ncv=20, tol=1e-2)],
}
RUNNERS = {
    "pyhessian": run_pyhessian,
    "hessian-eigenthings": run_eigenthings,
    "curvlinops+eigsh": run_curvlinops,
    "torch graph+eigsh": run_eigsh_reuse,
}


def ours(opt, pb, *, raw: bool, tol: float = 1e-3, warm: dict | None = None):
    """One stableopt measurement at the current state: cold (``warm=None``) or warm-started from
    the given warm-start vectors (what the optimizer held before that measurement); the
    optimizer's own warm vectors are left as they were."""
    saved = opt.warm_starts
    opt.warm_starts = {} if warm is None else {k: v.clone() for k, v in warm.items()}
    try:
        t0 = clock()
        rep = opt.sharpness(pb.loss_fn, tol=tol) if not raw else _raw(pb, tol)
        return rep, clock() - t0
    finally:
        opt.warm_starts = saved


def _raw(pb, tol):
    import stableopt

    sgd = stableopt.SGD(pb.params, lr=1.0)
    return sgd.sharpness(pb.loss_fn, tol=tol)


def warm_run(pb, opt, tol: float, every: int, steps: int) -> dict:
    """Train ``steps`` Adam steps from the current state, measuring every ``every`` steps the
    way a monitor does (the first measurement, before training, is cold and seeds the warm
    vectors). Returns the products and times along the run and the warm-start vectors held
    just before the last measurement, so that measurement can be timed again later."""
    times, hvps = [], []
    opt.sharpness(pb.loss_fn, tol=tol)
    before_last = None
    for t in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        pb.loss_fn().backward()
        opt.step()
        if t % every == 0:
            opt.zero_grad(set_to_none=True)
            before_last = {k: v.clone() for k, v in opt.warm_starts.items()}
            t0 = clock()
            rep = opt.sharpness(pb.loss_fn, tol=tol)
            times.append(clock() - t0)
            hvps.append(rep.hvps)
            print(
                f"  stableopt warm (tol={tol:g}) at step {opt.steps_taken}: {rep.hvps} HVPs {times[-1]:.2f} s "
                f"λ={rep.preconditioned:.6g}"
            )
    return dict(tol=tol, seconds=times, hvps=hvps, vectors=before_last)


def contest(pb, opt, d, ref: float, which: str, warm: dict[float, dict]) -> dict:
    """Every peer setting and every stableopt variant at the same state, ``REPEAT`` rounds,
    each round running all of them in turn (interleaved, so that a slow spell of a shared
    machine hits every contestant alike); each is credited with its median time."""
    contestants = [(tool, kw) for tool, settings in GRID.items() for kw in settings]
    contestants += [("stableopt cold", dict(tol=1e-3)), ("stableopt cold", dict(tol=LOOSE_TOL))]
    if which == "preconditioned":
        contestants += [("stableopt warm", dict(tol=1e-3)), ("stableopt warm", dict(tol=LOOSE_TOL))]
    runs: dict[int, list[dict]] = {i: [] for i in range(len(contestants))}
    skipped: dict[str, str] = {}
    for _ in range(REPEAT):
        for i, (tool, kw) in enumerate(contestants):
            if tool in skipped:
                continue
            if tool.startswith("stableopt"):
                vectors = warm[kw["tol"]]["vectors"] if tool == "stableopt warm" else None
                rep, secs = ours(opt, pb, raw=which == "raw", tol=kw["tol"], warm=vectors)
                val, hvps = rep.preconditioned, rep.hvps
            else:
                try:
                    val, hvps, secs = RUNNERS[tool](pb, d, **kw)
                except ImportError as e:
                    print(f"  {tool}: not installed ({e.name}); skipped — pip install --no-deps the bench extra")
                    skipped[tool] = str(e)
                    continue
            runs[i].append(dict(value=val, hvps=hvps, seconds=secs, rel_error=abs(val - ref) / abs(ref)))
    rows = []
    for i, (tool, kw) in enumerate(contestants):
        if tool in skipped:
            if not any(r["tool"] == tool for r in rows):
                rows.append(dict(tool=tool, setting=kw, skipped=skipped[tool]))
            continue
        rs = runs[i]
        row = dict(
            tool=tool,
            setting=kw,
            runs=rs,
            seconds=statistics.median(r["seconds"] for r in rs),
            hvps=rs[-1]["hvps"],
            value=rs[-1]["value"],
            rel_error=max(r["rel_error"] for r in rs),
        )
        rows.append(row)
        hv = ",".join(str(r["hvps"]) for r in rs)
        print(
            f"  {tool:20s} {str(kw):28s} {hv:>8s} HVPs {row['seconds']:7.3f} s (median)  rel.err ≤ {row['rel_error']:.1e}"
        )
    return dict(rows=rows)


def fastest(rows, tol=1e-3):
    ok = [r for r in rows if not r["tool"].startswith("stableopt") and "value" in r and r["rel_error"] <= tol]
    return min(ok, key=lambda r: r["seconds"]) if ok else None


def main() -> dict:
    t0 = time.perf_counter()
    pb = trained_mlp(QUICK)
    opt = adam_state(pb, steps=10)
    every, steps = 5, (15 if QUICK else 25)
    # the same run twice from the same state (measuring does not perturb training): at the
    # loosest tol the peers are credited with (informational), then at the default
    start = copy.deepcopy((pb.model.state_dict(), opt.state_dict()))
    warm = {LOOSE_TOL: warm_run(pb, opt, LOOSE_TOL, every, steps)}
    pb.model.load_state_dict(start[0])
    opt.load_state_dict(start[1])
    opt.warm_starts = {}
    warm[1e-3] = warm_run(pb, opt, 1e-3, every, steps)
    d = flat_preconditioner(opt)
    ref_pre = reference_eigs(pb, d, k=2)
    ref_raw = reference_eigs(pb, None, k=2)
    print(
        f"{pb.name} at step {opt.steps_taken}: reference λ_max(P⁻¹H)={ref_pre[0]:.8g} (λ2/λ1={ref_pre[1] / ref_pre[0]:.3f}), "
        f"λ_max(H)={ref_raw[0]:.8g} (λ2/λ1={ref_raw[1] / ref_raw[0]:.3f}); clock: {CLOCK_NAME}"
    )
    out = {
        "problem": pb.name,
        "n_params": pb.n_params,
        "step": opt.steps_taken,
        "reference_preconditioned": ref_pre,
        "reference_raw": ref_raw,
        "clock": CLOCK_NAME,
        "repeat": REPEAT,
        "loose_tol": LOOSE_TOL,
        "warm_runs": {str(k): dict(tol=v["tol"], seconds=v["seconds"], hvps=v["hvps"]) for k, v in warm.items()},
    }
    targets = []
    for which, dd, ref in [("preconditioned", d, ref_pre[0]), ("raw", None, ref_raw[0])]:
        print(f" {which}:")
        entry = contest(pb, opt, dd, ref, which, warm)
        rows = entry["rows"]
        mine = {(r["tool"], r["setting"]["tol"]): r for r in rows if r["tool"].startswith("stableopt")}
        best = fastest(rows)
        entry["fastest_peer"] = best
        info = entry["informational"] = {}
        same = [
            r
            for r in rows
            if r["tool"] == "torch graph+eigsh" and r["setting"] == dict(ncv=8, tol=1e-3) and "value" in r
        ]
        kinds = ["cold"] + (["warm"] if which == "preconditioned" else [])
        for kind in kinds:
            r, loose = mine[(f"stableopt {kind}", 1e-3)], mine[(f"stableopt {kind}", LOOSE_TOL)]
            if same:
                info[f"same tol 1e-3: torch graph+eigsh / stableopt {kind}"] = same[0]["seconds"] / r["seconds"]
            if best is not None and loose["rel_error"] <= 1e-3:
                info[f"both tuned (stableopt tol {LOOSE_TOL:g}): fastest peer / stableopt {kind}"] = (
                    best["seconds"] / loose["seconds"]
                )
        if best is None:
            print("  no peer setting reached 1e-3")
        else:
            print(f"  fastest peer: {best['tool']} {best['setting']} {best['seconds']:.3f} s")
            cold = mine[("stableopt cold", 1e-3)]
            targets.append(
                target(
                    f"{which}: fastest peer time / stableopt cold time",
                    best["seconds"] / cold["seconds"],
                    1.0,
                    fmt="{:.2f}",
                    higher_is_better=True,
                )
            )
            if which == "preconditioned":
                w = mine[("stableopt warm", 1e-3)]
                targets.append(
                    target(
                        "preconditioned: fastest peer time / stableopt warm time",
                        best["seconds"] / w["seconds"],
                        3.0,
                        fmt="{:.2f}",
                        higher_is_better=True,
                    )
                )
                targets.append(
                    target("preconditioned: warm estimate relative error", w["rel_error"], 1e-3, fmt="{:.1e}")
                )
        for label, value in info.items():
            print(f"  [info] {which}: {label}: {value:.2f}")
        out[which] = entry
    out["targets"] = targets
    out["seconds"] = time.perf_counter() - t0
    return save("peers", out)


if __name__ == "__main__":
    main()
