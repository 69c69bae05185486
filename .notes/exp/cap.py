import torch, stableopt, sys
import stableopt.eigen as E
sys.path.insert(0, "tests")
from test_fastpath import _crowded
torch.set_num_threads(1)
for top in [(1.0, 0.95, 0.93), (1.0, 0.9864, 0.926, 0.898), (1.0, 0.9965, 0.992, 0.985)]:
    A = _crowded(500, seed=11, top=top); lam = float(torch.linalg.eigvalsh(A)[-1])
    for bound, cap in [("residual", 0), ("gap", 1.0), ("gap", 2.0), ("gap", 3.0), ("gap", 5.0)]:
        E.GAP_RESIDUAL_CAP = cap
        errs, mv = [], []
        for seed in range(150):
            r = stableopt.lanczos(lambda x: A @ x, n=500, tol=1e-3, bound=bound, max_iters=500, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            errs.append(abs(float(r.eigenvalues[0]) - lam) / lam); mv.append(r.matvecs)
        bad = sum(e > 1e-3 for e in errs)
        print(top[:2], bound, cap, "fails", bad, "max err %.1e" % max(errs), "mean mv %.1f" % (sum(mv)/len(mv)), flush=True)
