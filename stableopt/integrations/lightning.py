"""``SharpnessCallback`` for Lightning: the edge ratio on a fixed probe batch every N optimizer steps.

Return a stableopt optimizer from ``configure_optimizers`` and add the callback::

    class Model(L.LightningModule):
        def configure_optimizers(self):
            return stableopt.AdamW(self.parameters(), lr=1e-3)

    trainer = L.Trainer(callbacks=[SharpnessCallback(probe_batch, loss_fn, every=50)])

Every ``every`` optimizer steps it measures λ_max(P⁻¹H), the threshold and the ratio on the probe
batch and sends them to every logger of the Trainer (``logger.log_metrics``, at the optimizer's
step count, as ``LearningRateMonitor`` does) under ``stableopt/`` names. It works under automatic optimization, where Lightning calls
``optimizer.step(closure)``, with ``accumulate_grad_batches`` (a step is an optimizer step), and
under manual optimization. The measurement runs in the optimizer's step post hook, so H(θ_t) is
paired with the P and learning rate the step used, and leaves parameters, gradients, optimizer
state, RNG and buffers as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - exercised where lightning is absent
    raise ImportError('stableopt.integrations.lightning needs lightning: pip install "stableopt[lightning]"') from None

from torch import Tensor

from ._common import MetricsBuffer, require_stableopt

__all__ = ["SharpnessCallback"]

HOW_TO_SWITCH = (
    "Return one from configure_optimizers, e.g. "
    "`def configure_optimizers(self): return stableopt.AdamW(self.parameters(), lr=1e-3)` "
    "(a stableopt optimizer takes the same arguments as its torch.optim class)."
)


class SharpnessCallback(Callback):
    """Measure the edge of stability on a fixed probe batch every ``every`` optimizer steps.

    Args:
        batch: the probe batch, moved to the module's device at the start of training. A fixed
            batch makes measurements comparable: the Hessian is that of the loss on this batch.
        loss_fn: ``loss_fn(pl_module, batch) -> Tensor``, the scalar loss on the batch. It must
            not call ``self.log`` (use a plain function of the module, not ``training_step``).
        every: measure after every ``every``-th optimizer step.
        raw: also measure λ_max(H).
        k: top eigenvalues to report, as in :meth:`stableopt.StabilityMixin.sharpness`.
        tol: relative accuracy, as there.
        max_iters: Lanczos steps per solve, as there.
        optimizer: which of ``trainer.optimizers`` to measure (default the first).

    Attributes:
        monitor: the :class:`stableopt.Monitor` during training (None before and after).
        optimizer: the stableopt optimizer found at the start of training.
    """

    def __init__(
        self,
        batch: Any,
        loss_fn: Callable[[Any, Any], Tensor],
        *,
        every: int = 100,
        raw: bool = False,
        k: int = 1,
        tol: float = 1e-3,
        max_iters: int | None = None,
        optimizer: int = 0,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(pl_module, batch), got {type(loss_fn).__name__}")
        self.batch = batch
        self.loss_fn = loss_fn
        self.index = optimizer
        self.options: dict[str, Any] = {"every": every, "raw": raw, "k": k, "tol": tol, "max_iters": max_iters}
        self.optimizer: Any = None
        self.monitor: Any = None
        self._buffer = MetricsBuffer()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = list(trainer.optimizers)
        if not optimizers:
            require_stableopt(None, HOW_TO_SWITCH)
        opt = require_stableopt(optimizers[self.index], HOW_TO_SWITCH)
        batch = pl_module.transfer_batch_to_device(self.batch, pl_module.device, 0)
        self.optimizer = opt
        self.monitor = opt.monitor(lambda: self.loss_fn(pl_module, batch), log=self._buffer, **self.options)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        for metrics, step in self._buffer.drain():  # measured inside this batch's optimizer.step()
            for logger in trainer.loggers:  # as LearningRateMonitor does: one row per measurement
                logger.log_metrics(metrics, step=step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None
