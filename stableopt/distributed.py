"""Sharpness measurements inside ``torch.distributed`` training (DistributedDataParallel).

When ``torch.distributed`` is initialised with more than one process, every measurement
(``opt.sharpness()``, monitors, the guard) is a *collective*: each rank computes Hessian-vector
products on its own shard and the products are all-reduced, so every rank gets the same report,
equal (to float tolerance) to the single-process measurement on the union of the shards.

Weighting (docs/distributed.md):

* with ``batches=[...]`` each rank's Hessian is the batch-size-weighted mean over its batches and
  the ranks are weighted by their sample counts n_r / N (N = Σ n_r): exactly the single-process
  Hessian of the concatenated ``batches`` of all ranks;
* with a plain ``loss_fn()`` the local sample count is unknown and every rank weighs 1/world_size,
  which is also how DDP averages gradients; it equals the union Hessian when shards are of equal
  size (DistributedSampler's default).

Guarantees: the cold Lanczos start vector comes from the optimizer's private, deterministic
generator and is broadcast from rank 0 anyway; a consistency check (one small all-reduce) makes
every rank raise the same clear error when ranks disagree on the parameter count, the replicated
parameter values, ``k``, ``raw``, ``tol``, ``max_iters``, the step or the use of ``batches``;
an exception in the first evaluation of ``loss_fn`` on any rank is raised on every rank instead of
leaving the others waiting in a collective. Calls through a ``DistributedDataParallel`` module are
made as inside ``no_sync()``: no gradient bucket is prepared, no buffer is broadcast, DDP's state
is as it was afterwards.

Like every collective, a measurement must be taken on every rank of the group (a monitor does
this by itself: it runs in ``step()``). To measure one rank's shard alone, use
:func:`local` (or ``configure(enabled=False)``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Reduction", "active", "configure", "local", "quiet_ddp"]

_CONFIG: dict[str, Any] = {"enabled": True, "process_group": None}
_LOCAL_DEPTH = [0]


def configure(*, enabled: bool = True, process_group: Any = None) -> None:
    """Set how measurements behave under ``torch.distributed``.

    Args:
        enabled: all-reduce measurements across the process group (the default). ``False``:
            every rank measures its own shard alone, with no communication.
        process_group: the group to reduce over (default: the default group, ``WORLD``).

    >>> configure(enabled=True)   # the default
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _CONFIG["enabled"] = enabled
    _CONFIG["process_group"] = process_group


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside this block measurements are per rank, with no communication.

    >>> with local():
    ...     pass
    """
    _LOCAL_DEPTH[0] += 1
    try:
        yield
    finally:
        _LOCAL_DEPTH[0] -= 1


def _group_and_size() -> tuple[Any, int]:
    if not (_CONFIG["enabled"] and _LOCAL_DEPTH[0] == 0):
        return None, 1
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    group = _CONFIG["process_group"]
    return group, dist.get_world_size(group)


def active() -> bool:
    """Whether a measurement taken now would be all-reduced across processes.

    >>> active()   # no process group here
    False
    """
    return _group_and_size()[1] > 1


class Reduction:
    """The collectives of one distributed measurement (built by :meth:`begin`)."""

    def __init__(self, group: Any, world_size: int, device: torch.device) -> None:
        self.group = group
        self.world_size = world_size
        self.device = device
        self.rank = torch.distributed.get_rank(group)
        self.weight = 1.0 / world_size  # set by first_evaluation()
        self.samples: int | None = None

    @classmethod
    def begin(cls, params: Sequence[Tensor]) -> Reduction | None:
        """A reduction for this measurement, or None outside multi-process torch.distributed.

        Raises:
            TypeError: sharded (DTensor) parameters, from FSDP2 or tensor parallelism, which
                are not supported yet (docs/distributed.md says why and how they would be).
        """
        for p in params:
            if _is_dtensor(p):
                raise TypeError(
                    "stableopt: sharded parameters are not supported yet: got a parameter of type "
                    f"{type(p).__name__} (FSDP2 fully_shard or tensor parallelism), expected plain "
                    "tensors (replicated DDP parameters work); see docs/distributed.md for what "
                    "works and the workarounds"
                )
        group, size = _group_and_size()
        if size <= 1:
            return None
        return cls(group, size, params[0].device)

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def _src(self) -> int:
        dist = torch.distributed
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def check(self, *, n: int, k: int, raw: bool, tol: float, max_iters: int | None, step: int,
              batched: bool, params: Sequence[Tensor]) -> None:
        """Raise the same RuntimeError on every rank unless all ranks measure the same thing."""
        fields = {
            "number of parameters": float(n), "k": float(k), "raw": float(raw), "tol": float(tol),
            "max_iters": -1.0 if max_iters is None else float(max_iters), "step": float(step),
            "batches given": float(batched), "parameter checksum": 0.0,
        }
        values = torch.tensor(list(fields.values()), dtype=torch.float64, device=self.device)
        with torch.no_grad():  # on the device, one transfer: DDP replicas are bitwise equal
            values[-1] = torch.stack([p.detach().double().sum() for p in params]).sum()
        both = self._all_reduce(torch.cat([values, -values]), torch.distributed.ReduceOp.MAX)
        hi, lo = both[: len(fields)], -both[len(fields):]
        bad = [
            name for name, a, b in zip(fields, hi.tolist(), lo.tolist())
            if not (a == b or (math.isnan(a) and math.isnan(b)))
        ]
        if bad:
            raise RuntimeError(
                "stableopt: ranks disagree on " + ", ".join(bad) + " for this sharpness "
                f"measurement (rank {self.rank} of {self.world_size}). A distributed measurement "
                "must be taken on every rank with the same arguments on replicated (DDP) "
                "parameters; to measure each rank alone use stableopt.distributed.local()"
            )

    def first_evaluation(self, build: Callable[[], Any]) -> Any:
        """Run ``build()`` (graph building: the first ``loss_fn`` calls) on every rank; if it
        fails anywhere, raise everywhere. Then fix this rank's weight and the global loss."""
        error: Exception | None = None
        hvp = None
        try:
            hvp = build()
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        samples = getattr(hvp, "samples", None) if hvp is not None else None
        loss = float(hvp.loss) if hvp is not None else math.nan
        known = samples is not None
        stats = torch.tensor(
            [float(error is not None), float(known), float(samples or 0),
             float(samples or 0) * loss if known else 0.0, loss],
            dtype=torch.float64, device=self.device,
        )
        failed, n_known, total, weighted, plain = self._all_reduce(stats).tolist()
        if error is not None:
            raise error
        if failed:
            raise RuntimeError(
                f"stableopt: loss_fn raised on {int(failed)} of {self.world_size} ranks during a "
                "distributed sharpness measurement (this rank's loss_fn succeeded); see the "
                "failing ranks' tracebacks"
            )
        if n_known == self.world_size and total > 0:
            self.samples = int(samples)  # type: ignore[arg-type]
            self.weight = samples / total  # type: ignore[operator]
            hvp.loss = torch.tensor(weighted / total, dtype=torch.float64)
        else:
            self.weight = 1.0 / self.world_size
            hvp.loss = torch.tensor(plain / self.world_size, dtype=torch.float64)
        return _ReducedHVP(hvp, self)

    def reduce_flat(self, y: Tensor) -> Tensor:
        """Σ_r w_r · y_r (in place)."""
        y.mul_(self.weight)
        return self._all_reduce(y)

    def start_vector(self, v0: Tensor | None, n: int, generator: torch.Generator,
                     dtype: torch.dtype, device: torch.device) -> tuple[Tensor, bool]:
        """Rank 0's Lanczos start vector and whether it is a cold (random) start, on every rank.

        Every rank then runs the same solve with the same stopping rule, even if their warm
        starts differ. A cold start draws exactly what :func:`stableopt.lanczos` would have
        drawn from the (deterministic) generator, so the distributed run matches the
        single-process one.
        """
        cold = v0 is None
        if v0 is None:
            v0 = torch.randn(n, generator=generator, dtype=dtype).to(device)
        flag = torch.tensor([1.0 if cold else 0.0], dtype=dtype, device=device)
        buf = torch.cat([v0.to(dtype=dtype, device=device).reshape(-1), flag])
        torch.distributed.broadcast(buf, src=self._src(), group=self.group)
        return buf[:n].contiguous(), bool(buf[n] != 0)

    def agree_seconds(self, seconds: float) -> float:
        """The slowest rank's wall time, so that every rank reports identical numbers."""
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        return float(self._all_reduce(t, torch.distributed.ReduceOp.MAX)[0])


class _ReducedHVP:
    """An :class:`~stableopt.hvp.HVP` whose products are all-reduced across ranks."""

    def __init__(self, hvp: Any, reduction: Reduction) -> None:
        self._hvp = hvp
        self._reduction = reduction
        self.params = hvp.params
        self.loss = hvp.loss

    @property
    def calls(self) -> int:
        return self._hvp.calls

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        out = self._hvp(vectors)
        flat = torch.cat([o.reshape(-1) for o in out])
        self._reduction.reduce_flat(flat)
        return [c.view_as(o) for c, o in zip(flat.split([o.numel() for o in out]), out)]


def _is_dtensor(t: Tensor) -> bool:
    cls = type(t)
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in cls.__mro__)


def _is_ddp(module: nn.Module) -> bool:
    ddp = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    return ddp is not None and isinstance(module, ddp)


@contextlib.contextmanager
def quiet_ddp() -> Iterator[None]:
    """Make every ``DistributedDataParallel`` forward inside the block behave as in ``no_sync()``.

    A measurement differentiates with ``torch.autograd.grad(create_graph=True)`` and never calls
    ``backward()``, so DDP must not prepare a gradient reduction (its reducer would then wait for
    a backward that never comes) nor broadcast buffers (a collective per forward). The flags are
    restored on exit, so DDP's next training forward is exactly the one it would have been.
    """
    saved: dict[int, tuple[nn.Module, bool, bool]] = {}

    def hook(module: nn.Module, args: Any) -> None:
        if id(module) in saved or not _is_ddp(module):
            return
        saved[id(module)] = (
            module, module.require_backward_grad_sync, module.require_forward_param_sync
        )
        module.require_backward_grad_sync = False
        module.require_forward_param_sync = False

    handle = nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        for module, backward_sync, forward_sync in saved.values():
            module.require_backward_grad_sync = backward_sync
            module.require_forward_param_sync = forward_sync
