"""Record Lanczos trajectories (alphas, betas) cold and warm on benchmark problems."""
import sys, math, torch, pickle, time
sys.path.insert(0, "/work/main/benchmarks"); sys.argv += []
from common import trained_mlp, adam_state, flat_preconditioner, reference_eigs, make_cnn
import stableopt
from stableopt.eigen import _Basis

def traj(mv, v0, iters):
    Q = _Basis(v0, iters); Q.append(v0 / v0.norm())
    al, be = [], []
    for j in range(iters):
        q = Q.row(j); w = mv(q); a = float(q @ w); w = Q.orthogonalize(w); b = float(w.norm())
        al.append(a); be.append(b); Q.append(w / b) if j + 1 < iters else None
    from stableopt.eigen import _tridiagonal_eigh
    th, S = _tridiagonal_eigh(al, be[:-1])
    vec = Q.combine(S[:, :3].float(), iters)
    return al, be, vec

def ops(pb, opt):
    params = pb.params
    hvp = stableopt.make_hvp(pb.loss_fn, params)
    numels = [p.numel() for p in params]
    d = flat_preconditioner(opt)
    def mk(dd):
        def mv(u):
            v = u if dd is None else dd * u
            out = torch.cat([o.reshape(-1) for o in hvp([c.view_as(p) for c, p in zip(v.split(numels), params)])])
            return out if dd is None else out * dd
        return mv
    return mk(d), mk(None), d

def run(quick, name, cnn=False):
    torch.set_num_threads(1)
    pb = make_cnn(quick=True) if cnn else trained_mlp(quick)
    opt = adam_state(pb, steps=10 if not cnn else 3)
    out = dict(cold=[], warm6=[], warm100=[])
    mpre, mraw, d = ops(pb, opt)
    n = sum(p.numel() for p in pb.params)
    for which, mv in [("pre", mpre), ("raw", mraw)]:
        ref = reference_eigs(pb, None if which == "raw" else d, k=4, tol=1e-9)
        for s in range(4):
            v0 = torch.randn(n, generator=torch.Generator().manual_seed(100 + s))
            al, be, _ = traj(mv, v0, 60)
            out["cold"].append(dict(which=which, ref=ref, al=al, be=be))
        print(name, which, ref, flush=True)
    for every, steps in [(6, 48), (100, 400)]:
        vec = None
        for t in range(1, steps + 1):
            opt.zero_grad(set_to_none=True); pb.loss_fn().backward(); opt.step()
            if t % every: continue
            opt.zero_grad(set_to_none=True)
            mpre, mraw, d = ops(pb, opt)
            ref = reference_eigs(pb, d, k=4, tol=1e-9)
            if vec is None:
                v0 = torch.randn(n, generator=torch.Generator().manual_seed(7))
            else:
                v0 = vec[0] + 0.5 * vec[1]
            al, be, vec = traj(mpre, v0, 40)
            out[f"warm{every}"].append(dict(which="pre", ref=ref, al=al, be=be, step=t))
            print(name, every, t, ref[:2], flush=True)
    pickle.dump(out, open(f"/work/main/.notes/exp/{name}.pkl", "wb"))

if __name__ == "__main__":
    run(sys.argv[1] == "quick", sys.argv[2], cnn=len(sys.argv) > 3)
