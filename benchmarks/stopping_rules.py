"""Benchmark 6: how often each Lanczos stopping rule stops on the wrong eigenvalue.

Synthetic symmetric 500×500 matrices with λ2/λ1 = 0.95, 0.986 and 0.9965 (the spectra of the
"mlp", "mlp-quick" raw and "mlp-gauss" preconditioned problems) and a bulk below 0.85λ1. Cold:
150 random start vectors per spectrum. Warm: the start vector ``estimate_sharpness`` would
build (top Ritz vector of the previous operator + WARM_MIX × the runner-up, WARM_MIN_ITERS
steps at least) after the operator drifted, or after its top two eigenvalues swapped, from 40
previous solves; and from 40 stale warm starts, as after a loss spike (both stored vectors with
most of their weight on eigenvectors 5–12 and little on the top one). A solve "fails" when its
λ_max is more than tol = 1e-3 from eigvalsh's. The gap rule is run with its start guard
(``GAP_START_SHIFT``, the default) and without it. This is the evidence behind
``GAP_RESIDUAL_CAP``, ``GAP_START_SHIFT`` and using the gap rule for warm solves only.

The same evidence on the real problem, every measurement of every monitor schedule along a
training run through the edge against a tight reference, is ``warm_replay.py``, which this
script runs afterwards (``--synthetic`` skips it).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from common import QUICK, save

import stableopt
import stableopt.eigen as E
from stableopt.sharpness import WARM_MIN_ITERS, WARM_MIX

N = 500
SPECTRA = [(1.0, 0.95, 0.93), (1.0, 0.9864, 0.926, 0.898), (1.0, 0.9965, 0.992, 0.985)]
#: (bound, GAP_RESIDUAL_CAP, start guard): the guard is GAP_START_SHIFT, or off (math.inf)
RULES = [
    ("residual", None, None),
    ("gap", 2.0, E.GAP_START_SHIFT),
    ("gap", 2.0, math.inf),
    ("gap", 3.0, E.GAP_START_SHIFT),
    ("gap", 5.0, E.GAP_START_SHIFT),
]


def crowded(seed: int, top: tuple[float, ...]) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    evals = torch.linspace(-0.2, 0.85, N, dtype=torch.float64)
    evals[N - len(top) :] = torch.tensor(sorted(top), dtype=torch.float64)
    return (U * evals) @ U.T


def rule_name(r: dict) -> str:
    if r["cap"] is None:
        return r["bound"]
    return f"{r['bound']} cap {r['cap']:g}" + (", no start guard" if r.get("guard") is None else "")


def stale_start(U: torch.Tensor, seed: int) -> torch.Tensor:
    """A warm start after a loss spike: both stored vectors mostly along eigenvectors 5–12 (from
    the top), little along the top one (as tests/test_sharpness.py builds them)."""
    g = torch.Generator().manual_seed(1000 + seed)
    vecs = []
    for _ in range(2):
        c = torch.randn(N, generator=g, dtype=torch.float64) * 0.05
        c[-1] *= 0.2
        c[N - 12 : N - 4] += torch.rand(8, generator=g, dtype=torch.float64)
        v = U @ c
        vecs.append(v / v.norm())
    return vecs[0] + WARM_MIX * vecs[1]


def run(A: torch.Tensor, starts: list[torch.Tensor | None], min_iters: int, lam: float) -> list[dict]:
    rows = []
    saved = E.GAP_RESIDUAL_CAP, E.GAP_START_SHIFT
    try:
        for bound, cap, guard in RULES:
            if cap is not None:
                E.GAP_RESIDUAL_CAP, E.GAP_START_SHIFT = cap, guard
            fails, products = 0, 0
            for i, v0 in enumerate(starts):
                kw = dict(n=N, generator=torch.Generator().manual_seed(i)) if v0 is None else {}
                r = stableopt.lanczos(
                    lambda x: A @ x,
                    v0,
                    tol=1e-3,
                    bound=bound,
                    max_iters=N,
                    min_iters=min_iters,
                    dtype=torch.float64,
                    **kw,
                )
                fails += abs(float(r.eigenvalues[0]) - lam) > 1e-3 * lam
                products += r.matvecs
            rows.append(
                dict(
                    bound=bound,
                    cap=cap,
                    guard=None if guard is None or math.isinf(guard) else guard,
                    fails=fails,
                    solves=len(starts),
                    mean_products=products / len(starts),
                )
            )
    finally:
        E.GAP_RESIDUAL_CAP, E.GAP_START_SHIFT = saved
    return rows


def main() -> dict:
    t0 = time.perf_counter()
    cold_n, warm_n = (30, 10) if QUICK else (150, 40)
    results = []
    for top in SPECTRA:
        A = crowded(11, top)
        evals, U = torch.linalg.eigh(A)
        lam = float(evals[-1])
        cases = [("cold", [None] * cold_n, 1)]
        for drift in ("perturbed", "top two swapped"):
            if drift == "perturbed":
                Ee = torch.randn(N, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
                A_prev = A + 0.02 * (Ee + Ee.T) / (2 * N) ** 0.5
            else:
                sw = evals.clone()
                sw[-1], sw[-2] = evals[-2], evals[-1]
                A_prev = (U * sw) @ U.T
            starts = []
            for s in range(warm_n):
                p = stableopt.lanczos(
                    lambda x, A_prev=A_prev: A_prev @ x,
                    n=N,
                    tol=1e-3,
                    num_vectors=2,
                    max_iters=N,
                    generator=torch.Generator().manual_seed(s),
                    dtype=torch.float64,
                )
                starts.append(p.eigenvectors[0] + WARM_MIX * p.eigenvectors[1])
            cases.append((f"warm, {drift}", starts, WARM_MIN_ITERS))
        cases.append(("warm, stale", [stale_start(U, s) for s in range(warm_n)], WARM_MIN_ITERS))
        for name, starts, mi in cases:
            for r in run(A, starts, mi, lam):
                r.update(spectrum=top, case=name)
                results.append(r)
                rule = rule_name(r)
                print(
                    f"  λ2/λ1={top[1]:<7g} {name:22s} {rule:12s} wrong {r['fails']:3d}/{r['solves']}  "
                    f"mean products {r['mean_products']:.1f}",
                    flush=True,
                )
    path = save(
        "stopping_rules",
        dict(
            n=N,
            spectra=SPECTRA,
            gap_start_shift=E.GAP_START_SHIFT,
            rows=results,
            targets=[],
            seconds=time.perf_counter() - t0,
        ),
    )
    if "--synthetic" not in sys.argv:
        import warm_replay

        warm_replay.main()
    return path


if __name__ == "__main__":
    main()
