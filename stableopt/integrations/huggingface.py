"""``SharpnessCallback`` for ``transformers.Trainer``: the edge ratio on a fixed probe batch every N steps.

Train with a stableopt optimizer (``Trainer(optimizers=(stableopt.AdamW(...), scheduler))``),
attach the callback, and every ``every`` optimizer steps it measures λ_max(P⁻¹H), the threshold
and the ratio on ``batch`` and logs them through ``trainer.log`` (so into ``log_history`` and
every reporter the Trainer feeds: TensorBoard, W&B, ...), under ``stableopt/`` names, as a row
of their own at the step they were measured. The Trainer's own rows (loss, grad_norm,
learning_rate every ``logging_steps``) are all logged as without the callback; on a step where
both log, the Trainer's row comes second::

    opt = stableopt.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(opt, None))
    SharpnessCallback(probe_batch, every=50).attach(trainer)
    trainer.train()

The measurement runs in the optimizer's step post hook (a monitor), so H(θ_t) is paired with the
P and the learning rate the step used; with gradient accumulation a "step" is an optimizer step.
The measurement leaves parameters, gradients, optimizer state, RNG and buffers as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - exercised where transformers is absent
    raise ImportError('stableopt.integrations.huggingface needs transformers: pip install "stableopt[hf]"') from None

from torch import Tensor

from ._common import MetricsBuffer, math_attention, require_stableopt

__all__ = ["SharpnessCallback"]

HOW_TO_SWITCH = (
    "Create it yourself and pass it to the Trainer: "
    "opt = stableopt.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay); "
    "Trainer(..., optimizers=(opt, None)) (None: the Trainer builds its usual lr scheduler for it)."
)


def _model_loss(model: Any, batch: Any) -> Tensor:
    """The default probe loss: a transformers model called on the batch returns its loss
    (attention through the MATH kernel: the default fused SDPA kernels have no double backward)."""
    with math_attention():
        out = model(**batch) if isinstance(batch, dict) else model(*batch)
    loss = out["loss"] if isinstance(out, dict) or hasattr(out, "keys") else out[0]
    if loss is None:
        raise ValueError("the model returned no loss for the probe batch: include its labels (e.g. batch['labels'])")
    return loss


class SharpnessCallback(TrainerCallback):
    """Measure the edge of stability on a fixed probe batch every ``every`` optimizer steps.

    Args:
        batch: the probe batch (a dict of tensors as the model takes them, with labels); moved
            to the model's device at the start of training. A fixed batch makes measurements
            comparable: the Hessian measured is that of the loss on this batch.
        loss_fn: ``loss_fn(model, batch) -> Tensor``; default ``model(**batch).loss``.
        every: measure after every ``every``-th optimizer step.
        raw: also measure λ_max(H).
        k: top eigenvalues to report, as in :meth:`stableopt.StabilityMixin.sharpness`.
        tol: relative accuracy, as there.
        max_iters: Lanczos steps per solve, as there.

    Attributes:
        monitor: the :class:`stableopt.Monitor` during training (None before and after).
        optimizer: the stableopt optimizer found at the start of training.
    """

    def __init__(
        self,
        batch: Any,
        loss_fn: Callable[[Any, Any], Tensor] | None = None,
        *,
        every: int = 100,
        raw: bool = False,
        k: int = 1,
        tol: float = 1e-3,
        max_iters: int | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be None or callable(model, batch), got {type(loss_fn).__name__}")
        self.batch = batch
        self.loss_fn = loss_fn or _model_loss
        self.options: dict[str, Any] = {"every": every, "raw": raw, "k": k, "tol": tol, "max_iters": max_iters}
        self.trainer: Any = None
        self.optimizer: Any = None
        self.monitor: Any = None
        self._buffer = MetricsBuffer()

    def attach(self, trainer: Any) -> SharpnessCallback:
        """Add this callback to ``trainer`` and log through its ``log``; returns ``self``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "SharpnessCallback logs through the Trainer: add it with "
                "SharpnessCallback(batch, every=...).attach(trainer) instead of Trainer(callbacks=[...])"
            )
        opt = require_stableopt(optimizer, HOW_TO_SWITCH)
        device = next(model.parameters()).device
        batch = _to(self.batch, device)
        self.optimizer = opt
        self.monitor = opt.monitor(lambda: self.loss_fn(model, batch), log=self._buffer, **self.options)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Measured inside this step's optimizer.step(); logged as a row of its own at this step.
        # Trainer.log() ends in CallbackHandler.on_log, which sets control.should_log = False:
        # that flag, set by DefaultFlowCallback.on_step_end just before, is what makes the Trainer
        # log its own loss / grad_norm / learning_rate row after on_step_end returns, so it is
        # put back as it was (the Trainer's row is still due, after this one).
        for metrics, _ in self._buffer.drain():
            due = control.should_log
            self.trainer.log(metrics)
            control.should_log = control.should_log or due

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.monitor is not None:
            self.monitor.remove()
            self.monitor = None


def _to(batch: Any, device: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch
