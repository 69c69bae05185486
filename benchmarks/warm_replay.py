"""Benchmark 6b: every warm-started measurement a monitor could make through the edge, replayed
against a tight reference (issue 20, point 3).

Full-batch Adam (lr 1e-3) trains the "mlp" from its GD-200 state through the edge of stability
(sharpening, the edge, loss spikes where the top eigenvector turns over). The state a monitor
measures (parameters and the preconditioner P of the step just taken) is saved after every
step t with t ≡ 0 or 1 (mod 25): the states a monitor meets after its step, and one step later
(the state a measurement *before* the next step would see, and a monitor whose count is offset by
one). Every state gets a tight float64 reference (Lanczos, residual bound ``REF_TOL``, top three
eigenvalues). Then each schedule a monitor could run is replayed as the library runs it,
through :func:`stableopt.estimate_sharpness` with one warm-start dict carried from measurement to
measurement (the first one cold) and the optimizer's start-vector generators: every 25 and every
100 steps, at tol 1e-3 and 1e-2, on the "after" states and on the "before" states. A measurement
is within its bound when its relative error against the reference is ≤ tol (cold) or ≤ 2·tol
(warm), the bounds the docs state. Every schedule is replayed twice: with the library's rules
("default") and with the gap rule's start guard off (``GAP_START_SHIFT`` = ∞, the rules before
issue 20), from the same states and references.

States and references are cached under ``$STABLEOPT_REPLAY_CACHE`` (default
``/tmp/stableopt-warm-replay``; about 5 MB per state on the mlp), so a second run only replays.
``--steps N`` trains N Adam steps (default 1000; 800 with ``--quick``, which uses mlp-quick, spiking from step ~520).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from common import QUICK, save, target, trained_mlp

import stableopt
import stableopt.eigen as E
import stableopt.sharpness as S
from stableopt.optimizers import START_VECTOR_SEED

LR = 1e-3
THRESHOLD = 38.0 / LR  # Adam, β1 = 0.9
EVERY = (25, 100)
TOLS = (1e-3, 1e-2)
#: "after": the state after step t (t a multiple of ``every``), what a monitor measures;
#: "before": the state one step later, what a measurement before the next step sees
OFFSETS = {"after": 0, "before": 1}
REF_TOL = 1e-8
#: the library as it is, and with the gap rule's start guard off (the rules before issue 20)
VARIANTS = {"default": {}, "no start guard": {"GAP_START_SHIFT": math.inf}}
STEPS = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else (800 if QUICK else 1000)
CACHE = Path(os.environ.get("STABLEOPT_REPLAY_CACHE", "/tmp/stableopt-warm-replay"))


def cache_dir(pb) -> Path:
    d = CACHE / f"{pb.name}-adam{LR:g}-{STEPS}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def state_steps() -> list[int]:
    return [t for t in range(1, STEPS + 1) if t % 25 in (0, 1) and t > 1]


def train(pb) -> dict:
    """Train STEPS Adam steps from the problem's state; save (params, P) at the replayed steps
    and the loss of every step. Cached."""
    d = cache_dir(pb)
    meta = d / "train.json"
    if meta.exists():
        return json.loads(meta.read_text())
    opt = stableopt.Adam(pb.params, lr=LR)
    keep = set(state_steps())
    losses = []
    t0 = time.perf_counter()
    for t in range(1, STEPS + 1):
        opt.zero_grad(set_to_none=True)
        loss = pb.loss_fn()
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        if t in keep:
            torch.save(
                dict(
                    params=torch.cat([p.detach().reshape(-1) for p in pb.params]).clone(),
                    pre=torch.cat([P.reshape(-1) for P in opt.preconditioner()]).clone(),
                ),
                d / f"state-{t}.pt",
            )
        if t % 100 == 0:
            print(f"  trained {t} steps, loss {losses[-1]:.5g} [{time.perf_counter() - t0:.0f} s]", flush=True)
    out = dict(losses=losses, steps=STEPS)
    meta.write_text(json.dumps(out))
    return out


def load_state(pb, t: int) -> torch.Tensor:
    """Copy the saved parameters of step t into the model; returns the flat P."""
    s = torch.load(cache_dir(pb) / f"state-{t}.pt")
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(s["params"], pb.params)
    return s["pre"]


def groups(pb, pre: torch.Tensor, dtype=torch.float32, params=None) -> list:
    params = pb.params if params is None else params
    chunks = [c.view_as(p).to(dtype) for c, p in zip(pre.split([p.numel() for p in params]), params)]
    return [stableopt.MeasuredGroup(params, chunks, threshold=THRESHOLD)]


def references(pb) -> dict[int, list[float]]:
    """Top three eigenvalues of P^{-1/2}HP^{-1/2} at every saved state, by float64 Lanczos on a
    float64 copy of the model (residual bound REF_TOL). Cached."""
    import copy

    path = cache_dir(pb) / f"refs-{REF_TOL:g}.json"
    refs = {int(k): v for k, v in json.loads(path.read_text()).items()} if path.exists() else {}
    model = copy.deepcopy(pb.model).double()
    params = list(model.parameters())
    x, y = pb.x.double(), pb.y.double()
    t0 = time.perf_counter()
    for t in state_steps():
        if t in refs:
            continue
        s = torch.load(cache_dir(pb) / f"state-{t}.pt")
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(s["params"].double(), params)
        with stableopt.measure(
            lambda: pb.loss_of_output(model(x), y), groups(pb, s["pre"], torch.float64, params), hvp="autograd"
        ) as m:
            r = stableopt.lanczos(
                m.operator("preconditioned"),
                k=3,
                tol=REF_TOL,
                max_iters=500,
                max_basis=40,
                generator=torch.Generator().manual_seed(12345 + t),
            )
        refs[t] = [float(v) for v in r.eigenvalues] + [r.matvecs, bool(r.converged)]
        path.write_text(json.dumps(refs))
        print(
            f"  reference step {t:4d}: λ1={refs[t][0]:.7g} λ2/λ1={refs[t][1] / refs[t][0]:.4f} "
            f"({r.matvecs} products{'' if r.converged else ', NOT converged'}) [{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
    return refs


def replay(pb, refs: dict[int, list[float]], *, every: int, tol: float, offset: int, verbose: bool = False) -> list:
    """One monitor's chain of measurements, warm-started as the library does."""
    warm: dict = {}
    rows = []
    steps = [t for t in range(every + offset, STEPS + 1, every) if t in refs]
    for i, t in enumerate(steps):
        pre = load_state(pb, t)
        cold = "preconditioned" not in warm
        rep = stableopt.estimate_sharpness(
            pb.loss_fn,
            groups(pb, pre),
            tol=tol,
            step=t,
            generator=torch.Generator().manual_seed(START_VECTOR_SEED + i),
            warm=warm,
            hvp="autograd",
        )
        lam = refs[t][0]
        err = (rep.preconditioned - lam) / abs(lam)
        bound = tol if cold else 2 * tol
        rows.append(
            dict(
                step=t,
                cold=cold,
                hvps=rep.hvps,
                value=rep.preconditioned,
                reference=lam,
                second=refs[t][1],
                rel_error=err,
                bound=bound,
                within=abs(err) <= bound,
                residual=rep.residual,
                converged=rep.converged,
            )
        )
        if verbose or abs(err) > bound:
            print(
                f"    every {every} tol {tol:g} +{offset} step {t:4d} {'cold' if cold else 'warm'}: {rep.hvps:3d} HVPs "
                f"λ={rep.preconditioned:.6g} ref={lam:.6g} (λ2/λ1={refs[t][1] / lam:.4f}) err {err:+.1e}"
                f"{'' if abs(err) <= bound else '  OUT OF BOUND'}",
                flush=True,
            )
    return rows


@contextlib.contextmanager
def variant(settings: dict):
    saved = {k: getattr(E, k) for k in settings}
    try:
        for k, v in settings.items():
            setattr(E, k, v)
        yield
    finally:
        for k, v in saved.items():
            setattr(E, k, v)


def summarize(rows: list[dict]) -> dict:
    warm = [r for r in rows if not r["cold"]]
    hv = [r["hvps"] for r in warm]
    worst = max(rows, key=lambda r: abs(r["rel_error"]) / r["bound"])
    return dict(
        measurements=len(rows),
        over_tol=sum(abs(r["rel_error"]) > r["tol"] for r in rows),
        worst_error=max(abs(r["rel_error"]) for r in rows),
        worst_warm_error=max((abs(r["rel_error"]) for r in warm), default=0.0),
        worst_over_bound=abs(worst["rel_error"]) / worst["bound"],
        worst_step=worst["step"],
        out_of_bound=sum(not r["within"] for r in rows),
        warm_mean_hvps=statistics.mean(hv) if hv else float("nan"),
        warm_max_hvps=max(hv) if hv else 0,
        total_hvps=sum(r["hvps"] for r in rows),
    )


def settings() -> dict:
    return dict(
        warm_mix=S.WARM_MIX,
        warm_min_iters=S.WARM_MIN_ITERS,
        warm_stop_bound=S.WARM_STOP_BOUND,
        gap_residual_cap=E.GAP_RESIDUAL_CAP,
        gap_start_shift=E.GAP_START_SHIFT,
        max_basis=S.MAX_BASIS,
    )


def run_all(pb, refs, *, verbose: bool = False, label: str = "default") -> tuple[list[dict], list[dict]]:
    rows, table = [], []
    for every in EVERY:
        for tol in TOLS:
            for name, offset in OFFSETS.items():
                t0 = time.perf_counter()
                r = replay(pb, refs, every=every, tol=tol, offset=offset, verbose=verbose)
                for x in r:
                    x.update(every=every, tol=tol, states=name, variant=label)
                rows += r
                s = summarize(r)
                s.update(every=every, tol=tol, states=name, variant=label)
                table.append(s)
                print(
                    f"  [{label}] every {every:3d} tol {tol:g} {name:6s}: {s['measurements']} measurements, worst error "
                    f"{s['worst_error']:.1e} ({s['worst_over_bound']:.2f} of its bound, step {s['worst_step']}), "
                    f"{s['out_of_bound']} out of bound; warm HVPs mean {s['warm_mean_hvps']:.1f} max "
                    f"{s['warm_max_hvps']} [{time.perf_counter() - t0:.0f} s]",
                    flush=True,
                )
    return rows, table


def main() -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pb = trained_mlp(QUICK)
    print(f"{pb.name}: {pb.n_params} params, Adam lr {LR:g} for {STEPS} steps; cache {cache_dir(pb)}", flush=True)
    tr = train(pb)
    refs = references(pb)
    rows, table = [], []
    for label, settings_ in VARIANTS.items():
        with variant(settings_):
            r, t = run_all(pb, refs, verbose="--verbose" in sys.argv, label=label)
        rows += r
        table += t
    targets = []
    for s in table:
        if s["variant"] != "default":
            continue
        targets.append(
            target(
                f"every {s['every']}, tol {s['tol']:g}, {s['states']} the step: worst error / its bound",
                s["worst_over_bound"],
                1.0,
                fmt="{:.2f}",
            )
        )
    return save(
        "warm_replay",
        dict(
            problem=pb.name,
            n_params=pb.n_params,
            lr=LR,
            steps=STEPS,
            losses=tr["losses"],
            ref_tol=REF_TOL,
            references={str(k): v for k, v in sorted(refs.items())},
            settings=settings(),
            variants={k: {n: str(v) for n, v in d.items()} for k, d in VARIANTS.items()},
            states=state_steps(),
            table=table,
            rows=rows,
            targets=targets,
            seconds=time.perf_counter() - t0,
        ),
    )


if __name__ == "__main__":
    main()
