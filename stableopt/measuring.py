"""What every stableopt optimizer can measure: its preconditioner and thresholds, and the
sharpness, directional, block, trace and density estimates built on :func:`stableopt.measure`.

:class:`MeasuringMixin` holds the measuring half of :class:`stableopt.optimizers.StabilityMixin`
(the other half wraps torch's ``step()``, state dicts and monitors); it reads the class's
:class:`stableopt.rules.StabilityRule` and the optimizer's state, never writes either.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from . import directional as _directional
from .backends import BackendChoice, check_backend
from .blocks import check_blocks
from .estimators import EstimatorsMixin
from .operator import measure
from .rules import StabilityRule
from .sharpness import SharpnessGroup, SharpnessReport, estimate_sharpness

__all__ = ["START_VECTOR_SEED", "MeasuringMixin"]

#: Seed of the private generator that draws cold Lanczos start vectors (the measurement count is
#: added): measurements are reproducible and never touch the global RNG.
START_VECTOR_SEED = 20220729  # arXiv:2207.14484 submission date


class MeasuringMixin(EstimatorsMixin):
    """``preconditioner()``, ``stability_threshold()``, ``measure()``, ``sharpness()``,
    ``directional_sharpness()`` and the warm-start state, for a ``torch.optim.Optimizer``
    subclass that also sets :attr:`stability_rule` (see :class:`stableopt.optimizers.StabilityMixin`)."""

    param_groups: list[dict[str, Any]]
    state: Any
    stability_rule: StabilityRule
    _stableopt_step: int
    _stableopt_warm: dict[str, Tensor]
    _stableopt_measurements: int
    _stableopt_backend: BackendChoice
    _stableopt_measurement_hooks: OrderedDict[int, Callable[[Any, SharpnessReport], None]]
    #: the lr of each group this step (the guard's factor applied), from StabilityMixin
    effective_lr: Callable[[], list[float]]

    # -- the rule ----------------------------------------------------------------------------
    def _group_threshold(self, group: Mapping[str, Any], lr: float) -> float:
        return self.stability_rule.threshold(group, lr)

    def _coupled_weight_decay(self, group: Mapping[str, Any]) -> float:
        return self.stability_rule.coupled_weight_decay(group)

    def preconditioner(self) -> list[Tensor]:
        """The diagonal P that the last step divided the gradient by, one tensor per parameter.

        In param-group order. A parameter the optimizer has never updated (no gradient yet)
        gets ``inf`` (P⁻¹ = 0: it does not move).

        Raises:
            RuntimeError: before the first ``step()``.
        """
        if self._stableopt_step == 0 and not any(self.state.values()):
            raise RuntimeError(
                f"{type(self).__name__}.preconditioner() is defined by the optimizer state of the "
                "last step; call step() first"
            )
        rule = self.stability_rule
        return [
            rule.preconditioner(p, self.state.get(p, {}), group) for group in self.param_groups for p in group["params"]
        ]

    def stability_threshold(self) -> list[float]:
        """The stability threshold on λ_max(P⁻¹H) of each param group (docs/science.md table).

        Examples:
            >>> from stableopt import Adam
            >>> opt = Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
            >>> [round(t) for t in opt.stability_threshold()]
            [38000]
        """
        rule = self.stability_rule
        return [rule.threshold(group, lr) for group, lr in zip(self.param_groups, self.effective_lr())]

    def _sharpness_groups(self) -> list[SharpnessGroup]:
        rule = self.stability_rule
        if self._stableopt_step == 0 and rule.needs_state:
            raise RuntimeError(
                f"{type(self).__name__}.sharpness() pairs the Hessian with the preconditioner of "
                "the last step; call step() first"
            )
        groups = []
        for group, lr in zip(self.param_groups, self.effective_lr()):
            params = [p for p in group["params"] if p.requires_grad]
            groups.append(
                SharpnessGroup(
                    params=params,
                    preconditioner=[rule.preconditioner(p, self.state.get(p, {}), group) for p in params],
                    threshold=rule.threshold(group, lr),
                    sign=rule.sign(group),
                    weight_decay=rule.coupled_weight_decay(group),
                    floor=rule.floor(group),
                )
            )
        return groups

    @property
    def warm_starts(self) -> dict[str, Tensor]:
        """The top Ritz vectors of the previous measurement, by operator kind
        (``"preconditioned"``, ``"ratio"``, ``"raw"``; each a ``(vectors, n)`` tensor): the next
        measurement starts from them. ``opt.warm_starts.clear()`` makes it start cold; assigning
        a copy taken earlier replays a warm start (benchmarks do this)."""
        return self._stableopt_warm

    @warm_starts.setter
    def warm_starts(self, vectors: dict[str, Tensor]) -> None:
        if not isinstance(vectors, dict) or not all(isinstance(v, Tensor) and v.dim() == 2 for v in vectors.values()):
            raise TypeError(
                "warm_starts must be a dict of 2-D tensors (kind -> vectors x n), e.g. a copy of opt.warm_starts"
            )
        self._stableopt_warm = dict(vectors)

    @property
    def measurements_taken(self) -> int:
        """Number of ``sharpness()`` measurements so far (it seeds each cold start vector)."""
        return self._stableopt_measurements

    @property
    def hvp_backend(self) -> str | None:
        """What ``hvp="auto"`` settled on for this optimizer's model (None before it measured)."""
        return self._stableopt_backend.backend

    def measure(
        self, loss_fn: Callable[..., Tensor], *, batches: Iterable[Any] | None = None, hvp: str = "auto"
    ) -> Any:
        """A context in which this optimizer's curvature operators can be used by any estimator.

        ``with opt.measure(loss_fn) as m:`` yields a :class:`stableopt.operator.Measurement`:
        ``m.operator("preconditioned")`` is P^{-1/2}·H·P^{-1/2} (``"ratio"`` and ``"raw"``
        likewise), with this optimizer's P, thresholds, coupled decay and sign, built on the
        ``hvp`` backend, side-effect free on exit (see :func:`stableopt.measure`).

        Example:
            >>> from stableopt import SGD
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
            >>> opt = SGD([w], lr=0.1)
            >>> with opt.measure(lambda: (w ** 2).sum()) as m:
            ...     m.operator("raw").matvec(torch.tensor([1.0, 0.0]))
            tensor([2., 0.])
        """
        return measure(
            loss_fn, self._sharpness_groups(), batches=batches, hvp=check_backend(hvp), choice=self._stableopt_backend
        )

    def track_updates(self) -> Any:
        """Keep θ_{t−1} from now on, so that ``directional_sharpness(direction="update")`` can
        measure along θ_t − θ_{t−1}: one copy of the parameters, refreshed by a step pre-hook.

        Returns a handle; ``handle.remove()`` (or leaving ``with opt.track_updates():``) stops
        it (the copy is freed when no monitor or handle needs it any more).
        """
        return _directional.update_tracker(self).acquire()

    def directional_sharpness(
        self,
        loss_fn: Callable[..., Tensor],
        direction: Any = "update",
        *,
        batches: Iterable[Any] | None = None,
        hvp: str = "auto",
    ) -> _directional.DirectionalReport:
        """The curvature of P⁻¹H along one direction u, with one Hessian-vector product.

        value = uᵀHu / uᵀPu (H with this optimizer's sign and coupled decay, P its
        preconditioner) and ratio = uᵀHu / Σ_g τ_g·u_gᵀP_gu_g (1 = the edge). It is a Rayleigh
        quotient of P^{-1/2}HP^{-1/2}, so a **lower bound** on λ_max(P⁻¹H) (and the ratio on
        the edge ratio of :meth:`sharpness`), tight when u is along the top eigenvector. Bai et
        al. 2025 (arXiv:2506.04805) report that the curvature along the preconditioned gradient
        crossing the threshold precedes Adam's loss spikes; with mini-batches u is the batch's
        update or gradient and the value is noisy (see :mod:`stableopt.directional`).

        Args:
            loss_fn: as for :meth:`sharpness`.
            direction: ``"update"`` (θ_t − θ_{t−1} of the last step; needs
                :meth:`track_updates` or a monitor with ``directional="update"`` active before
                that step), ``"gradient"`` (u = P⁻¹(s·g + λθ) from the current ``.grad``) or a
                list with one tensor per parameter of ``param_groups`` (None: zero), shaped
                like it.
            batches: as for :meth:`sharpness`.
            hvp: as for :meth:`sharpness`.

        Returns:
            A :class:`stableopt.DirectionalReport`, also recorded in :attr:`history`. A zero
            direction gives NaN values, ``hvps=0`` and a ``RuntimeWarning``.

        Raises:
            RuntimeError: ``"update"`` without tracking, ``"gradient"`` without gradients, an
                adaptive optimizer before its first ``step()``.
            ValueError / TypeError: an unknown direction name, wrong count, shapes or types.

        Example:
            >>> from stableopt import SGD
            >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
            >>> loss_fn = lambda: 0.5 * (4.0 * w[0] ** 2 + w[1] ** 2)
            >>> opt = SGD([w], lr=0.1)
            >>> round(opt.directional_sharpness(loss_fn, [torch.tensor([1.0, 0.0])]).ratio, 6)
            0.2
        """
        return _directional.optimizer_directional_sharpness(self, loss_fn, direction, batches=batches, hvp=hvp)

    def sharpness(
        self,
        loss_fn: Callable[..., Tensor],
        *,
        batches: Iterable[Any] | None = None,
        raw: bool = False,
        k: int = 1,
        tol: float = 1e-3,
        max_iters: int | None = None,
        hvp: str = "auto",
        blocks: Any = None,
    ) -> SharpnessReport:
        """Measure λ_max(P⁻¹H), the edge ratio and optionally λ_max(H) at the current parameters.

        Lanczos on P^{-1/2}·H·P^{-1/2}, warm-started from the previous measurement's top Ritz
        vectors, on Hessian-vector products from the ``hvp`` backend. Parameters, ``.grad``,
        optimizer state, RNG streams and module buffers are left exactly as they were.

        Args:
            loss_fn: ``loss_fn()`` returns the scalar loss through the model whose parameters
                this optimizer holds; with ``batches``, ``loss_fn(batch)`` per batch.
            batches: re-iterable of batches; the Hessian is the batch-size-weighted mean.
            raw: also measure λ_max(H) (one more Lanczos solve).
            k: how many top eigenvalues of P⁻¹H to report.
            tol: relative accuracy of each reported eigenvalue. The first (cold) measurement
                stops when each Ritz value θ has relative residual ‖Ax − θx‖/|θ| ≤ tol, which
                guarantees *an* eigenvalue within tol·|θ| of it (in practice the error is far
                smaller, ~1e-5 at the default); warm-started ones stop when the quadratic
                estimate ‖r‖²/gap is ≤ tol·|θ| and the residual ≤ 2·tol·|θ|, or on the residual
                like a cold one when the start has gone stale (after a loss spike). Along a
                training run through the edge every warm measurement was within 1e-4 of a tight
                reference at the default and within tol at tol=1e-2 (benchmarks/warm_replay.py).
                Being the top eigenvalue relies on the Krylov space having found it (see
                :mod:`stableopt.eigen`).
            max_iters: Lanczos steps per solve (default min(#parameters, 100)).
            hvp: how Hessian-vector products are computed: ``"auto"`` (default: double
                backward where the model supports it, else finite differences, decided once
                per optimizer by a real probe), ``"autograd"``, ``"fd"`` or ``"forward"``
                (:mod:`stableopt.backends`). ``report.hvp_backend`` says which one measured.
            blocks: also measure per-block sharpness into ``report.blocks``: ``"module"`` (each
                module that owns parameters, named by its path), ``"group"`` (each param
                group), an ``nn.Module`` (its modules) or a ``dict[str, list[Parameter]]``; one
                warm-started solve of the diagonal block P_b^{-1/2}H_bbP_b^{-1/2} per block
                (:mod:`stableopt.blocks`).

        Returns:
            A :class:`~stableopt.SharpnessReport`.

        Raises:
            RuntimeError: an adaptive optimizer before its first ``step()``;
                :class:`~stableopt.hvp.DoubleBackwardError` for ``hvp="autograd"`` on a model
                without double backward.
            TypeError / ValueError: bad ``loss_fn`` results or arguments (the message says which).
        """
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0.0 < tol < 1.0:
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
            raise ValueError(f"max_iters must be None or a positive integer, got {max_iters!r}")
        if not isinstance(raw, bool):
            raise TypeError(f"raw must be a bool, got {type(raw).__name__}")
        check_backend(hvp)
        blocks = check_blocks(blocks)
        groups = self._sharpness_groups()
        generator = torch.Generator().manual_seed(START_VECTOR_SEED + self._stableopt_measurements)
        self._stableopt_measurements += 1
        report = estimate_sharpness(
            loss_fn,
            groups,
            batches=batches,
            raw=raw,
            k=k,
            tol=tol,
            max_iters=max_iters,
            step=self._stableopt_step,
            generator=generator,
            warm=self._stableopt_warm,
            hvp=hvp,
            choice=self._stableopt_backend,
            blocks=blocks,
        )
        for hook in list(self._stableopt_measurement_hooks.values()):
            hook(self, report)
        return report
