import torch, stableopt, sys
import stableopt.eigen as E
sys.path.insert(0,"tests")
from test_fastpath import _crowded
torch.set_num_threads(1)
n=500
for top in [(1.0, 0.9864, 0.926, 0.898),(1.0, 0.9965, 0.992, 0.985)]:
  A=_crowded(n,11,top); evals,U=torch.linalg.eigh(A); lam=float(evals[-1])
  for drift in ["perturbed","swapped"]:
    g=torch.Generator().manual_seed(3)
    if drift=="perturbed":
        Ee=torch.randn(n,n,generator=g,dtype=torch.float64); Ap=A+0.02*(Ee+Ee.T)/(2*n)**0.5
    else:
        sw=evals.clone(); sw[-1],sw[-2]=evals[-2],evals[-1]; Ap=(U*sw)@U.T
    prevs=[stableopt.lanczos(lambda x: Ap@x, n=n, tol=1e-3, num_vectors=3, max_iters=n, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in range(40)]
    for mix, third in [(0.5,0),(1.0,0),(0.5,0.5),(1.0,1.0)]:
      for bound,cap in [("residual",0),("gap",2)]:
        E.GAP_RESIDUAL_CAP=cap; bad=0; mv=0
        for p in prevs:
            v0=p.eigenvectors[0]+mix*p.eigenvectors[1]+third*p.eigenvectors[2]
            r=stableopt.lanczos(lambda x: A@x, v0, tol=1e-3, bound=bound, max_iters=n, min_iters=4, dtype=torch.float64)
            bad+= abs(float(r.eigenvalues[0])-lam)>1e-3*lam; mv+=r.matvecs
        print(top[:2], drift, "mix", mix, third, bound, cap, "fails", bad, "/40 mean mv", mv/40, flush=True)
