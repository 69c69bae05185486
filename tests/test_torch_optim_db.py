"""torch's own optimizer table drives stableopt: ``common_optimizers.optim_db``.

For the Adam, AdamW, RMSprop and SGD entries of the installed torch's ``optim_db``, every
constructor input of ``optim_inputs_func`` (with the foreach and fused variants torch derives from
it, as torch's own tests do) steps bitwise like the torch class, also with a monitor measuring
every other step; every error input of ``optim_error_inputs_func`` raises (or warns) what torch
raises; and ``state_dict()`` is a pure function of the training state: deterministic, unchanged
by loading, and ``load_state_dict(sd)`` followed by ``state_dict()`` gives ``sd`` back. The cases
come from torch at collection time, so a new torch release brings its new configurations along.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import stableopt

try:  # torch's internal test registry; it needs the ``expecttest`` package (in the test extra)
    from torch.testing._internal.common_optimizers import (
        OptimizerErrorEnum,
        _get_optim_inputs_including_global_cliquey_kwargs,
        optim_db,
    )
except ImportError as exc:  # a torch build without its testing internals, or expecttest missing
    pytest.skip(
        f"torch.testing._internal.common_optimizers is not importable ({exc}); "
        "torch's optimizer table cannot drive these tests",
        allow_module_level=True,
    )

NAMES = ("Adam", "AdamW", "RMSprop", "SGD")
INFOS = {info.optim_cls.__name__: info for info in optim_db if info.optim_cls.__name__ in NAMES}
DTYPES = (torch.float64, torch.float32)
STEPS = 4  # enough for momentum, bias correction and amsgrad's running max to matter
NO_GRAD_STEP = 2  # on this step the bias has no gradient (torch skips the parameter)


def _inputs(name: str, dtype: torch.dtype) -> list[Any]:
    # differentiable=True is skipped as in torch's own tests (pytorch issue 116490): its step
    # updates leaves that require grad, which only works inside torch's differentiable harness
    return _get_optim_inputs_including_global_cliquey_kwargs("cpu", dtype, INFOS[name], skip=("differentiable",))


def _cases(dtypes: tuple[torch.dtype, ...]) -> list[Any]:
    cases = []
    for name in NAMES:
        for dtype in dtypes:
            for i, optim_input in enumerate(_inputs(name, dtype)):
                label = f"{name}-{str(dtype).removeprefix('torch.')}-{i}-{optim_input.desc}"
                cases.append(pytest.param(name, dtype, i, id=re.sub(r"[^\w.&-]+", "_", label)))
    return cases


def _kwargs(name: str, dtype: torch.dtype, index: int) -> dict[str, Any]:
    """A fresh copy of input ``index`` (Tensor lrs are mutable: no sharing between optimizers)."""
    return copy.deepcopy(_inputs(name, dtype)[index].kwargs)


def _params(dtype: torch.dtype, seed: int = 0, *, contiguous: bool = False) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(10, 5, generator=g, dtype=dtype))
    bias = nn.Parameter(torch.randn(10, generator=g, dtype=dtype))
    third = torch.randn(5, 2, generator=g, dtype=dtype)[:, 0]  # non-contiguous unless asked
    return [weight, bias, nn.Parameter(third.contiguous() if contiguous else third)]


def _copy_of(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Equal values and strides, new storage."""
    return [nn.Parameter(torch.empty_strided(p.size(), p.stride(), dtype=p.dtype).copy_(p.detach())) for p in params]


def _loss_fn(params: list[nn.Parameter]) -> Any:
    weight, bias, strided = params
    x = torch.linspace(-1.0, 1.0, 5, dtype=weight.dtype)
    return lambda: (torch.tanh(weight @ x + bias) ** 2).sum() + (strided**2).sum() * 0.5


def _grads(dtype: torch.dtype, step: int) -> list[Tensor | None]:
    g = torch.Generator().manual_seed(1000 + step)
    grads: list[Tensor | None] = [
        torch.randn(10, 5, generator=g, dtype=dtype),
        torch.randn(10, generator=g, dtype=dtype),
        torch.randn(5, generator=g, dtype=dtype),
    ]
    if step == NO_GRAD_STEP:
        grads[1] = None
    return grads


def _set_grads(params: list[nn.Parameter], grads: list[Tensor | None]) -> None:
    for p, grad in zip(params, grads):
        p.grad = None if grad is None else grad.clone()


def _assert_same(a: Any, b: Any, where: str = "state_dict") -> None:
    """Exact equality of nested dicts/lists/tensors/numbers (NaN equals NaN, dtypes must match)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{where}: {type(a).__name__} vs {type(b).__name__}"
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{where}: {m}")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (
            f"{where}: keys {list(a)} vs {list(b) if isinstance(b, dict) else b!r}"
        )
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{where}: nan vs {b!r}"
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} vs {b!r}"


# -- every input steps like torch ---------------------------------------------------------------
@pytest.mark.parametrize("monitored", [False, True], ids=["plain", "monitored"])
@pytest.mark.parametrize(("name", "dtype", "index"), _cases(DTYPES))
def test_optim_db_input_steps_bitwise_like_torch(name, dtype, index, monitored):
    theirs, ours = _params(dtype), _params(dtype)  # equal values, same strides, not shared
    torch_opt = INFOS[name].optim_cls(theirs, **_kwargs(name, dtype, index))
    opt = getattr(stableopt, name)(ours, **_kwargs(name, dtype, index))
    if monitored:  # measuring must not perturb training
        opt.monitor(_loss_fn(ours), every=2, raw=True, max_iters=8)
    for step in range(STEPS):
        grads = _grads(dtype, step)
        _set_grads(theirs, grads)
        _set_grads(ours, grads)
        if step % 2:  # the closure path too: step(closure) returns the closure's loss
            loss_t = torch_opt.step(lambda s=step: torch.tensor(float(s)))
            loss_s = opt.step(lambda s=step: torch.tensor(float(s)))
            assert loss_t.item() == loss_s.item() == float(step)
        else:
            torch_opt.step()
            opt.step()
        for i, (p, q) in enumerate(zip(theirs, ours)):
            torch.testing.assert_close(
                q, p, rtol=0, atol=0, msg=lambda m, i=i, step=step: f"param {i} after step {step + 1}: {m}"
            )
        for i, (p, q) in enumerate(zip(theirs, ours)):
            _assert_same(opt.state[q], torch_opt.state[p], f"state of param {i} after step {step + 1}")
    assert opt.steps_taken == STEPS
    if monitored:
        assert len(opt.history) == STEPS // 2


# -- every error input raises what torch raises --------------------------------------------------
def _error_cases() -> list[Any]:
    cases = []
    for name in NAMES:
        for i, error_input in enumerate(INFOS[name].optim_error_inputs_func("cpu", torch.float32)):
            label = f"{name}-{i}-{error_input.optimizer_error_input.desc}"
            cases.append(pytest.param(name, i, id=re.sub(r"[^\w.&-]+", "_", label)))
    return cases


def _raises_like(cls: type, error_input: Any) -> None:
    optim_input = error_input.optimizer_error_input
    kwargs = copy.deepcopy(optim_input.kwargs)
    construct = error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            opt = cls(optim_input.params, **kwargs)
            if not construct:
                opt.step()
        return
    if construct:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            cls(optim_input.params, **kwargs)
    else:
        opt = cls(optim_input.params, **kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            opt.step()


@pytest.mark.parametrize(("name", "index"), _error_cases())
def test_optim_db_error_input_raises_what_torch_raises(name, index):
    error_input = INFOS[name].optim_error_inputs_func("cpu", torch.float32)[index]
    _raises_like(INFOS[name].optim_cls, error_input)  # the table holds for torch itself...
    _raises_like(getattr(stableopt, name), error_input)  # ...and for stableopt's class


# -- state dicts are pure functions of the training state ---------------------------------------


def _trained(name: str, dtype: torch.dtype, index: int) -> tuple[Any, list[nn.Parameter]]:
    """An optimizer after a few steps, one measurement (history, warm start) and a monitor.

    Contiguous parameters, as in torch's own state-dict tests: with a non-contiguous parameter,
    torch.optim.Adam(fused=True, weight_decay=0.1) itself ends with a different ``exp_avg`` than
    a copy that loaded its state dict (torch 2.13, CPU), which is torch's to fix, not ours.
    """
    params = _params(dtype, contiguous=True)
    opt = getattr(stableopt, name)(params, **_kwargs(name, dtype, index))
    opt.monitor(_loss_fn(params), every=1000)  # a schedule in the state, never firing here
    for step in range(STEPS):
        _set_grads(params, _grads(dtype, step))
        opt.step()
    opt.sharpness(_loss_fn(params), max_iters=8)
    return opt, params


@pytest.mark.parametrize(("name", "dtype", "index"), _cases((torch.float32,)))
def test_optim_db_state_dict_is_deterministic(name, dtype, index):
    opt, params = _trained(name, dtype, index)
    _assert_same(opt.state_dict(), opt.state_dict(), "two calls")
    # a copy on equal but not identical parameters, then both train on
    params_c = _copy_of(params)
    opt_c = getattr(stableopt, name)(params_c, **_kwargs(name, dtype, index))
    saved = copy.deepcopy(opt.state_dict())
    loaded = copy.deepcopy(saved)
    opt_c.load_state_dict(loaded)
    _assert_same(loaded, saved, "the loaded dict after loading")
    for step in range(STEPS, 2 * STEPS):
        for ps in (params, params_c):
            _set_grads(ps, _grads(dtype, step))
        opt.step()
        opt_c.step()
        for p, q in zip(params, params_c):
            torch.testing.assert_close(q, p, rtol=0, atol=0)
    _assert_same(opt_c.state_dict(), opt.state_dict(), "original vs loaded copy")


@pytest.mark.parametrize(("name", "dtype", "index"), _cases((torch.float32,)))
def test_optim_db_state_dict_round_trips(name, dtype, index):
    opt, _ = _trained(name, dtype, index)
    sd = opt.state_dict()
    assert sd["stableopt"]["components"]["history"]["columns"]["step"].tolist() == [STEPS]
    fresh = getattr(stableopt, name)(_params(dtype, seed=1, contiguous=True), **_kwargs(name, dtype, index))
    fresh.load_state_dict(copy.deepcopy(sd))
    _assert_same(fresh.state_dict(), sd, "load_state_dict(sd) then state_dict()")
    # and loading it back into the optimizer it came from changes nothing either
    opt.load_state_dict(copy.deepcopy(sd))
    _assert_same(opt.state_dict(), sd, "reloaded into itself")


def test_optim_db_has_the_four_optimizers():
    """The table this module is driven by still lists what we subclass (else nothing runs)."""
    assert sorted(INFOS) == sorted(NAMES)
    for name in NAMES:
        assert issubclass(getattr(stableopt, name), INFOS[name].optim_cls)
        assert _inputs(name, torch.float32) and INFOS[name].optim_error_inputs_func is not None
