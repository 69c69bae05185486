import sys, torch, time
sys.path.insert(0, "/work/main/benchmarks")
import common
from common import Problem, mse, gd_steps, adam_state, flat_preconditioner, reference_eigs
from torch import nn
torch.set_num_threads(1)
def images(n, g, alpha):
    f = torch.fft.fftfreq(32)
    k = (f[:, None]**2 + f[None, :]**2).sqrt().clamp_min(1/32)
    amp = k ** (-alpha)
    z = torch.randn(n, 3, 32, 32, generator=g) + 1j * torch.randn(n, 3, 32, 32, generator=g)
    mix = torch.tensor([[1.0, 0.9, 0.8],[0.9,1.0,0.9],[0.8,0.9,1.0]])  # correlated colour channels
    img = torch.fft.ifft2(z * amp).real
    img = torch.einsum("cd,ndhw->nchw", torch.linalg.cholesky(mix), img)
    x = img.reshape(n, -1)
    x = (x - x.mean(0)) / x.std(0)   # per-feature standardisation, as for CIFAR
    return x
for alpha in [float(a) for a in sys.argv[1:]]:
    g = torch.Generator().manual_seed(0); torch.manual_seed(0)
    d, h, n = 3072, 200, 1000
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    x = images(n, g, alpha)
    teacher = torch.randn(d, 10, generator=g)
    y = torch.nn.functional.one_hot((x @ teacher).argmax(1), 10).float()
    pb = Problem("img", model, x, y, mse)
    t=time.time(); gd_steps(pb, 200, 0.05); print("loss", float(pb.loss_fn()), time.time()-t)
    raw = reference_eigs(pb, None, k=3, tol=1e-6)
    opt = adam_state(pb, 10)
    pre = reference_eigs(pb, flat_preconditioner(opt), k=3, tol=1e-6)
    print(alpha, "raw", raw, raw[1]/raw[0], "pre", pre, pre[1]/pre[0], flush=True)
