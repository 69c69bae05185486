"""Per-block (per-layer) sharpness: which parameters form each block, and λ_max of its diagonal block.

The block b of a measurement is a subset of its parameters; its sharpness is the top eigenvalue
of the diagonal block P_b^{-1/2}·(s·H_bb + Λ_b)·P_b^{-1/2} of the preconditioned Hessian — the
curvature the optimizer sees when only that block moves (:meth:`CurvatureOperator.restrict
<stableopt.operator.CurvatureOperator.restrict>`). By Cauchy interlacing each block's λ_max is at
most the whole model's; the blocks with the highest ratio are where the edge is reached.
``blocks=`` of :meth:`stableopt.Adam.sharpness` names them:

* ``"module"``: each module that directly owns measured parameters (a ``Linear``, a
  ``LayerNorm``...), named by its path in the model (``"0"``, ``"encoder.layers.1.attn"``). The
  modules are found by watching which ones run while the measurement evaluates ``loss_fn`` for
  the first time (a global forward pre-hook, removed as soon as the measurement has started);
  parameters used outside any module form the block ``"other"``;
* an ``nn.Module``: the same, with names from ``model.named_modules()`` (no hook);
* ``"group"``: each param group, ``"group0"``, ``"group1"``, ...;
* a ``dict[str, list[Parameter]]``: the blocks as given.

Each block costs one Lanczos solve (one Hessian-vector product of the whole model per step),
warm-started from the previous measurement's vector for that block (``opt.warm_starts`` key
``"block:<name>"``).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .eigen import LanczosResult
from .operator import CurvatureOperator, Measurement
from .thresholds import edge_ratio, unstable_threshold

__all__ = ["BlockSharpness", "ModuleWatcher", "check_blocks", "column_stems", "measure_blocks", "watch"]

#: longest block name stem in a history column (``block_<stem>_ratio``); longer names are cut
#: and made unique with a hash of the full name
MAX_STEM = 40
#: the block of parameters used outside any module (``blocks="module"``)
OTHER = "other"


@dataclass(frozen=True)
class BlockSharpness:
    """The sharpness of one block's diagonal block of the preconditioned Hessian.

    Attributes:
        name: the block's name.
        preconditioned: λ_max(P_b^{-1/2}·H_bb·P_b^{-1/2}) (H with sign and coupled decay).
        threshold: the block's stability threshold (NaN when its groups' thresholds differ;
            the lowest when one is ≤ 0).
        ratio: the block's edge ratio: λ_max of the block of D^{1/2}·H·D^{1/2}, D = 1/(τ·P);
            ``+inf`` when a threshold of its groups is ≤ 0 (:mod:`stableopt.thresholds`).
        size: the number of coordinates in the block.
        hvps: Hessian-vector products its solves used.
        residual: the largest relative Ritz residual of its solves.
        converged: every solve met its tolerance and the values are finite.
        column: the name's stem in history columns ``block_<column>_ratio``/``_lmax``.
    """

    name: str
    preconditioned: float
    threshold: float
    ratio: float
    size: int
    hvps: int
    residual: float
    converged: bool
    column: str


def column_stems(names: Sequence[str]) -> dict[str, str]:
    """Safe, bounded, distinct column stems for block names (letters, digits and ``_``).

    >>> column_stems(["encoder.layers.0", "encoder_layers_0", "0"])
    {'encoder.layers.0': 'encoder_layers_0', 'encoder_layers_0': 'encoder_layers_0_2', '0': '0'}
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_") or "block"
        if len(stem) > MAX_STEM:
            stem = stem[: MAX_STEM - 9] + "_" + hashlib.sha1(name.encode()).hexdigest()[:8]
        base, i = stem, 2
        while stem in used:
            stem = f"{base[: MAX_STEM - 4]}_{i}"
            i += 1
        used.add(stem)
        out[name] = stem
    return out


def check_blocks(blocks: Any) -> Any:
    """``blocks`` in a form that can be measured (dict values become lists), or an error.

    Raises:
        ValueError / TypeError: an unknown string, an empty dict or block, a non-tensor entry.
    """
    if blocks is None or isinstance(blocks, nn.Module):
        return blocks
    if isinstance(blocks, str):
        if blocks not in ("module", "group"):
            raise ValueError(
                f"blocks must be 'module', 'group', an nn.Module or a dict of parameter lists, got {blocks!r}"
            )
        return blocks
    if not isinstance(blocks, Mapping):
        raise TypeError(
            f"blocks must be 'module', 'group', an nn.Module or a dict[str, list[Parameter]], got {type(blocks).__name__}"
        )
    if not blocks:
        raise ValueError(
            "blocks is an empty dict; give at least one block, e.g. {'head': list(model.head.parameters())}"
        )
    out: dict[str, list[Tensor]] = {}
    for name, params in blocks.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"block names must be non-empty strings, got {name!r}")
        params = [params] if isinstance(params, Tensor) else list(params)
        if not params or not all(isinstance(p, Tensor) for p in params):
            raise TypeError(f"block {name!r} must be a non-empty list of parameters (tensors)")
        out[name] = params
    return out


class ModuleWatcher:
    """Records, in call order, the modules that run while it is started (``blocks="module"``)."""

    def __init__(self) -> None:
        self.modules: dict[int, nn.Module] = {}
        self._handle: Any = None

    def start(self) -> ModuleWatcher:
        def record(module: nn.Module, args: Any) -> None:
            self.modules.setdefault(id(module), module)

        self._handle = nn.modules.module.register_module_forward_pre_hook(record)
        return self

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _named_owners(modules: Sequence[nn.Module]) -> list[tuple[str, nn.Module]]:
    """(path, module) for every module under the outermost of ``modules`` (call order)."""
    inner = {id(sub) for m in modules for sub in m.modules() if sub is not m}
    roots = [m for m in modules if id(m) not in inner]
    named: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for root in roots:
        prefix = "" if len(roots) == 1 else f"{type(root).__name__}."
        for path, sub in root.named_modules():
            if id(sub) not in seen:
                seen.add(id(sub))
                named.append(((prefix + path).rstrip(".") or type(root).__name__, sub))
    return named


def _resolve(spec: Any, m: Measurement, watcher: ModuleWatcher | None) -> dict[str, list[int]]:
    params = m.space.params
    position = {id(p): i for i, p in enumerate(params)}
    if spec == "group":
        out, at = {}, 0
        for g, group in enumerate(m.groups):
            if group.params:
                out[f"group{g}"] = list(range(at, at + len(group.params)))
            at += len(group.params)
        return out
    if isinstance(spec, Mapping):
        out = {}
        for name, block in spec.items():
            idx = [position[id(p)] for p in block if id(p) in position]
            if not idx:
                raise ValueError(
                    f"block {name!r} has no parameter that this measurement measures (frozen, or not in the optimizer?)"
                )
            out[name] = list(dict.fromkeys(idx))
        return out
    modules = [spec] if isinstance(spec, nn.Module) else list(watcher.modules.values()) if watcher else []
    out = {}
    owned: set[int] = set()
    for name, module in _named_owners(modules):
        idx = [
            position[id(p)]
            for p in module._parameters.values()
            if p is not None and id(p) in position and id(p) not in owned
        ]
        if idx:
            owned.update(id(params[i]) for i in idx)
            out[name] = idx
    rest = [i for i, p in enumerate(params) if id(p) not in owned]
    if rest:
        out[OTHER if OTHER not in out else f"{OTHER}_params"] = rest
    return out


def _common(taus: Sequence[float]) -> float:
    t0 = taus[0]
    return t0 if all(abs(t - t0) <= 1e-12 * abs(t0) for t in taus) else math.nan


Solve = Callable[[CurvatureOperator, str], LanczosResult]


def measure_blocks(m: Measurement, spec: Any, watcher: ModuleWatcher | None, solve: Solve) -> dict[str, BlockSharpness]:
    """λ_max and ratio of each block's diagonal block, solved with ``solve(operator, warm_key)``."""
    blocks = _resolve(spec, m, watcher)
    group_of = [g for g, group in enumerate(m.groups) for _ in group.params]
    stems = column_stems(list(blocks))
    pre, ratio_op = m.operator("preconditioned"), None
    out = {}
    for name, idx in blocks.items():
        before = m.products
        taus = [float(m.groups[group_of[i]].threshold) for i in idx]
        low = unstable_threshold(taus)  # a threshold <= 0: ratio +inf, no ratio operator
        tau = _common(taus) if low is None else low
        results = [solve(pre.restrict(idx), f"block:{name}")]
        if math.isnan(tau):
            ratio_op = ratio_op or m.operator("ratio")
            results.append(solve(ratio_op.restrict(idx), f"block:{name}:ratio"))
        finite = all(r.finite for r in results)
        lam = float(results[0].eigenvalues[0]) if finite else math.nan
        if low is not None:
            ratio = math.inf
        elif not finite:
            ratio = math.nan
        else:
            ratio = float(results[1].eigenvalues[0]) if len(results) > 1 else edge_ratio(lam, tau)
        out[name] = BlockSharpness(
            name=name,
            preconditioned=lam,
            threshold=tau,
            ratio=ratio,
            size=sum(m.space.params[i].numel() for i in idx),
            hvps=m.products - before,
            residual=max(float(r.residuals.max()) for r in results) if finite else math.nan,
            converged=finite and all(r.converged for r in results),
            column=stems[name],
        )
    return out


def watch(spec: Any) -> ModuleWatcher | None:
    """A started :class:`ModuleWatcher` when ``spec`` is ``"module"``, else None."""
    return ModuleWatcher().start() if isinstance(spec, str) and spec == "module" else None
