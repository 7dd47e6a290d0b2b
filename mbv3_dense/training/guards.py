"""Non-finite losses: stop at once with the step and the loss parts, or skip the batch and count it.

Each task's ``training_step`` passes its total loss and parts through :func:`check_loss`; returning
``None`` from ``training_step`` makes Lightning skip the optimizer step for that batch.
:class:`FiniteCheckpointGuard` refuses to write a checkpoint whose weights are not finite.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import lightning as L
import torch
from torch import Tensor

log = logging.getLogger(__name__)

NonFinitePolicy = Literal["stop", "skip"]


class NonFiniteLossError(FloatingPointError):
    """Raised by the ``"stop"`` policy: names the step and every loss part."""


def _fmt(parts: Mapping[str, Tensor | float]) -> str:
    return ", ".join(f"{k}={float(v.detach() if isinstance(v, Tensor) else v):.6g}" for k, v in parts.items())


def check_loss(module: L.LightningModule, loss: Tensor, parts: Mapping[str, Tensor | float],
               policy: NonFinitePolicy = "stop") -> Tensor | None:
    """Return ``loss`` if finite; otherwise raise (``"stop"``) or return ``None`` (``"skip"``).

    ``"skip"`` still raises when the module's floating-point buffers became non-finite in this
    forward pass (BatchNorm statistics after a NaN input): no skip can undo that.

    Skipped batches are counted in ``module.skipped_nonfinite`` and logged as
    ``train/skipped_nonfinite``. The check syncs with the device once per step. Under DDP (where
    Lightning does not allow a ``None`` step) a skipped batch returns a zero loss over the
    parameters instead: this rank's gradient is zero and the optimizer still steps with the
    other ranks' average.
    """
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    step = module.trainer.global_step if module._trainer is not None else -1
    epoch = module.trainer.current_epoch if module._trainer is not None else -1
    message = (f"non-finite loss at global step {step} (epoch {epoch}): loss={float(loss.detach()):.6g}; "
               f"parts: {_fmt(parts)}")
    if policy == "stop":
        raise NonFiniteLossError(message + ". Training stopped; no checkpoint was written for this step. "
                                 "Resume from last.ckpt with a lower learning rate, or set "
                                 "nonfinite_loss: skip to skip such batches.")
    if policy != "skip":
        raise ValueError(f"nonfinite_loss policy must be 'stop' or 'skip', got {policy!r}")
    poisoned = [name for name, buf in module.named_buffers()
                if buf.is_floating_point() and not bool(torch.isfinite(buf).all())]
    if poisoned:
        # The forward pass already folded non-finite activations into BatchNorm's running statistics:
        # skipping the update cannot undo that, and every later output would be NaN.
        raise NonFiniteLossError(message + f". The batch cannot be skipped: it made {len(poisoned)} buffers non-finite "
                                 f"({', '.join(poisoned[:3])}{' ...' if len(poisoned) > 3 else ''}), usually "
                                 "BatchNorm running statistics after a NaN/inf input. Training stopped; "
                                 "check the input data (scripts/check_dataset.py) and resume from last.ckpt.")
    count = getattr(module, "skipped_nonfinite", 0) + 1
    module.skipped_nonfinite = count
    log.warning("%s; batch skipped (%d skipped so far)", message, count)
    module.log("train/skipped_nonfinite", float(count), on_step=True, on_epoch=False, rank_zero_only=True)
    if module._trainer is not None and module.trainer.world_size > 1:
        # Lightning refuses a None step under DDP (the other ranks wait in the gradient all-reduce):
        # this rank contributes a zero gradient instead, so its batch drops out of the average.
        return sum(p.sum() for p in module.parameters() if p.requires_grad) * 0.0
    return None


class FiniteCheckpointGuard(L.Callback):
    """Refuse to save a checkpoint whose parameters or buffers hold NaN or infinity."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict) -> None:
        bad = [name for name, t in checkpoint["state_dict"].items()
               if t.is_floating_point() and not bool(torch.isfinite(t).all())]
        if bad:
            raise NonFiniteLossError(
                f"refusing to save a checkpoint at global step {trainer.global_step}: non-finite values in "
                f"{len(bad)} tensors ({', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''})"
            )
