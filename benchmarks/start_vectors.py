"""Benchmark 7: should a cold solve start from the gradient instead of a random vector?

The gradient is free at a measurement (the graph build computes it), and in the whitened
coordinates of P^{-1/2}·H·P^{-1/2} it is D·∇L with D = P^{-1/2}. Gradients of trained networks
concentrate on the top Hessian directions, so a start of unit(D·∇L) + unit(r), r random (the
random part keeps every eigenvector in the start), should need fewer products than unit(r)
alone. This script measures both from the same random vectors, against a float64 reference,
on the "mlp" problem after 10 Adam steps, on it at the edge of stability (600 Adam steps), and
on the crowded "mlp-gauss" stress case; it also prints |cos| between the start direction and
the top three eigenvectors. A solve is "wrong" when its λ_max is more than tol = 1e-3 from the
reference. Not a target of issue 7: the evidence behind keeping random cold starts.
"""

from __future__ import annotations

import statistics
import time

import torch
from common import QUICK, adam_state, clock, flat_operator, flat_preconditioner, reference_eigs, save, trained_mlp

import stableopt
from stableopt.sharpness import MAX_BASIS

TOL = 1e-3
SEEDS = 4 if QUICK else 8


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v)


def case(label: str, pb, opt, quantities: tuple[str, ...]) -> list[dict]:
    params = pb.params
    n = sum(p.numel() for p in params)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(pb.loss_fn(), params)])
    rows = []
    for quantity in quantities:
        d = flat_preconditioner(opt) if quantity == "preconditioned" else None
        with flat_operator(pb.loss_fn, params, d) as mv:
            lam = reference_eigs(pb, d, k=3)
            vecs = stableopt.lanczos(
                mv, n=n, k=3, tol=1e-6, max_iters=300, generator=torch.Generator().manual_seed(1)
            ).eigenvectors
            g = unit(grad if d is None else d * grad)
            cos = [abs(float(g @ unit(v))) for v in vecs]
            out = {"random": [], "gradient + random": []}
            for seed in range(SEEDS):
                r = unit(torch.randn(n, generator=torch.Generator().manual_seed(1000 + seed)))
                for start, v0 in (("random", r), ("gradient + random", g + r)):
                    t0 = clock()
                    res = stableopt.lanczos(mv, v0, k=1, tol=TOL, max_basis=MAX_BASIS)
                    err = abs(float(res.eigenvalues[0]) - lam[0]) / abs(lam[0])
                    out[start].append(dict(hvps=res.matvecs, rel_error=err, seconds=clock() - t0))
        for start, solves in out.items():
            row = dict(
                case=label,
                quantity=quantity,
                start=start,
                top=[x / lam[0] for x in lam],
                cos_top3=cos,
                solves=solves,
                mean_hvps=statistics.mean(s["hvps"] for s in solves),
                wrong=sum(s["rel_error"] > TOL for s in solves),
            )
            rows.append(row)
            print(
                f"  {label:18s} {quantity:14s} {start:18s} λ2/λ1 {lam[1] / lam[0]:.4f} |cos| {cos[0]:.3f} {cos[1]:.3f} "
                f"{cos[2]:.3f}: mean {row['mean_hvps']:.1f} HVPs, wrong {row['wrong']}/{len(solves)} "
                f"(worst error {max(s['rel_error'] for s in solves):.1e})",
                flush=True,
            )
    return rows


def main() -> dict:
    t0 = time.perf_counter()
    rows = []
    pb = trained_mlp(QUICK)
    opt = adam_state(pb, steps=10)
    rows += case(f"{pb.name}, Adam 10", pb, opt, ("preconditioned", "raw"))
    edge = 300 if QUICK else 600
    for _ in range(edge - 10):
        opt.zero_grad(set_to_none=True)
        pb.loss_fn().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    rows += case(f"{pb.name}, Adam {edge}", pb, opt, ("preconditioned",))
    pb = trained_mlp(QUICK, inputs="gaussian")
    opt = adam_state(pb, steps=10)
    rows += case(f"{pb.name}, Adam 10", pb, opt, ("preconditioned", "raw"))
    return save(
        "start_vectors",
        dict(tol=TOL, seeds=SEEDS, max_basis=MAX_BASIS, rows=rows, targets=[], seconds=time.perf_counter() - t0),
    )


if __name__ == "__main__":
    main()
