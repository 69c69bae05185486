"""Sharpness measurements inside ``torch.distributed`` training (DistributedDataParallel).

When ``torch.distributed`` is initialised with more than one process, every measurement
(``opt.sharpness()``, monitors, the guard) is a *collective*: each rank computes Hessian-vector
products on its own shard of the data and the products are all-reduced, so every rank gets the
same report, equal (to float tolerance) to the single-process measurement on the union of the
shards.

Two layouts (:class:`Reduction`):

* **replicated** parameters (DDP, or plain data parallelism): every rank holds every parameter;
  products are all-reduced with the weights below, Lanczos vectors are identical on every rank.
* **sharded** parameters (FSDP2 ``fully_shard``: DTensor): every rank holds a shard of every
  parameter and of every Lanczos vector (:class:`stableopt.space.ParameterSpace`); products use
  ``hvp="fd"`` through the ordinary FSDP forward and backward, whose reduce-scatter already
  averages the gradient over ranks; inner products are all-reduced over the mesh.

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
an exception in the first evaluation of ``loss_fn`` or in any Hessian-vector product on any rank
is raised on every rank (agreed through the collective that follows every product) instead of
leaving the others waiting in a collective. Calls through a ``DistributedDataParallel`` module are
made as inside ``no_sync()``: no gradient bucket is prepared, no buffer is broadcast, DDP's state
is as it was afterwards.

Like every collective, a measurement must be taken on every rank of the group (a monitor does
this by itself: it runs in ``step()``). To measure one rank's shard alone, use
:func:`local` (or ``configure(enabled=False)``).
"""

from __future__ import annotations

import contextlib
import datetime
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .space import local_tensor

__all__ = ["Reduction", "active", "configure", "local", "quiet_ddp"]

_CONFIG: dict[str, Any] = {"enabled": True, "process_group": None, "sharded_timeout": 300.0}
_LOCAL_DEPTH = [0]


def configure(*, enabled: bool = True, process_group: Any = None, sharded_timeout: float | None = None) -> None:
    """Set how measurements behave under ``torch.distributed``.

    Args:
        enabled: all-reduce measurements across the process group (the default). ``False``:
            every rank measures its own shard alone, with no communication (replicated
            parameters only; a shard of an FSDP2 model is not a model).
        process_group: the group to reduce over (default: the default group, ``WORLD``).
        sharded_timeout: seconds a collective may wait during a measurement of sharded
            (FSDP2) parameters before it fails (default 300; None keeps the current value).
            FSDP's own collectives run inside every product, so a rank whose ``loss_fn``
            raises leaves the others waiting in them: the shorter timeout makes them raise
            too, instead of waiting for the process group's own (30 minutes for gloo). The
            group's timeout is put back when the measurement ends.

    >>> configure(enabled=True)   # the default
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    if sharded_timeout is not None:
        if (
            isinstance(sharded_timeout, bool)
            or not isinstance(sharded_timeout, (int, float))
            or not sharded_timeout > 0
        ):
            raise ValueError(f"sharded_timeout must be a positive number of seconds, got {sharded_timeout!r}")
        _CONFIG["sharded_timeout"] = float(sharded_timeout)
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

    def __init__(self, group: Any, world_size: int, device: torch.device, *, sharded: bool = False) -> None:
        self.group = group
        self.world_size = world_size
        self.device = device
        self.rank = torch.distributed.get_rank(group)
        #: parameters are DTensor shards (FSDP2): products come reduced, vectors are shards
        self.sharded = sharded
        self.weight = 1.0 / world_size  # set by first_evaluation()
        self.samples: int | None = None

    @classmethod
    def begin(cls, params: Sequence[Tensor], *, sharded: bool = False, group: Any = None) -> Reduction | None:
        """A reduction for this measurement, or None outside multi-process torch.distributed.

        ``sharded``: the parameters are DTensor shards (FSDP2) reduced over ``group`` (their
        mesh's); a reduction then exists even inside :func:`local`, since a shard alone is not a
        model.
        """
        if sharded:
            size = torch.distributed.get_world_size(group)
        else:
            group, size = _group_and_size()
        if size <= 1:
            return None
        red = cls(group, size, local_tensor(params[0]).device, sharded=sharded)
        if sharded:
            red._bound_timeout()
        return red

    def _bound_timeout(self) -> None:
        """Sharded: lower the group's timeout to ``sharded_timeout`` until :meth:`close`."""
        c10d = torch.distributed.distributed_c10d
        group = self.group if self.group is not None else c10d._get_default_group()
        try:
            backend = group._get_backend(self.device)
            previous = backend.options._timeout
            c10d._set_pg_timeout(datetime.timedelta(seconds=_CONFIG["sharded_timeout"]), group)
        except (AttributeError, RuntimeError, ValueError, TypeError):  # pragma: no cover - other backends
            return
        self._restore = lambda: c10d._set_pg_timeout(previous, group)

    _restore: Callable[[], None] | None = None

    def close(self) -> None:
        """Undo what :meth:`begin` changed (the sharded timeout)."""
        restore, self._restore = self._restore, None
        if restore is not None:
            restore()

    def sharded_failure(self, exc: BaseException, where: str) -> RuntimeError:
        """The error a rank raises when ``where`` failed during a sharded measurement.

        No collective follows: the other ranks may be inside FSDP's collectives, which a
        failed rank can no longer match; they raise when those time out (``sharded_timeout``).
        """
        return RuntimeError(
            f"stableopt: {where} failed on rank {self.rank} of {self.world_size} during a sharded "
            f"(FSDP2) measurement: {type(exc).__name__}: {exc}. If that is a timeout, another "
            "rank failed first (see its traceback). Ranks still inside FSDP's collectives raise "
            "when those time out (stableopt.distributed.configure(sharded_timeout=...)); the "
            "process group is then out of step: end the job"
        )

    # -- collectives ---------------------------------------------------------------------------
    def _all_reduce(self, t: Tensor, op: Any = None) -> Tensor:
        dist = torch.distributed
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=self.group)
        return t

    def _src(self) -> int:
        dist = torch.distributed
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def check(self, fingerprint: Mapping[str, float], params: Sequence[Tensor]) -> None:
        """Raise the same RuntimeError on every rank unless all ranks measure the same thing:
        the same ``fingerprint`` values and, for replicated parameters, the same parameters."""
        fields = {name: float(value) for name, value in fingerprint.items()}
        if not self.sharded:
            fields["parameter checksum"] = 0.0
        values = torch.tensor(list(fields.values()), dtype=torch.float64, device=self.device)
        if not self.sharded:
            with torch.no_grad():  # on the device, one transfer: DDP replicas are bitwise equal
                values[-1] = torch.stack([p.detach().double().sum() for p in params]).sum()
        both = self._all_reduce(torch.cat([values, -values]), torch.distributed.ReduceOp.MAX)
        hi, lo = both[: len(fields)], -both[len(fields) :]
        bad = [
            name
            for name, a, b in zip(fields, hi.tolist(), lo.tolist())
            if not (a == b or (math.isnan(a) and math.isnan(b)))
        ]
        if bad:
            layout = "sharded (FSDP2)" if self.sharded else "replicated (DDP)"
            raise RuntimeError(
                "stableopt: ranks disagree on " + ", ".join(bad) + " for this sharpness "
                f"measurement (rank {self.rank} of {self.world_size}). A distributed measurement "
                f"must be taken on every rank with the same arguments on {layout} parameters; "
                "to measure each rank of a replicated model alone use stableopt.distributed.local()"
            )

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is True on any rank."""
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)
        return tuple(bool(x > 0) for x in self._all_reduce(t, torch.distributed.ReduceOp.MAX).tolist())

    def loss_scale(self, samples: int | None) -> float:
        """Sharded products: the factor on the local loss that turns FSDP's mean over ranks into
        the sample-weighted mean W·n_r/N (1 when sample counts are unknown)."""
        t = torch.tensor([float(samples or 0), float(samples is None)], dtype=torch.float64, device=self.device)
        total, unknown = self._all_reduce(t).tolist()
        if unknown or total <= 0 or samples is None:
            return 1.0
        return self.world_size * samples / total

    def first_evaluation(self, build: Callable[[], Any]) -> Any:
        """Run ``build()`` (graph building: the first ``loss_fn`` calls) on every rank; if it
        fails anywhere, raise everywhere. Then fix this rank's weight and the global loss, and
        return the product wrapped so that every later product agrees on failure too."""
        error: BaseException | None = None
        hvp: Any = None
        try:
            hvp = build()
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            if self.sharded and not isinstance(exc, (TypeError, ValueError)):
                raise self.sharded_failure(exc, "the first evaluation of loss_fn") from exc
            error = exc
        samples = getattr(hvp, "samples", None) if hvp is not None else None
        loss = float(hvp.loss) if hvp is not None else math.nan
        known = samples is not None
        stats = torch.tensor(
            [
                float(error is not None),
                float(known),
                float(samples or 0),
                float(samples or 0) * loss if known else 0.0,
                loss,
            ],
            dtype=torch.float64,
            device=self.device,
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
            self.weight = samples / total
            hvp.loss = torch.tensor(weighted / total, dtype=torch.float64)
        else:
            self.weight = 1.0 / self.world_size
            hvp.loss = torch.tensor(plain / self.world_size, dtype=torch.float64)
        return _CollectiveHVP(hvp, self)

    def start_vector(self, v0: Tensor | None, random: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """The start vector every rank uses and whether it is a cold (random) start.

        Replicated: rank 0's vector (its warm start, or ``random()``) broadcast with its
        cold/warm status, so every rank runs the same solve with the same stopping rule even if
        their warm starts differ. Sharded: every rank keeps its own shard of the warm start,
        unless any rank has none; then all start from their shard of ``random()``, which every
        rank draws identically.
        """
        if self.sharded:
            (cold,) = self.any(v0 is None)
            return (random() if cold else v0), cold  # type: ignore[return-value]
        cold = v0 is None
        if v0 is None:
            v0 = random()
        n = v0.numel()
        flag = torch.tensor([1.0 if cold else 0.0], dtype=v0.dtype, device=v0.device)
        buf = torch.cat([v0.reshape(-1), flag])
        torch.distributed.broadcast(buf, src=self._src(), group=self.group)
        return buf[:n].contiguous(), bool(buf[n] != 0)

    def agree_seconds(self, seconds: float) -> float:
        """The slowest rank's wall time, so that every rank reports identical numbers."""
        t = torch.tensor([seconds], dtype=torch.float64, device=self.device)
        return float(self._all_reduce(t, torch.distributed.ReduceOp.MAX)[0])


class _CollectiveHVP:
    """An :class:`~stableopt.hvp.HVP` whose every product ends with one collective on all ranks.

    Replicated parameters: the products are all-reduced (Σ_r w_r·H_r·v) together with a failure
    flag, so a product that raises on one rank (an exception in ``loss_fn``, a
    KeyboardInterrupt) makes every rank raise after the same collective and never leaves the
    others waiting in the next one. Sharded parameters: FSDP's backward has already reduced
    the products, and a rank that fails is inside FSDP's own collectives, where no flag can
    reach the others: it raises at once and the others raise when their collective times out
    (``sharded_timeout``, see :func:`configure`).
    """

    def __init__(self, hvp: Any, reduction: Reduction) -> None:
        self._hvp = hvp
        self._reduction = reduction
        self.params = hvp.params
        self.loss = hvp.loss
        self.samples = getattr(hvp, "samples", None)

    @property
    def calls(self) -> int:
        return int(self._hvp.calls)

    @property
    def backend(self) -> str:
        return str(self._hvp.backend)

    @property
    def stats(self) -> Any:
        return getattr(self._hvp, "stats", None)

    def __call__(self, vectors: Sequence[Tensor]) -> list[Tensor]:
        return self._collective(lambda: self._hvp(vectors), vectors, 1)[0]

    def error_pair(self, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
        """The backend's two estimates of H·v (:meth:`stableopt.hvp.HVP.error_pair`), reduced
        like products; None on every rank for an exact backend."""
        if self.backend != "fd":  # the same on every rank (agreed at the first product)
            return None
        pair = self._collective(lambda: _pair_or_zeros(self._hvp.error_pair(vectors), vectors), vectors, 2)
        return pair[0], pair[1]

    def _collective(self, compute: Callable[[], Any], vectors: Sequence[Tensor], count: int) -> list[list[Tensor]]:
        """``compute()`` (``count`` lists of tensors shaped like ``vectors``; one list when
        count is 1), reduced across ranks with an agreed failure."""
        red = self._reduction
        error: BaseException | None = None
        out: list[Tensor] = []
        if red.sharded:  # FSDP's collectives inside the product already keep ranks in step
            try:
                result = compute()
            except BaseException as exc:
                raise red.sharded_failure(exc, "a Hessian-vector product") from exc
            return [result] if count == 1 else list(result)
        try:
            result = compute()
            out = list(result) if count == 1 else [t for part in result for t in part]
        except BaseException as exc:  # noqa: BLE001 - re-raised below, on every rank
            error = exc
        vectors = list(vectors) * count
        like = vectors if error is not None else out
        flag = torch.tensor([float(error is not None)], dtype=like[0].dtype, device=like[0].device)
        parts = (
            [torch.zeros_like(v).reshape(-1) for v in vectors] if error is not None else [o.reshape(-1) for o in out]
        )
        buf = torch.cat([*parts, flag])
        buf[:-1].mul_(red.weight)
        red._all_reduce(buf)
        if error is not None:
            raise error
        if float(buf[-1]) > 0:
            raise RuntimeError(
                f"stableopt: a Hessian-vector product failed on {int(buf[-1])} of {red.world_size} "
                "ranks during a distributed measurement (this rank's succeeded); see the failing "
                "ranks' tracebacks"
            )
        flat = buf[:-1]
        reduced = [c.view_as(o) for c, o in zip(flat.split([o.numel() for o in out]), out)]
        n = len(reduced) // count
        return [reduced[i * n : (i + 1) * n] for i in range(count)]


def _pair_or_zeros(pair: Any, vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    if pair is None:
        zeros = [torch.zeros_like(v) for v in vectors]
        return zeros, zeros
    return pair


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
    saved: dict[int, tuple[Any, bool, bool]] = {}

    def hook(module: Any, args: Any) -> None:  # a DistributedDataParallel
        if id(module) in saved or not _is_ddp(module):
            return
        saved[id(module)] = (module, module.require_backward_grad_sync, module.require_forward_param_sync)
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
