"""Hessian-vector products by finite differences of gradients: the ``"fd"`` backend.

Only ordinary backward passes are needed, so this works wherever training works: fused and
flash attention kernels, ``torch.compile``, activation checkpointing, custom autograd functions
(``@once_differentiable``), FSDP2. Three things make it accurate where transformers train
(LayerNorm, softmax, GELU, float32 or bfloat16 compute), each measured against float64
double-backward Hessians (tests/test_fd_accuracy.py, benchmarks/hvp.py):

**A fourth-order stencil.** With g(h) = ∇L(θ + h·x) and the central difference
D(h) = (g(h) − g(−h))/2h = H·x + c·h² + O(h⁴), a product is Richardson's extrapolation

    H·x ≈ R(ε) = (4·D(ε) − D(2ε))/3 = [8(g(ε) − g(−ε)) − (g(2ε) − g(−2ε))] / 12ε,

whose truncation error is O(ε⁴) instead of O(ε²): four gradients per product instead of two.
The plain central difference was 0.2–10% off on LayerNorm/attention models in float32 (its ε²
term: LayerNorm and softmax have large third derivatives along the preconditioned top
eigenvector), with Lanczos reporting convergence — for the fd *map*, not for H.

**A step that adapts.** The start is Andrei's (2009) rule for gradient-vector products,
ε₀ = √u·(1 + ‖θ‖∞)/‖x‖∞ (no coordinate moves by more than √u·(1 + ‖θ‖∞)), with u the machine
epsilon of the dtype the forward *computes* in: the parameters' dtype, or a lower one seen in
the forward's matrix products (FSDP2 ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``,
parameters cast inside ``loss_fn``), since a step below the compute dtype's resolution rounds
away. Every product also yields t = ‖D(ε) − R(ε)‖/‖R(ε)‖, the error of the plain central
difference, for free: when t > ``TRUNCATION_LIMIT`` the product is recomputed with a shorter
step aimed at ``TRUNCATION_TARGET`` (t ∝ ε² while truncation dominates), and the shorter step
is kept for the rest of the measurement. When shortening stops paying (rounding, which grows
as 1/ε, dominates) the best product is kept.

**Loss-independent coordinates.** A parameter the loss does not depend on (the bias of a
layer followed by train-mode BatchNorm, an attention key bias) has a gradient that is pure
rounding noise; Adam's P there sits at its floor ε_Adam, and P^{-1/2} (10⁴ for ε_Adam = 1e-8)
magnified fd's rounding noise into fake eigenvalues 4–7× the true λ_max. The coordinates whose
P sits at the rule's floor (the measurement passes them as ``suspects``) are probed once per
measurement: moved forth and back as far as a product would move them; if no gradient changes
by more than the noise level, H is zero on them as far as finite differences can tell, and the
products leave them out (zero in and zero out). A coordinate at the floor with real curvature
(a LoRA factor initialised at zero) changes other gradients and is kept.

**A-posteriori error.** :meth:`~stableopt.hvp.HVP.error_pair` returns the product along a
vector at the current step and at half of it; their difference estimates the error of the
product (an overestimate by at most ~2× where rounding dominates, near-exact where truncation
does). Measurements use it on the final Ritz vectors, so that ``converged`` means converged
for H (``SharpnessReport.hvp_error``); bfloat16 compute cannot deliver 1e-3 and is flagged.

Cost per product: 4 gradients (plus 4 per shortening, a few per measurement at most), plus per
measurement two per probe of coordinates at the preconditioner's floor, and 6 per error check
(a product along the final Ritz vector, its step adapted to that direction, and the central
difference at half the step). The errors measured are in ``docs/backends.md``.

**Side effects.** The parameters are written in place (so that any model, compiled or sharded,
sees the perturbed values through its own code), and after every gradient they are copied back
from a snapshot taken when the backend is built: bit for bit what they were, with no drift from
θ + εx − εx. The copy back runs through :class:`stableopt._state.overwritten`, so a second
``KeyboardInterrupt`` arriving during it still leaves every parameter restored. ``.grad`` is not
touched: gradients come from ``torch.autograd.grad`` or, for FSDP2 (DTensor) parameters, whose
gradients only exist after FSDP's reduce-scatter, from ``backward()`` with every ``.grad`` put
back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ._state import grads_aside, overwritten
from .hvp import HVP, accumulate, batch_weights, check_gradients, check_loss, check_params
from .space import is_dtensor, local_tensor

__all__ = [
    "FD_EXPONENT",
    "NOISE_FACTOR",
    "TRUNCATION_LIMIT",
    "TRUNCATION_TARGET",
    "FDStats",
    "make_fd_hvp",
    "step_size",
]

#: ε₀ ∝ u^FD_EXPONENT: 1/2 rather than a longer step, because ReLU kinks crossed by a longer
#: step dominate the error in float32 (the adaptive step only ever shortens from here, except
#: to come back after a shortening).
FD_EXPONENT = 0.5
#: A product whose plain central difference differs from its extrapolation by more than this
#: (relative) is recomputed with a shorter step. On LayerNorm/attention models in float32 the
#: extrapolated product's error was about 5·t² there (1e-4 at t = 4e-3, 1e-2 at t = 4e-2).
TRUNCATION_LIMIT = 4e-3
#: What a shortened step aims for (t ∝ ε² while truncation dominates).
TRUNCATION_TARGET = 1e-3
#: Most shortenings per product.
MAX_SHORTENINGS = 3
#: The step is never shortened below MIN_STEP_FACTOR·√u of ε₀ (a displacement of the largest
#: coordinate of 0.05·u·(1 + ‖θ‖∞)): shorter steps round away in the compute dtype. It only ever
#: binds in low precision: on the test transformer with bfloat16 matrix products λ_max came out
#: 1–3% off at this floor (the estimate 3–8%), 10–90% off with a floor 20× higher (truncation)
#: and as an exactly zero product without one (rounding).
MIN_STEP_FACTOR = 0.05
#: The noise level of a gradient, in machine epsilons of its largest entry: a probe whose
#: gradients differ by no more than this finds its coordinates loss-independent. Rounding noise
#: in a gradient sum is a few u per term; measured: the gradient of a bias before BatchNorm
#: 0.9 u·‖g‖∞, of an attention key bias 0.03 u·‖g‖∞, while a live coordinate moved by the
#: product's step changed the gradient by 1e3–1e5 u·‖g‖∞ on the test models.
NOISE_FACTOR = 32.0
#: The probe moves the suspect coordinates as far as a product's first step would.
PROBE_FACTOR = 1.0

#: the floating-point dtypes a compute dtype is one of
_FLOATING = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

LossFn = Callable[..., Tensor]
Gradients = list[Tensor | None]

#: aten ops whose output dtype is the dtype a forward computes in (matrix products, convolutions,
#: attention kernels); see :func:`compute_dtype`
_COMPUTE_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "convolution", "_scaled_mm"})


def step_size(theta_max: float, x_max: float, dtype: torch.dtype) -> float:
    """The starting finite-difference step ε₀ = √u·(1 + ‖θ‖∞)/‖x‖∞ for compute dtype ``dtype``.

    >>> f"{step_size(0.0, 1.0, torch.float64):.3e}"
    '1.490e-08'
    >>> f"{step_size(1.0, 2.0, torch.float32):.3e}"
    '3.453e-04'
    """
    u = torch.finfo(dtype).eps
    return u**FD_EXPONENT * (1.0 + theta_max) / x_max


def _lowest_precision(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


class _ComputeDtypes(TorchDispatchMode):
    """Records the floating-point dtypes of the outputs of matrix products, convolutions and
    attention kernels (the dtype a forward computes in, after any casts)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = func._overloadpacket.__name__
        if name in _COMPUTE_OPS or name.startswith("_scaled_dot_product") or name.startswith("_flash_attention"):
            self.seen.update(t.dtype for t in tree_leaves(out) if isinstance(t, Tensor) and t.is_floating_point())
        return out


@dataclass
class FDStats:
    """What the ``"fd"`` backend did during one measurement (``HVP.stats``).

    Attributes:
        compute_dtype: the dtype the forward computes in (the step's machine epsilon).
        scale: the current step as a multiple of ε₀ (below 1 after shortenings).
        gradients: gradients evaluated so far.
        shortenings: products recomputed with a shorter step.
        truncation: the largest t = ‖D(ε) − R(ε)‖/‖R(ε)‖ of an accepted product.
        noise_limited: a shorter step did not help (rounding dominates: low-precision compute).
        loss_independent: coordinates found not to affect the loss (left out of every product).
    """

    compute_dtype: torch.dtype
    scale: float = 1.0
    gradients: int = 0
    shortenings: int = 0
    truncation: float = 0.0
    noise_limited: bool = False
    loss_independent: int = 0


def _backward_gradients(loss: Tensor, params: Sequence[Tensor]) -> Gradients:
    """∇loss by ``backward()`` (FSDP2 reduce-scatters it into ``.grad``), ``.grad`` restored."""
    with grads_aside(params):
        loss.backward()
        return [None if p.grad is None else local_tensor(p.grad) for p in params]


def _sub(a: Gradients, b: Gradients, like: Sequence[Tensor]) -> list[Tensor]:
    """a − b per parameter (None is zero), in the dtype of ``like``."""
    out = []
    for x, y, v in zip(a, b, like):
        if x is None and y is None:
            out.append(torch.zeros_like(v))
        elif y is None:
            out.append(x.to(v.dtype))  # type: ignore[union-attr]
        elif x is None:
            out.append(y.to(v.dtype).neg())
        else:
            out.append(x.to(v.dtype) - y.to(v.dtype))
    return out


def make_fd_hvp(
    loss_fn: LossFn,
    params: Sequence[Tensor],
    *,
    batches: Iterable[Any] | None = None,
    before_forward: Callable[[], None] | None = None,
    max_abs: Callable[[Sequence[Tensor]], float] | None = None,
    sq_norm: Callable[[Sequence[Tensor]], float] | None = None,
    suspects: Sequence[Tensor | None] | None = None,
    loss_scale: float = 1.0,
) -> HVP:
    """Build v ↦ H·v for ``loss_fn`` at the current ``params`` by finite differences of gradients.

    Args:
        loss_fn: ``loss_fn()`` (or ``loss_fn(batch)`` with ``batches``) returns the scalar loss.
        params: the parameters (``requires_grad=True``); DTensor (FSDP2) parameters take their
            gradients from ``backward()`` and their vectors are local shards.
        batches: optional re-iterable of batches (batch-size-weighted mean Hessian).
        before_forward: called before every evaluation of ``loss_fn`` (replays dropout masks).
        max_abs: ‖·‖∞ of a list of (local) tensors across every rank that holds a shard of them
            (default: this process's tensors are whole).
        sq_norm: ‖·‖₂² of a list of (local) tensors, likewise. Every decision of the backend
            (step, shortening, loss-independent coordinates) is taken from these two, so ranks
            that share a model through collectives take the same decisions.
        suspects: per parameter, a boolean mask of the coordinates to check for not affecting
            the loss (those whose preconditioner sits at its floor), or None.
        loss_scale: multiplies the loss before ``backward()`` of sharded parameters (FSDP
            averages gradients over ranks; the measurement uses it to weight ranks by samples).

    Returns:
        An :class:`~stableopt.hvp.HVP` with ``backend="fd"``, its ``loss`` evaluated at the
        unperturbed parameters, its :meth:`~stableopt.hvp.HVP.error_pair` for a-posteriori
        error estimates and its :class:`FDStats` in ``stats``.

    Example:
        >>> w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
        >>> hvp = make_fd_hvp(lambda: (w ** 3).sum(), [w])
        >>> hvp([torch.tensor([1.0, 1.0], dtype=torch.float64)])[0].round(decimals=6)
        tensor([ 6., 12.], dtype=torch.float64)
    """
    params = check_params(loss_fn, params, "make_fd_hvp")
    call = before_forward or (lambda: None)
    sharded = any(is_dtensor(p) for p in params)
    locals_ = [local_tensor(p) for p in params]

    def norm_inf(tensors: Sequence[Tensor]) -> float:
        if max_abs is not None:
            return max_abs(tensors)
        return max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)

    def norm_sq(tensors: Sequence[Tensor]) -> float:
        if sq_norm is not None:
            return sq_norm(tensors)
        return float(sum(float(t.detach().double().square().sum()) for t in tensors))

    evaluations: list[tuple[Any, float, str]]
    samples = None
    if batches is None:
        evaluations = [((), 1.0, "loss_fn()")]
    else:
        weights, samples = batch_weights(batches)
        evaluations = [((b,), w, f"loss_fn(batches[{i}])") for i, (b, w) in enumerate(zip(batches, weights))]

    stats = FDStats(compute_dtype=_lowest_precision(t.dtype for t in locals_))

    def gradient() -> Gradients:
        """The (batch-weighted) gradient at the parameters as they are now."""
        stats.gradients += 1
        acc: Gradients = [None] * len(params)
        for args, w, where in evaluations:
            with torch.enable_grad():
                call()
                loss = check_loss(loss_fn(*args), where)
                if sharded:
                    grads = _backward_gradients(loss * (w * loss_scale), params)
                    w_out = 1.0
                else:
                    grads = list(torch.autograd.grad(loss, params, allow_unused=True))
                    w_out = w
            check_gradients(grads, where)
            accumulate(acc, [None if g is None else g.detach() for g in grads], w_out)
        return acc

    # the loss at θ and the dtype the forward computes in (every rank steps with the coarsest
    # one), from one forward pass without a graph; the snapshot every gradient restores
    record = _ComputeDtypes()
    with torch.no_grad(), record:
        call()
        losses = [check_loss(loss_fn(*args), where, need_grad=False).detach() * w for args, w, where in evaluations]
    loss0 = torch.stack(losses).sum()
    theta0 = [t.detach().clone() for t in locals_]
    stats.compute_dtype = _lowest_precision([stats.compute_dtype, *record.seen])
    u = norm_inf([torch.tensor([torch.finfo(stats.compute_dtype).eps], dtype=torch.float64, device=locals_[0].device)])
    stats.compute_dtype = min(_FLOATING, key=lambda d: abs(math.log(torch.finfo(d).eps / u)))
    theta_max = norm_inf(theta0)

    def gradient_at(vectors: Sequence[Tensor], h: float) -> Gradients:
        """∇L(θ + h·v), the parameters put back bit for bit (also when interrupted twice)."""

        def write() -> None:
            for t, t0, x in zip(locals_, theta0, vectors):
                t.detach().copy_(torch.add(t0, x.to(t0.dtype), alpha=h))

        with overwritten(locals_, theta0, write):
            return gradient()

    def central(x: Sequence[Tensor], h: float) -> list[Tensor]:
        """D(h) = (∇L(θ + h·x) − ∇L(θ − h·x)) / 2h."""
        return [d.div_(2.0 * h) for d in _sub(gradient_at(x, h), gradient_at(x, -h), x)]

    live = None
    if suspects is not None:
        live = _loss_independent(suspects, gradient_at, norm_inf, locals_, u, theta_max, stats)

    def masked(vectors: Sequence[Tensor]) -> list[Tensor]:
        if live is None:
            return list(vectors)
        return [v if m is None else v * m.to(v.dtype) for v, m in zip(vectors, live)]

    def extrapolated(x: Sequence[Tensor], h: float) -> tuple[list[Tensor], float, list[Tensor]]:
        """R(h) = (4·D(h) − D(2h))/3, t = ‖D(h) − R(h)‖/‖R(h)‖ = ‖D(2h) − D(h)‖/3‖R(h)‖, and D(h)."""
        d1 = central(x, h)
        r = central(x, 2.0 * h)
        diff = norm_sq([b - a for a, b in zip(d1, r)])
        for a, b in zip(d1, r):  # in place: R(h) where D(2h) was
            b.mul_(-1.0 / 3.0).add_(a, alpha=4.0 / 3.0)
        rr = norm_sq(r)  # 0 for x ≠ 0: the step rounded away (below the compute dtype's resolution)
        return r, (math.sqrt(diff / rr) / 3.0 if rr > 0 else math.inf), d1

    def base_step(x: Sequence[Tensor]) -> float:
        """ε₀ for direction x (0 for x = 0, NaN for a non-finite x)."""
        x_max = norm_inf(x)
        if x_max == 0.0 or not math.isfinite(x_max):
            return 0.0 if x_max == 0.0 else math.nan
        return u**FD_EXPONENT * (1.0 + theta_max) / x_max

    def adapted(x: Sequence[Tensor], eps0: float) -> tuple[list[Tensor], float, list[Tensor]]:
        """R along x at the measurement's step, shortened while t > TRUNCATION_LIMIT; the step
        used and D at it. The measurement keeps the step for its next products."""
        best: tuple[float, list[Tensor], float, list[Tensor]] | None = None
        scale, previous = stats.scale, math.inf
        for attempt in range(MAX_SHORTENINGS + 1):
            r, t, d1 = extrapolated(x, eps0 * scale)
            if best is None or t < best[0]:
                best = (t, r, scale, d1)
            if t <= TRUNCATION_LIMIT or not math.isfinite(t) or attempt == MAX_SHORTENINGS:
                break
            if t > 0.5 * previous:  # the shorter step did not pay: rounding dominates
                stats.noise_limited = True
                break
            floor = MIN_STEP_FACTOR * u**FD_EXPONENT  # shorter steps round away in the compute dtype
            if scale <= floor:
                stats.noise_limited = True
                break
            previous = t
            stats.shortenings += 1
            scale = max(floor, scale * min(0.5, max(1.0 / 16.0, math.sqrt(TRUNCATION_TARGET / t))))
        assert best is not None
        t, r, scale, d1 = best
        stats.truncation = max(stats.truncation, t)
        # back towards ε₀ once truncation is far below the limit (rounding shrinks with ε)
        stats.scale = min(1.0, 2.0 * scale) if t < TRUNCATION_TARGET / 16.0 else scale
        return r, eps0 * scale, d1

    def apply(vectors: Sequence[Tensor]) -> list[Tensor | None]:
        x = masked(vectors)
        eps0 = base_step(x)
        if eps0 == 0.0:
            return [None] * len(params)
        if math.isnan(eps0):
            return [torch.full_like(v, math.nan) for v in vectors]
        return list(masked(adapted(x, eps0)[0]))

    def error_pair(vectors: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]] | None:
        """R along the vector at a step adapted to it, and at half that step: their difference
        estimates R's error (two more gradients than a product)."""
        x = masked(vectors)
        eps0 = base_step(x)
        if eps0 == 0.0 or math.isnan(eps0):
            return None
        coarse, h, d_one = adapted(x, eps0)
        fine = [(4.0 * a - b).div_(3.0) for a, b in zip(central(x, 0.5 * h), d_one)]
        return masked(coarse), masked(fine)

    return HVP(params, loss0, 0, apply, samples=samples, backend="fd", stats=stats, _error_pair=error_pair)


def _loss_independent(
    suspects: Sequence[Tensor | None],
    gradient_at: Callable[[Sequence[Tensor], float], Gradients],
    norm_inf: Callable[[Sequence[Tensor]], float],
    locals_: Sequence[Tensor],
    u: float,
    theta_max: float,
    stats: FDStats,
) -> list[Tensor | None] | None:
    """Masks (True = kept) of the suspect coordinates the loss does not depend on, or None.

    The suspects (P at its floor) of a set of parameters are moved together along a random ±1
    pattern, forth and back by a product's step (δ = √u·(1 + ‖θ‖∞)): if no gradient changes by
    more than the noise level (``NOISE_FACTOR``·u·‖g‖∞), finite differences cannot see any
    curvature there and would only divide rounding noise by the step, so the set is left out.
    A set that answers is split by parameter tensor and each half probed again, so a live
    suspect (a LoRA factor initialised at zero) does not hide loss-independent ones. Two
    gradients per probe; one probe when the suspects are all loss-independent or all live.
    """
    masks = [None if m is None else m.to(torch.float64) for m in suspects]
    holders = [i for i, m in enumerate(masks) if m is not None and norm_inf([m]) > 0]
    if not holders:
        return None
    delta = PROBE_FACTOR * u**FD_EXPONENT * (1.0 + theta_max)
    z: list[Tensor] = []
    for i, (t, m) in enumerate(zip(locals_, masks)):  # per-parameter seeds: replicas agree across ranks
        gen = torch.Generator().manual_seed(0x5EED + i)
        signs = torch.randint(0, 2, tuple(t.shape), generator=gen).to(device=t.device, dtype=t.dtype) * 2 - 1
        z.append(torch.zeros_like(t) if m is None else signs * m.to(t.dtype))

    def independent(subset: Sequence[int]) -> bool:
        x = [z[i] if i in subset else torch.zeros_like(t) for i, t in enumerate(locals_)]
        plus, minus = gradient_at(x, delta), gradient_at(x, -delta)
        nothing: Gradients = [None] * len(x)
        level = NOISE_FACTOR * u * max(norm_inf(_sub(plus, nothing, x)), norm_inf(_sub(minus, nothing, x)))
        return norm_inf(_sub(plus, minus, x)) <= level

    dead: list[int] = []
    pending = [holders]
    while pending:
        subset = pending.pop()
        if independent(subset):
            dead.extend(subset)
        elif len(subset) > 1:
            pending += [subset[: len(subset) // 2], subset[len(subset) // 2 :]]
    if not dead:
        return None
    kept: list[Tensor | None] = [None] * len(locals_)
    for i in dead:
        mask = suspects[i]
        assert mask is not None  # a holder
        stats.loss_independent += int(mask.sum())
        kept[i] = ~mask
    return kept
