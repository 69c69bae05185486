"""What both framework callbacks share: finding the stableopt optimizer and buffering metrics."""

from __future__ import annotations

import contextlib
from typing import Any

from ..optimizers import StabilityMixin


def math_attention() -> contextlib.AbstractContextManager[Any]:
    """Scaled-dot-product attention through its MATH kernel, which has a double backward.

    The fused SDPA kernels (flash, efficient, and the default flash kernel on CPU) have no
    double backward: through them ``hvp="auto"`` measures with finite differences of gradients
    (2 gradients per product). The MATH kernel computes the same attention with ordinary
    differentiable ops, so the callbacks' probe loss uses it and products are exact double
    backward (about 1.2 gradients each).
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the fused kernels there are CUDA-only
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer under framework wrappers (accelerate's ``AcceleratedOptimizer``,
    Lightning's ``LightningOptimizer``), which keep it as ``.optimizer`` or ``._optimizer``."""
    seen = 0
    while not isinstance(optimizer, StabilityMixin) and seen < 8:
        inner = getattr(optimizer, "optimizer", None) or getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def require_stableopt(optimizer: Any, how_to_switch: str) -> StabilityMixin:
    """``optimizer`` unwrapped if it is a stableopt optimizer, else a TypeError saying how to switch."""
    inner = unwrap_optimizer(optimizer)
    if isinstance(inner, StabilityMixin):
        return inner
    name = "no optimizer" if inner is None else f"{type(inner).__module__}.{type(inner).__qualname__}"
    raise TypeError(f"SharpnessCallback measures with a stableopt optimizer, but training uses {name}. {how_to_switch}")


class MetricsBuffer:
    """A monitor's ``log=``: keeps the latest metrics until the framework's own logger takes them."""

    def __init__(self) -> None:
        self.pending: list[tuple[dict[str, float], int]] = []

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.pending.append((dict(metrics), step))

    def drain(self) -> list[tuple[dict[str, float], int]]:
        out, self.pending = self.pending, []
        return out
