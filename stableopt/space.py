"""The vector space a measurement works in: the measured parameters, flattened, as this rank holds them.

A vector of the space is one 1-D tensor: the concatenation of one flattened tensor per
parameter. For ordinary (replicated or single-process) parameters that is the whole vector. For
FSDP2 (``fully_shard``) and other DTensor parameters it is this rank's *shard*: each parameter
contributes its local tensor (``p.to_local()``), every rank holds its own piece of every
vector, and inner products and norms are all-reduced over the mesh, so that an estimator
working on local shards computes exactly what it would on the full vectors. Replicated DTensor
placements and plain parameters in a sharded space are counted once (their local inner products
are weighted by 1/replicas).

Start vectors come from :meth:`ParameterSpace.random`: a standard normal vector drawn from the
caller's generator one parameter at a time in the global (unsharded) layout, of which each rank
keeps its shard. A sharded run and a single process on the unsharded model therefore start from
the same vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ParameterSpace", "is_dtensor", "local_tensor"]


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2, tensor parallelism)."""
    return any(c.__name__ == "DTensor" and c.__module__.startswith("torch.distributed") for c in type(t).__mro__)


def local_tensor(p: Tensor) -> Tensor:
    """The tensor this rank holds for ``p``: ``p.to_local()`` for a DTensor, else ``p`` itself.

    For a DTensor the result shares storage with ``p``: writing it in place writes ``p``'s shard.
    """
    return p.to_local() if is_dtensor(p) else p  # type: ignore[attr-defined]


def _mesh_key(mesh: Any) -> tuple[Any, ...]:
    """What makes two device meshes the same mesh: device type, the ranks in their layout (the
    mesh tensor: its shape and every rank at its place) and the dimension names."""
    ranks = mesh.mesh
    return (str(mesh.device_type), tuple(ranks.shape), tuple(ranks.flatten().tolist()), mesh.mesh_dim_names)


def _mesh_of(params: Sequence[Tensor]) -> Any:
    """The one device mesh of the DTensor parameters.

    Meshes that are equal (same device type, ranks, shape and dimension names) are one mesh,
    whatever their identity: ``fully_shard`` without ``mesh=`` creates a new default mesh
    object per call, so ``fully_shard(layer)`` for each layer and then ``fully_shard(model)``
    leaves equal meshes that are distinct objects.
    """
    meshes: dict[tuple[Any, ...], Any] = {}
    for p in params:
        if is_dtensor(p):
            mesh = p.device_mesh  # type: ignore[attr-defined]
            meshes.setdefault(_mesh_key(mesh), mesh)
    if len(meshes) > 1:
        described = "; ".join(
            f"{device} {list(shape)} ranks {list(ranks)[:8]}{' ...' if len(ranks) > 8 else ''}"
            + (f" dims {list(names)}" if names else "")
            for device, shape, ranks, names in list(meshes)[:3]
        )
        raise ValueError(
            f"sharded parameters live on {len(meshes)} different device meshes ({described}); stableopt "
            "measures models whose DTensor parameters share one mesh (one fully_shard mesh)"
        )
    return next(iter(meshes.values()))


def _replicas(p: Tensor, mesh: Any) -> int:
    """On how many ranks of ``mesh`` each element of ``p``'s local tensor lives."""
    if not is_dtensor(p):
        return int(mesh.size())
    count = 1
    for dim, placement in enumerate(p.placements):  # type: ignore[attr-defined]
        kind = type(placement).__name__
        if kind == "Replicate":
            count *= int(mesh.size(dim))
        elif kind != "Shard":
            raise ValueError(
                f"a parameter has DTensor placement {placement!r}; stableopt measures parameters "
                "that are sharded (Shard) or replicated (Replicate) across the mesh"
            )
    return count


class ParameterSpace:
    """Flattening of parameters into one (local) vector, with all-reduced inner products.

    Attributes:
        params: the parameters, in order.
        size: the dimension n of the space (the global number of elements).
        local_size: the length of the vectors this rank holds (``size`` unless sharded).
        dtype, device: of every vector.
        sharded: whether some parameter is a DTensor (vectors are shards, reductions collective).
        group: the process group inner products are reduced over (sharded only).

    >>> w = torch.zeros(2, 3)
    >>> space = ParameterSpace([w], torch.float64)
    >>> space.size, space.dot(torch.ones(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)).item()
    (6, 6.0)
    """

    def __init__(self, params: Sequence[Tensor], dtype: torch.dtype) -> None:
        self.params = list(params)
        self.dtype = dtype
        self.locals = [local_tensor(p) for p in self.params]
        self.device = self.locals[0].device
        self.numels = [t.numel() for t in self.locals]
        self.local_size = sum(self.numels)
        self.size = sum(p.numel() for p in self.params)
        self.sharded = any(is_dtensor(p) for p in self.params)
        self.group: Any = None
        self._mesh: Any = None
        self._weights: Tensor | None = None
        if self.sharded:
            self._mesh = _mesh_of(self.params)
            dist = torch.distributed
            if self._mesh.ndim == 1:
                self.group = self._mesh.get_group()
            elif int(self._mesh.size()) != dist.get_world_size():
                raise ValueError(
                    "a multi-dimensional device mesh that does not span every process is not "
                    "supported for measurements; use a 1-D mesh (plain fully_shard)"
                )
            replicas = [_replicas(p, self._mesh) for p in self.params]
            if any(r != 1 for r in replicas):
                self._weights = torch.cat(
                    [torch.full((n,), 1.0 / r, dtype=dtype, device=self.device) for n, r in zip(self.numels, replicas)]
                )

    # -- layout --------------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """One local vector from tensors shaped like the local parameter tensors."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat`` shaped like the local parameter tensors."""
        return [c.view_as(t) for c, t in zip(flat.split(self.numels), self.locals)]

    def full(self, values: Sequence[float], counts: Sequence[int]) -> Tensor:
        """A vector that is ``values[i]`` on the next ``counts[i]`` parameters (per-group constants)."""
        chunks, i = [], 0
        for value, count in zip(values, counts):
            for n in self.numels[i : i + count]:
                chunks.append(torch.full((n,), float(value), dtype=self.dtype, device=self.device))
            i += count
        return torch.cat(chunks)

    # -- reductions ----------------------------------------------------------------------------
    def allreduce(self, t: Tensor) -> Tensor:
        """Σ over the ranks that hold shards of the space (in place; the identity if not sharded)."""
        if self.sharded:
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def dot(self, x: Tensor, y: Tensor) -> Tensor:
        """xᵀy of the full vectors (a 0-dim tensor on the space's device)."""
        if self._weights is not None:
            y = y * self._weights
        return self.allreduce(torch.dot(x, y).reshape(1)).reshape(())

    def inner(self, block: Tensor, w: Tensor) -> Tensor:
        """``block @ w`` of the full vectors, for the rows of a 2-D ``block`` of local vectors."""
        if self._weights is not None:
            w = w * self._weights
        return self.allreduce(block @ w)

    def norm(self, x: Tensor) -> Tensor:
        """‖x‖₂ of the full vector."""
        if not self.sharded:
            return torch.linalg.vector_norm(x)
        return self.dot(x, x).clamp_min(0).sqrt()

    def max_abs(self, x: Tensor) -> float:
        """‖x‖∞ of the full vector, as a Python float (one host sync)."""
        m = x.abs().max().reshape(1) if x.numel() else torch.zeros(1, dtype=x.dtype, device=x.device)
        if self.sharded:
            torch.distributed.all_reduce(m, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return float(m[0])

    # -- vectors -------------------------------------------------------------------------------
    def random(self, generator: torch.Generator) -> Tensor:
        """This rank's shard of a standard normal vector, drawn one parameter at a time (CPU
        ``generator``, global layout), so sharded and single-process runs draw the same vector."""
        chunks = []
        for p in self.params:
            full = torch.randn(tuple(p.shape), generator=generator, dtype=self.dtype)
            if is_dtensor(p):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(
                    full.to(self.device),
                    p.device_mesh,  # type: ignore[attr-defined]
                    p.placements,  # type: ignore[attr-defined]
                    src_data_rank=None,
                ).to_local()
            chunks.append(full.reshape(-1).to(self.device))
        return torch.cat(chunks)
