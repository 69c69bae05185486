import torch, stableopt, sys
import stableopt.eigen as E
sys.path.insert(0,"tests")
from test_fastpath import _crowded
from stableopt.sharpness import WARM_MIX, WARM_MIN_ITERS
torch.set_num_threads(1)
n=500
for top in [(1.0, 0.95, 0.93),(1.0, 0.9864, 0.926, 0.898),(1.0, 0.9965, 0.992, 0.985)]:
  A=_crowded(n,11,top); evals,U=torch.linalg.eigh(A); lam=float(evals[-1])
  for drift in ["perturbed","swapped"]:
    g=torch.Generator().manual_seed(3)
    if drift=="perturbed":
        Ee=torch.randn(n,n,generator=g,dtype=torch.float64); Ap=A+0.02*(Ee+Ee.T)/(2*n)**0.5
    else:
        sw=evals.clone(); sw[-1],sw[-2]=evals[-2],evals[-1]; Ap=(U*sw)@U.T
    prevs=[stableopt.lanczos(lambda x: Ap@x, n=n, tol=1e-3, num_vectors=2, max_iters=n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(40)]
    for bound,cap in [("residual",0),("gap",1.5),("gap",2),("gap",3)]:
        E.GAP_RESIDUAL_CAP=cap; bad=0; mv=0
        for p in prevs:
            v0=p.eigenvectors[0]+WARM_MIX*p.eigenvectors[1]
            r=stableopt.lanczos(lambda x: A@x, v0, tol=1e-3, bound=bound, max_iters=n, min_iters=WARM_MIN_ITERS, dtype=torch.float64)
            bad+= abs(float(r.eigenvalues[0])-lam)>1e-3*lam; mv+=r.matvecs
        print(top[:2], drift, bound, cap, "fails", bad, "/40 mean mv", mv/40, flush=True)
