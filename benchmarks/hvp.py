"""Benchmark 2: the cost of one Hessian-vector product in gradients, by route, and its memory.

Routes, all on the same batch and parameters (float32):

* ``grad``: one gradient, forward + backward (the unit);
* ``reuse``: double backward through a gradient graph built once (``stableopt.make_hvp``; the
  one-off graph build is reported separately as ``reuse_build``);
* ``fresh``: a new forward and gradient graph for every product, then double backward;
* ``func``: ``torch.func`` forward-over-reverse, ``jvp(grad(f))`` with ``functional_call``
  (hand-written MSE: ``nn.MSELoss`` fails under jvp(grad), pytorch issue 123996).

Then the library's backends (``hvp="autograd" | "fd" | "forward"``) through the public operator
(``stableopt.measure(...).operator("raw")``): one product in gradients on the MLP and on a small
transformer (causal SDPA, LayerNorm, GELU, tied embeddings) with torch's default (fused) SDPA
kernel, where double backward does not exist, and with the math kernel; and the relative error of
``"fd"`` products in float32 and float64 against float64 double backward.

Times are medians of interleaved rounds; memory is the peak resident set above the level before
the call (see ``common.peak_memory``). This measurement decides the HVP route of the engine.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from common import QUICK, Problem, interleaved, make_cnn, peak_memory, save, target, trained_mlp
from torch import Tensor
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

import stableopt

# the model of examples/transformer.py itself, not a copy of it
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from transformer import TinyGPT  # noqa: E402

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


BACKENDS = ("autograd", "fd", "forward")


def _lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def tiny_transformer(seed: int = 0) -> Problem:
    """A 2-layer decoder-only transformer (causal SDPA attention, LayerNorm, GELU, tied
    embeddings; 64-token vocabulary, context 32, width 64) on a seeded random batch of 16
    sequences, next-token cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TinyGPT(vocab=64, context=32)
    x = torch.randint(0, 64, (16, 32), generator=g)
    y = torch.roll(x, -1, dims=1)
    return Problem("transformer", model, x, y, _lm_loss)


def _group(params):
    return [stableopt.MeasuredGroup(params, [torch.ones_like(p) for p in params], threshold=1.0)]


def _flat(ts) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def backend_costs(pb: Problem, *, math_sdpa: bool, rounds: int, number: int) -> dict:
    """Seconds of one gradient and of one product per backend (medians of interleaved rounds),
    through the public operator (``stableopt.measure(...).operator("raw")``)."""
    params = pb.params
    n = sum(p.numel() for p in params)
    v = torch.randn(n, generator=torch.Generator().manual_seed(0))
    ctx = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    times: dict[str, list[float]] = {"grad": [], **{b: [] for b in BACKENDS}}
    errors: dict[str, str] = {}
    build: dict[str, list[float]] = {b: [] for b in BACKENDS}
    with ctx:
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(number):
                torch.autograd.grad(pb.loss_fn(), params)
            times["grad"].append((time.perf_counter() - t0) / number)
            for b in BACKENDS:
                if b in errors:
                    continue
                try:
                    t0 = time.perf_counter()
                    with stableopt.measure(pb.loss_fn, _group(params), hvp=b) as m:
                        op = m.operator("raw")
                        op.matvec(v)  # the first product (graph build for autograd)
                        t1 = time.perf_counter()
                        for _ in range(number):
                            op.matvec(v)
                        t2 = time.perf_counter()
                    build[b].append(t1 - t0)
                    times[b].append((t2 - t1) / number)
                except Exception as exc:  # noqa: BLE001 - recorded: the backend does not work on this model
                    errors[b] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    med = {k: statistics.median(v) for k, v in times.items() if v}
    return {
        "seconds": med,
        "first_product_seconds": {k: statistics.median(v) for k, v in build.items() if v},
        "x_gradient": {k: med[k] / med["grad"] for k in med if k != "grad"},
        "unsupported": errors,
    }


def fd_accuracy(pb: Problem, *, probes: int = 5) -> dict:
    """Relative error of hvp="fd" products against float64 double backward on a float64 copy
    (math SDPA), in float32 and in float64."""
    ref_model = copy.deepcopy(pb.model).double()
    ref_params = [p for p in ref_model.parameters() if p.requires_grad]
    x64 = pb.x.double() if pb.x.is_floating_point() else pb.x
    y64 = pb.y.double() if pb.y.is_floating_point() else pb.y
    out = {}
    g = torch.Generator().manual_seed(1)
    n = sum(p.numel() for p in ref_params)
    vs = [torch.randn(n, generator=g, dtype=torch.float64) for _ in range(probes)]
    with sdpa_kernel(SDPBackend.MATH):
        with stableopt.measure(lambda: pb.loss_of_output(ref_model(x64), y64), _group(ref_params), hvp="autograd") as m:
            op = m.operator("raw")
            refs = [op.matvec(v) for v in vs]
    for label, model, x, y in (("float32", pb.model, pb.x, pb.y), ("float64", ref_model, x64, y64)):
        params = [p for p in model.parameters() if p.requires_grad]
        errs = []
        with stableopt.measure(
            lambda model=model, x=x, y=y: pb.loss_of_output(model(x), y), _group(params), hvp="fd"
        ) as m:
            op = m.operator("raw")
            for v, r in zip(vs, refs):
                hv = op.matvec(v.to(op.dtype)).double()
                errs.append(float((hv - r).norm() / r.norm()))
        out[label] = {"max_rel_error": max(errs), "median_rel_error": statistics.median(errs)}
    return out


def fd_eigen_accuracy(*, quick: bool) -> dict:
    """What the issue measured: λ_max(P⁻¹H), the ratio and raw λ_max by ``hvp="fd"`` (fused SDPA,
    default tol) on the transformer trained with AdamW (decay on the matrices), against float64
    double backward (math SDPA, tol 1e-8), at two points of training; the same with the matrix
    products in bfloat16 (parameters cast inside the forward), which fd must flag; and the
    gradients each product cost."""
    from transformer import param_groups

    out = {}
    points = (20,) if quick else (30, 120)
    pb = tiny_transformer()
    opt = stableopt.AdamW(param_groups(pb.model, 0.1), lr=3e-3)
    done = 0
    for steps in points:
        for _ in range(steps - done):
            opt.zero_grad(set_to_none=True)
            pb.loss_fn().backward()
            opt.step()
        done = steps
        ref_model = copy.deepcopy(pb.model).double()
        ref_opt = stableopt.AdamW(param_groups(ref_model, 0.1), lr=3e-3)
        ref_opt.load_state_dict(opt.state_dict())
        with sdpa_kernel(SDPBackend.MATH):
            ref = ref_opt.sharpness(
                lambda m=ref_model: pb.loss_of_output(m(pb.x), pb.y), raw=True, tol=1e-8, hvp="autograd"
            )

        def half_loss() -> Tensor:
            return pb.loss_of_output(pb.model(pb.x), pb.y)

        def half_linear(mod: torch.nn.Linear):
            def forward(x: Tensor) -> Tensor:  # the matrix product in bfloat16, as under a bf16 policy
                bias = None if mod.bias is None else mod.bias.bfloat16()
                return F.linear(x.bfloat16(), mod.weight.bfloat16(), bias).float()

            return forward

        for label, loss_fn in (("float32", pb.loss_fn), ("bfloat16 matmuls", half_loss)):
            opt.warm_starts.clear()
            linears = [mod for mod in pb.model.modules() if isinstance(mod, torch.nn.Linear)]
            try:
                if loss_fn is half_loss:
                    for mod in linears:
                        mod.forward = half_linear(mod)  # type: ignore[method-assign]
                with warnings.catch_warnings():  # bfloat16: the "not converged" warning is the point
                    warnings.simplefilter("ignore", RuntimeWarning)
                    t0 = time.process_time()
                    rep = opt.sharpness(loss_fn, raw=True, hvp="fd")
                    cpu = time.process_time() - t0
            finally:
                for mod in linears:
                    mod.__dict__.pop("forward", None)
            row = {
                "steps": steps,
                "compute": label,
                "preconditioned_rel_error": abs(rep.preconditioned / ref.preconditioned - 1),
                "ratio_rel_error": abs(rep.ratio / ref.ratio - 1),
                "raw_rel_error": abs(rep.raw / ref.raw - 1),
                "hvp_error": rep.hvp_error,
                "converged": rep.converged,
                "products": rep.hvps,
                "cpu_seconds": cpu,
                "ratio": ref.ratio,
            }
            out[f"step {steps}, {label}"] = row
            print(
                f"fd on the transformer at step {steps} ({label}): λ_max(P⁻¹H) off by "
                f"{row['preconditioned_rel_error']:.1e}, ratio {row['ratio_rel_error']:.1e}, raw "
                f"{row['raw_rel_error']:.1e} (estimated {rep.hvp_error:.1e}, converged={rep.converged}; "
                f"ratio {ref.ratio:.2f}, {rep.hvps} products)"
            )
    return out


def fd_gradients_per_product(pb: Problem) -> float:
    """Gradients an ``"fd"`` measurement evaluated per product (stencil, shortenings, probes, checks)."""
    opt = stableopt.Adam(pb.params, lr=1e-3)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        pb.loss_fn().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    with opt.measure(pb.loss_fn, hvp="fd") as m:
        op = m.operator("preconditioned")
        res = stableopt.lanczos(op, k=1, tol=1e-3, generator=torch.Generator().manual_seed(0))
        op.check(res.eigenvectors[0])
        return m.product.stats.gradients / m.products


def backend_rows(mlp: Problem) -> dict:
    """The library's three HVP backends through the public operator: cost of one product in
    gradients on the MLP and on the small transformer (fused SDPA, where double backward does
    not exist, and the math kernel), and the accuracy of hvp="fd" against float64."""
    tr = tiny_transformer()
    rounds, number = (3, 2) if QUICK else (7, 3)
    costs = {
        mlp.name: backend_costs(mlp, math_sdpa=False, rounds=rounds, number=number),
        "transformer (default SDPA)": backend_costs(tr, math_sdpa=False, rounds=rounds, number=number),
        "transformer (math SDPA)": backend_costs(tr, math_sdpa=True, rounds=rounds, number=number),
    }
    for name, r in costs.items():
        line = ", ".join(f"{b} {x:.2f}×" for b, x in r["x_gradient"].items())
        print(f"backends on {name}: one product = {line} gradient")
        for b, why in r["unsupported"].items():
            print(f"  {b}: not available ({why[:120]})")
    accuracy = {mlp.name: fd_accuracy(mlp), "transformer": fd_accuracy(tr)}
    for name, a in accuracy.items():
        print(
            f"fd accuracy on {name} vs float64 double backward (random directions): float32 max rel error "
            f"{a['float32']['max_rel_error']:.1e}, float64 {a['float64']['max_rel_error']:.1e}"
        )
    per_product = {mlp.name: fd_gradients_per_product(mlp), "transformer": fd_gradients_per_product(tr)}
    print(
        "fd gradients per product (a whole measurement): " + ", ".join(f"{k} {v:.2f}" for k, v in per_product.items())
    )
    eigen = fd_eigen_accuracy(quick=QUICK)
    return {"costs": costs, "fd_accuracy": accuracy, "fd_gradients_per_product": per_product, "fd_eigen": eigen}


def main() -> dict:
    t0 = time.perf_counter()
    rows = [bench(trained_mlp(QUICK), rounds=3 if QUICK else 7, number=2 if QUICK else 3)]
    rows.append(bench(make_cnn(quick=True), rounds=3 if QUICK else 5, number=1))
    mlp = rows[0]
    backends = backend_rows(trained_mlp(QUICK))
    best = min(("reuse", "fresh", "func"), key=lambda k: mlp["x_gradient"][k])
    print(f"fastest HVP route on {mlp['problem']}: {best} (engine uses 'reuse')")
    targets = [
        target(
            f"HVP / gradient on {mlp['problem']} (engine route: reuse)", mlp["x_gradient"]["reuse"], 2.5, fmt="{:.2f}"
        ),
        target(
            'hvp="fd" product / gradient on the transformer (fused SDPA, no double backward; 4-gradient stencil)',
            backends["costs"]["transformer (default SDPA)"]["x_gradient"]["fd"],
            5.0,
            fmt="{:.2f}",
        ),
        target(
            'hvp="fd" float32 relative error vs float64 (worst of MLP, transformer)',
            max(a["float32"]["max_rel_error"] for a in backends["fd_accuracy"].values()),
            2e-3,
            fmt="{:.1e}",
        ),
        target(
            'hvp="fd" λ_max(P⁻¹H), ratio, raw: worst float32 error on the trained transformer',
            max(
                max(r["preconditioned_rel_error"], r["ratio_rel_error"], r["raw_rel_error"])
                for r in backends["fd_eigen"].values()
                if r["compute"] == "float32"
            ),
            2e-3,
            fmt="{:.1e}",
        ),
        target(
            'hvp="fd" bfloat16-compute measurements reported converged (must be none)',
            sum(r["converged"] for r in backends["fd_eigen"].values() if r["compute"] != "float32"),
            0,
            fmt="{:d}",
        ),
    ]
    return save(
        "hvp", dict(rows=rows, fastest_route=best, backends=backends, targets=targets, seconds=time.perf_counter() - t0)
    )


if __name__ == "__main__":
    main()
