"""Shared problems, timing helpers and result writing for the benchmark scripts.

Every problem is generated in-process from a seeded ``torch.Generator`` (no downloads):

* ``mlp``: the EoS paper's tanh MLP 3072-200-200-10 (656,810 parameters) on 1000 samples with
  MSE ½‖f(x) − y‖² averaged over samples (ANCHORS.md "mlp"), synthetic natural-image inputs
  (:func:`natural_images`) and one-hot targets from a random linear teacher; ``mlp-quick`` is
  768-100-100-10 on 256 samples; ``mlp-gauss`` is the same MLP on i.i.d. N(0, 1) inputs, a
  stress case with a far more crowded spectrum.
* ``cnn``: conv16-pool-conv64-pool-linear (ReLU) on 3×32×32 inputs, cross-entropy (ANCHORS.md
  "cnn"); ``cnn-quick`` uses 64 samples.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: One intra-op thread unless ``--threads N``, for torch *and* for the BLAS under numpy/scipy
#: (the peers' ``eigsh``): with two threads on a busy machine, OpenMP's and OpenBLAS's
#: spin-waiting charges CPU time that no computation used (an ``eigsh`` solve on the mlp took
#: 1.1–1.3 s of CPU with OpenBLAS's default two threads and 0.70 s with one). The BLAS variables
#: must be set before numpy loads, so scripts import this module before numpy or scipy.
THREADS = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 1
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import torch  # noqa: E402  (after the thread settings above)
from torch import Tensor, nn  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
REPO = ROOT.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

QUICK = "--quick" in sys.argv
#: The benchmarks' clock. By default the CPU time of this process (all its threads): on a shared
#: 2-core machine other processes steal the cores at random, which wall time would charge to
#: whichever code happened to run; CPU time does not. ``--wall`` switches to wall time
#: (``time.perf_counter``), right on an otherwise idle machine.
WALL = "--wall" in sys.argv
clock = time.perf_counter if WALL else time.process_time
CLOCK_NAME = "wall" if WALL else "process CPU"
torch.set_num_threads(THREADS)  # ratios are what the targets judge


@dataclass
class Problem:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss_of_output: Callable[[Tensor, Tensor], Tensor]

    def loss_fn(self) -> Tensor:
        return self.loss_of_output(self.model(self.x), self.y)

    @property
    def params(self) -> list[Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)


def mse(out: Tensor, y: Tensor) -> Tensor:
    """½‖f(x) − y‖² averaged over samples, written by hand (nn.MSELoss breaks under jvp(grad))."""
    return 0.5 * ((out - y) ** 2).sum() / out.shape[0]


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return torch.nn.functional.cross_entropy(out, y)


def natural_images(n: int, g: torch.Generator, *, alpha: float = 0.5) -> Tensor:
    """``n`` CIFAR-sized (3×32×32) inputs with the second-order statistics of natural images,
    flattened and standardised per feature as CIFAR usually is: Gaussian fields whose Fourier
    amplitude falls as 1/f^alpha, with correlated colour channels. With i.i.d. N(0, 1) inputs
    the "mlp" Hessian is far more crowded at the top than ANCHORS.md's (λ2/λ1 = 0.974 raw and
    0.997 preconditioned, against 0.949 and 0.959); these inputs give 0.959 and 0.945
    (benchmarks/sharpness.py, float64 references)."""
    f = torch.fft.fftfreq(32, dtype=torch.float64)
    amp = (f[:, None] ** 2 + f[None, :] ** 2).sqrt().clamp_min(1 / 32) ** (-alpha)
    z = torch.complex(
        torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
        torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64),
    )
    img = torch.fft.ifft2(z * amp).real
    colour = torch.tensor([[1.0, 0.9, 0.8], [0.9, 1.0, 0.9], [0.8, 0.9, 1.0]], dtype=torch.float64)
    img = torch.einsum("cd,ndhw->nchw", torch.linalg.cholesky(colour), img)
    x = img.reshape(n, -1)
    return ((x - x.mean(0)) / x.std(0)).float()


def make_mlp(quick: bool = False, seed: int = 0, inputs: str = "images") -> Problem:
    """The ANCHORS "mlp" (``inputs="images"``, see :func:`natural_images`; 768-100-100-10 on 256
    samples when ``quick``), or its crowded-spectrum variant on i.i.d. Gaussian inputs
    (``inputs="gaussian"``, problem name ``mlp-gauss``)."""
    d, h, n = (768, 100, 256) if quick else (3072, 200, 1000)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    if inputs == "images":
        x = natural_images(n, g)[:, :d]
    elif inputs == "gaussian":
        x = torch.randn(n, d, generator=g)
    else:
        raise ValueError(f"inputs must be 'images' or 'gaussian', got {inputs!r}")
    teacher = torch.randn(d, 10, generator=g)
    y = torch.nn.functional.one_hot((x @ teacher).argmax(1), 10).float()
    name = "mlp" + ("-gauss" if inputs == "gaussian" else "") + ("-quick" if quick else "")
    return Problem(name, model, x, y, mse)


def make_cnn(quick: bool = False, seed: int = 0) -> Problem:
    n = 64 if quick else 512
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 10),
    )
    x = torch.randn(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Problem("cnn-quick" if quick else "cnn", model, x, y, cross_entropy)


def gd_steps(problem: Problem, steps: int, lr: float) -> None:
    """Full-batch gradient descent, to move off the random initialisation (ANCHORS: 200 steps)."""
    opt = torch.optim.SGD(problem.params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        problem.loss_fn().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def timeit(fn: Callable[[], Any], *, repeat: int = 5, number: int = 1, warmup: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` rounds of ``number`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        for _ in range(number):
            fn()
        times.append((clock() - t0) / number)
    return statistics.median(times)


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, number: int) -> dict[str, float]:
    """Median seconds per call of each function, timed in alternating rounds (fair under drift)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = clock()
            for _ in range(number):
                fn()
            times[k].append((clock() - t0) / number)
    return {k: statistics.median(v) for k, v in times.items()}


#: The allocator setting of this process, recorded in every result's environment.
MALLOC = "glibc default"


def exact_rss_malloc() -> None:
    """Make glibc serve every allocation ≥ 64 KiB by mmap and return it on free, so that the
    resident set size follows torch's CPU tensors up and down (glibc's dynamic threshold would
    otherwise keep freed blocks around after the first large free).

    The scripts that measure peak memory (hvp.py, sharpness.py) call it at import; switching
    later in a process does not work (the heap keeps chunks freed under the default setting and
    a training step measured afterwards looked 30–60% smaller). Every large allocation then
    costs fresh page faults (on the mlp ~4,400 per HVP and ~3,400 per training step), which a
    user's process does not pay, so the timing-only scripts (step_overhead, peers, end_to_end,
    stopping_rules) keep glibc's default. Timed under this setting, a monitor every 100 steps
    cost +12.8% over 500 steps instead of +10.8% and the unmonitored step 47 ms instead of
    41 ms, and the peers' per-product allocations suffered more than stableopt's."""
    global MALLOC
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        MALLOC = "glibc, mmap threshold 64 KiB, trim threshold 128 KiB (exact RSS)"
    except (OSError, AttributeError):  # not glibc: RSS peaks are then upper bounds
        MALLOC = "not glibc: default"


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn: Callable[[], Any], *, interval: float = 2e-4) -> tuple[int, Any]:
    """(peak resident bytes above the level before the call, fn's result) for ``fn()``.

    tracemalloc does not see torch's CPU allocator, so a thread samples the resident set size
    (/proc/self/statm) every ``interval`` seconds while ``fn`` runs (allocations ≥ 64 KiB are
    mmap-backed in the scripts that call :func:`exact_rss_malloc` at import). Linux only;
    returns -1 elsewhere.
    """
    import threading

    gc.collect()
    try:
        base = _rss()
    except OSError:
        return -1, fn()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    try:
        out = fn()
        peak[0] = max(peak[0], _rss())
    finally:
        done.set()
        th.join()
    return peak[0] - base, out


def _blas_threads() -> Any:
    """Threads of each BLAS/OpenMP library loaded in this process (threadpoolctl, which
    scikit-learn brings), else the environment variable set above."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return os.environ.get("OPENBLAS_NUM_THREADS")
    return {Path(i["filepath"]).name: i["num_threads"] for i in threadpool_info()}


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    peers = {}
    for _mod, dist in [
        ("pyhessian", "pyhessian"),
        ("hessian_eigenthings", "hessian-eigenthings"),
        ("curvlinops", "curvlinops-for-pytorch"),
        ("scipy", "scipy"),
    ]:
        try:
            from importlib.metadata import version

            peers[dist] = version(dist)
        except Exception:
            peers[dist] = None
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "blas_threads": _blas_threads(),
        "load_average_1_5_15": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.is_available(),
        "quick": QUICK,
        "clock": CLOCK_NAME,
        "malloc": MALLOC,
        "peers": peers,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (f"{name}-quick.json" if QUICK else f"{name}.json")
    payload = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path.relative_to(REPO)}")
    return path


def target(
    label: str, value: float, limit: float, *, fmt: str = "{:.3f}", higher_is_better: bool = False
) -> dict[str, Any]:
    ok = value >= limit if higher_is_better else value <= limit
    op = "≥" if higher_is_better else "≤"
    print(f"  [{verdict(ok)}] {label}: {fmt.format(value)} (target {op} {fmt.format(limit)})")
    return {"target": label, "value": value, "limit": limit, "pass": bool(ok)}


CACHE = ROOT / ".cache"


def trained_mlp(quick: bool = False, steps: int | None = None, lr: float = 0.05, inputs: str = "images") -> Problem:
    """The ANCHORS "mlp" state: 200 full-batch GD steps (50 for the quick variant), cached on
    disk under benchmarks/.cache so that later scripts skip the training."""
    pb = make_mlp(quick, inputs=inputs)
    steps = (50 if quick else 200) if steps is None else steps
    path = CACHE / f"{pb.name}-{inputs}-gd{steps}-lr{lr:g}.pt"
    if path.exists():
        pb.model.load_state_dict(torch.load(path))
        return pb
    gd_steps(pb, steps, lr)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(pb.model.state_dict(), path)
    return pb


def adam_state(pb: Problem, steps: int = 10, lr: float = 1e-3):
    """A ``stableopt.Adam`` after ``steps`` full-batch steps from the problem's state (ANCHORS:
    "D from 10 Adam steps"); returns the optimizer."""
    import stableopt

    opt = stableopt.Adam(pb.params, lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        pb.loss_fn().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def flat_preconditioner(opt) -> Tensor:
    """P^{-1/2} of the optimizer's last step, flattened in parameter order."""
    return torch.cat([P.reshape(-1) for P in opt.preconditioner()]).rsqrt()


@contextlib.contextmanager
def flat_operator(
    loss_fn: Callable[[], Tensor], params: list[Tensor], d: Tensor | None = None, *, hvp: str = "autograd"
) -> Iterator[Callable[[Tensor], Tensor]]:
    """``with flat_operator(loss_fn, params, d) as mv:`` u ↦ H·u (or D·H·D·u for a flat diagonal
    ``d``) on flat vectors: stableopt's own public operator (``stableopt.measure`` over one group
    whose preconditioner is P = d⁻², so that P^{-1/2} = D), not a rebuilt copy of it."""
    import stableopt

    numels = [p.numel() for p in params]
    if d is None:
        pre, kind = [torch.ones_like(p) for p in params], "raw"
    else:
        pre, kind = [c.view_as(p).pow(-2) for c, p in zip(d.split(numels), params)], "preconditioned"
    group = stableopt.MeasuredGroup(params, pre, threshold=1.0)
    with stableopt.measure(loss_fn, [group], hvp=hvp) as m:
        yield m.operator(kind).matvec


def reference_eigs(
    pb: Problem, d: Tensor | None = None, *, k: int = 2, tol: float = 1e-9, dtype=torch.float64
) -> list[float]:
    """Tight Lanczos reference on a float64 copy of the model: the top ``k`` eigenvalues of H
    (or of D·H·D for a flat diagonal ``d``), rigorous residual bound ``tol``."""
    import copy

    import stableopt

    model = copy.deepcopy(pb.model).to(dtype)
    x = pb.x.to(dtype) if pb.x.is_floating_point() else pb.x
    y = pb.y.to(dtype) if pb.y.is_floating_point() else pb.y
    params = [p for p in model.parameters() if p.requires_grad]
    with flat_operator(lambda: pb.loss_of_output(model(x), y), params, None if d is None else d.to(dtype)) as mv:
        res = stableopt.lanczos(
            mv,
            n=sum(p.numel() for p in params),
            k=k,
            tol=tol,
            max_iters=150,
            dtype=dtype,
            generator=torch.Generator().manual_seed(12345),
        )
    return [float(x) for x in res.eigenvalues]
