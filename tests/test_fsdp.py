"""FSDP2 (``fully_shard``, DTensor parameters): 2 CPU processes, gloo, float64.

Every rank holds a shard of every parameter and of every Lanczos vector; products are finite
differences through FSDP's own forward and backward. The measurement must equal one process on
the unsharded model and data, leave every rank's shards untouched, and a rank that fails must
make every rank raise instead of waiting in FSDP's collectives. The recipe of
docs/distributed.md, read from the docs and run as written (no ``mesh=``: one default mesh
object per ``fully_shard`` call), must work too.
"""

from __future__ import annotations

import copy
import os
import re
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import stableopt

WORLD = 2
SAMPLES = (3, 5)  # uneven shards of the data, to check the sample weighting across ranks
DOCS = Path(__file__).resolve().parents[1] / "docs" / "distributed.md"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3)).double()  # 7 rows: uneven shards


def _data():
    g = torch.Generator().manual_seed(1)
    n = sum(SAMPLES)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def mse(out, y):
    return 0.5 * ((out - y) ** 2).sum(1).mean()


def _sharded():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _locals(tensors):
    return [t.to_local().clone() if hasattr(t, "to_local") else t.clone() for t in tensors]


def _state(opt):
    return [(k, _locals([v])[0]) for s in opt.state.values() for k, v in sorted(s.items())]


def _unsharded_twin(model, opt, cls=stableopt.Adam, make=_model):
    """One process's copy of the model and optimizer, from the full (gathered) tensors."""
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # a collective: all ranks
    sd = opt.state_dict()
    state = {
        i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in s.items()}
        for i, s in sd["state"].items()
    }
    ref = make()
    ref.load_state_dict(full)
    ref_opt = cls(ref.parameters(), lr=1e-2)
    ref_opt.load_state_dict(
        copy.deepcopy({"state": state, "param_groups": sd["param_groups"], "stableopt": sd["stableopt"]})
    )
    return ref, ref_opt


class _Layered(nn.Module):
    """A model with ``.layers``, as the docs' recipe has it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 7), nn.Linear(7, 3)]).double()

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


def docs_recipe() -> str:
    """The code block of docs/distributed.md's FSDP2 section, verbatim."""
    section = DOCS.read_text(encoding="utf-8").split("## FSDP2", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "docs/distributed.md: no python block in the FSDP2 section"
    return match.group(1)


def _recipe(rank: int, results: dict) -> None:
    """The docs' recipe as written: fully_shard(layer) per layer, then fully_shard(model), no
    mesh= anywhere, so every call makes its own default mesh object (equal meshes)."""
    from torch.distributed.fsdp import fully_shard

    stableopt.distributed.configure(sharded_timeout=30.0)
    x_all, y_all = _data()
    half = len(x_all) // WORLD  # equal shards: a plain loss_fn averages ranks like FSDP does
    x, y = x_all[rank * half : (rank + 1) * half], y_all[rank * half : (rank + 1) * half]
    model = _Layered()
    loss_fn = lambda: mse(model(x), y)  # noqa: E731
    scope = {"model": model, "fully_shard": fully_shard, "stableopt": stableopt, "loss_fn": loss_fn}
    exec(docs_recipe(), scope)  # the recipe defines opt
    opt = scope["opt"]
    results["recipe_meshes"] = len({id(p.device_mesh) for p in model.parameters()})
    for _ in range(3):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    rep = opt.sharpness(loss_fn, raw=True, k=2, tol=1e-10)
    ref, ref_opt = _unsharded_twin(model, opt, stableopt.AdamW, _Layered)
    with stableopt.distributed.local():
        expected = ref_opt.sharpness(
            lambda: mse(ref(x_all[: WORLD * half]), y_all[: WORLD * half]), raw=True, k=2, tol=1e-10, hvp="autograd"
        )
    results["recipe"] = (rep.preconditioned, rep.ratio, rep.raw, rep.eigenvalues, rep.hvp_backend)
    results["recipe_expected"] = (expected.preconditioned, expected.ratio, expected.raw, expected.eigenvalues)


def _mixed_precision(rank: int, results: dict) -> None:
    """FSDP2 with a bf16 MixedPrecisionPolicy: the forward's matrix products run in bf16. fd
    must see that (compute dtype), step by bf16's resolution and flag the result instead of
    reporting a value 44% off as converged; a float32 policy on the same model converges."""
    import warnings

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    x_all, y_all = _data()
    half = len(x_all) // WORLD
    x, y = x_all[rank * half : (rank + 1) * half].float(), y_all[rank * half : (rank + 1) * half].float()
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        model = _Layered().float()
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for layer in model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        opt = stableopt.Adam(model.parameters(), lr=1e-2)
        loss_fn = lambda model=model: mse(model(x), y)  # noqa: E731
        for _ in range(5):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rep = opt.sharpness(loss_fn, raw=True)
        ref, ref_opt = _unsharded_twin(model, opt, stableopt.Adam, lambda: _Layered().float())
        with stableopt.distributed.local():
            expected = ref_opt.sharpness(
                lambda ref=ref: mse(ref(x_all[: WORLD * half].float()), y_all[: WORLD * half].float()),
                raw=True,
                tol=1e-6,
                hvp="autograd",
            )
        out[name] = (
            rep.preconditioned,
            rep.raw,
            rep.converged,
            rep.hvp_error,
            [str(w.message) for w in caught],
            expected.preconditioned,
            expected.raw,
        )
    results["mixed_precision"] = out


def _scenarios(rank: int, results: dict) -> None:
    stableopt.distributed.configure(sharded_timeout=30.0)  # a desynchronised test fails fast
    x_all, y_all = _data()
    lo = sum(SAMPLES[:rank])
    x, y = x_all[lo : lo + SAMPLES[rank]], y_all[lo : lo + SAMPLES[rank]]
    model = _sharded()
    opt = stableopt.Adam(model.parameters(), lr=1e-2)
    batches = list(zip(torch.tensor_split(x, 2), torch.tensor_split(y, 2)))  # 2 batches each, uneven sizes
    batch_loss = lambda b: mse(model(b[0]), b[1])  # noqa: E731
    for _ in range(3):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()

    params0, grads0, state0 = _locals(model.parameters()), _locals(p.grad for p in model.parameters()), _state(opt)
    rep = opt.sharpness(batch_loss, batches=batches, raw=True, k=2, tol=1e-7)  # fd: ~1e-9 rounding in float64
    assert rep.hvp_backend == "fd" and rep.converged, rep
    assert all(torch.equal(a, p.to_local()) for a, p in zip(params0, model.parameters()))
    assert all(torch.equal(a, p.grad.to_local()) for a, p in zip(grads0, model.parameters()))
    assert all(k == k2 and torch.equal(a, b) for (k, a), (k2, b) in zip(state0, _state(opt)))
    with pytest.raises(stableopt.DoubleBackwardError, match="cannot measure sharded"):
        opt.sharpness(batch_loss, batches=batches, hvp="autograd")
    uneven = [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]  # 2 batches on rank 0, 3 on rank 1
    with pytest.raises(RuntimeError, match="ranks disagree on number of batches"):
        opt.sharpness(batch_loss, batches=uneven)

    # the same measurement in one process, on the unsharded model and the union of the data
    ref, ref_opt = _unsharded_twin(model, opt)
    with stableopt.distributed.local():
        union = [(x_all[i : i + 2], y_all[i : i + 2]) for i in range(0, len(x_all), 2)]
        expected = ref_opt.sharpness(lambda: mse(ref(x_all), y_all), raw=True, k=2, tol=1e-10, hvp="autograd")
        expected_b = ref_opt.sharpness(
            lambda b: mse(ref(b[0]), b[1]), batches=union, raw=True, k=2, tol=1e-10, hvp="autograd"
        )
    assert expected.preconditioned == pytest.approx(expected_b.preconditioned, rel=1e-9)  # union = full batch
    results["measured"] = (rep.preconditioned, rep.ratio, rep.raw, rep.eigenvalues, rep.loss)
    results["expected"] = (expected.preconditioned, expected.ratio, expected.raw, expected.eigenvalues, expected.loss)

    # monitors and the guard work through FSDP's step hooks like anywhere else
    opt.monitor(lambda: mse(model(x), y), every=1)
    for _ in range(2):
        opt.zero_grad()
        mse(model(x), y).backward()
        opt.step()
    results["monitored"] = opt.history.column("ratio").tolist()

    # a rank whose loss_fn raises mid-solve: every rank raises, none waits for the 30-minute timeout
    stableopt.distributed.configure(sharded_timeout=5.0)
    calls = [0]

    def failing():
        calls[0] += 1
        if rank == 1 and calls[0] == 4:
            raise ValueError("boom on rank 1")
        return mse(model(x), y)

    t0 = time.monotonic()
    try:
        opt.sharpness(failing, tol=1e-10)
    except RuntimeError as exc:
        results["failure"] = (str(exc), time.monotonic() - t0)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results: dict = {}
    try:  # first: the failure scenario at the end of _scenarios leaves the process group out of step
        _recipe(rank, results)
    except BaseException:  # noqa: BLE001 - reported by the recipe's own test
        results["recipe_error"] = traceback.format_exc()
    try:
        _mixed_precision(rank, results)
    except BaseException:  # noqa: BLE001 - reported by its own test
        results["mixed_precision_error"] = traceback.format_exc()
    try:
        _scenarios(rank, results)
    except BaseException:  # noqa: BLE001 - reported to the parent through the file
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # the process group is out of step after the failure scenario: leave without collectives
    os._exit(0)


def _fsdp_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def fsdp_results():
    out_dir = tempfile.mkdtemp(prefix="stableopt-fsdp-")
    fd, init_file = tempfile.mkstemp(prefix="stableopt-fsdp-init-")
    os.close(fd)
    os.unlink(init_file)
    mp.spawn(_worker, args=(init_file, out_dir), nprocs=WORLD, join=True)
    results = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    assert not errors, "\n".join(errors)
    return results


pytestmark = pytest.mark.skipif(not _fsdp_available(), reason="needs torch.distributed.fsdp.fully_shard and gloo")


def test_fsdp2_measurement_equals_one_process_on_the_unsharded_model(fsdp_results):
    for res in fsdp_results:  # every rank, and all ranks agree
        (pre, ratio, raw, eig, loss), (e_pre, e_ratio, e_raw, e_eig, e_loss) = res["measured"], res["expected"]
        assert pre == pytest.approx(e_pre, rel=1e-6)
        assert ratio == pytest.approx(e_ratio, rel=1e-6)
        assert raw == pytest.approx(e_raw, rel=1e-6)
        assert eig == pytest.approx(e_eig, rel=1e-6)
        assert loss == pytest.approx(e_loss, rel=1e-12)
    assert fsdp_results[0]["measured"] == fsdp_results[1]["measured"]


def test_fsdp2_monitor_records_on_every_rank(fsdp_results):
    ratios = [res["monitored"] for res in fsdp_results]
    assert len(ratios[0]) == 3 and ratios[0] == ratios[1]  # the manual one and two monitored


def test_a_failing_rank_makes_every_rank_raise_without_hanging(fsdp_results):
    for res in fsdp_results:
        message, seconds = res["failure"]
        assert "during a sharded (FSDP2) measurement" in message
        assert seconds < 60.0  # bounded by sharded_timeout (5 s here), not the 30-minute default
    assert "boom on rank 1" in fsdp_results[1]["failure"][0]


def test_the_docs_recipe_without_a_mesh_equals_one_process_on_the_unsharded_model(fsdp_results):
    recipe = docs_recipe()
    assert "fully_shard(layer)" in recipe and "fully_shard(model)" in recipe and "mesh" not in recipe
    for res in fsdp_results:
        assert "recipe_error" not in res, res["recipe_error"]
        assert res["recipe_meshes"] > 1  # distinct (equal) mesh objects: what the recipe makes
        (pre, ratio, raw, eig, backend), (e_pre, e_ratio, e_raw, e_eig) = res["recipe"], res["recipe_expected"]
        assert backend == "fd"
        assert pre == pytest.approx(e_pre, rel=1e-6)
        assert ratio == pytest.approx(e_ratio, rel=1e-6)
        assert raw == pytest.approx(e_raw, rel=1e-6)
        assert eig == pytest.approx(e_eig, rel=1e-6)
    assert fsdp_results[0]["recipe"] == fsdp_results[1]["recipe"]


def test_a_bf16_mixed_precision_policy_is_flagged_and_a_float32_one_converges(fsdp_results):
    for res in fsdp_results:
        assert "mixed_precision_error" not in res, res["mixed_precision_error"]
        pre, raw, converged, error, warned, e_pre, e_raw = res["mixed_precision"]["bf16"]
        assert not converged and error > 1e-3  # flagged, with its estimated error ...
        assert any("bfloat16" in w and "converged=False" in w for w in warned)
        # ... an honest one: the value is within its estimated error of one float32 process
        assert abs(pre / e_pre - 1) <= error and abs(raw / e_raw - 1) <= error
        pre, raw, converged, error, warned, e_pre, e_raw = res["mixed_precision"]["fp32"]
        assert converged and error <= 1e-3 and not any("converged=False" in w for w in warned)
        assert pre == pytest.approx(e_pre, rel=2e-3) and raw == pytest.approx(e_raw, rel=2e-3)
    assert fsdp_results[0]["mixed_precision"]["bf16"][:4] == fsdp_results[1]["mixed_precision"]["bf16"][:4]
