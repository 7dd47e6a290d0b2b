"""Callbacks shared by every task."""

from __future__ import annotations

import itertools
import logging

import lightning as L
import torch
from torch import nn

log = logging.getLogger(__name__)


class PreciseBN(L.Callback):
    """Recompute BatchNorm running statistics over training batches before each validation.

    In short runs the running averages (momentum 0.01-0.03) lag far behind the weights, so
    eval-mode metrics sit near zero although the network has learned (../shared/REFERENCE.md;
    detectron2 calls this PreciseBN). This runs ``num_batches`` training batches through the
    network in train mode without gradients, with every BN accumulating an exact average, then
    restores the momenta. Under DDP the statistics are averaged over the processes.

    The LightningModule may define ``precise_bn_forward(batch)`` to say how a (device-moved)
    training batch goes through the network; by default ``pl_module(batch[0])`` is called.

    Args:
        num_batches: training batches to average over (0 disables the callback).
        every_n_validations: recompute before every n-th validation during ``fit``.
    """

    def __init__(self, *, num_batches: int = 20, every_n_validations: int = 1) -> None:
        self.num_batches = num_batches
        self.every_n_validations = max(1, every_n_validations)
        self._count = 0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_batches <= 0 or trainer.train_dataloader is None:
            return
        self._count += 1
        if (self._count - 1) % self.every_n_validations:
            return
        self.recompute(trainer, pl_module)

    @torch.no_grad()
    def recompute(self, trainer: L.Trainer, pl_module: L.LightningModule) -> int:
        """Recompute the statistics now; returns the number of batches used."""
        norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            return 0
        momenta = [m.momentum for m in norms]
        was_training = pl_module.training
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        pl_module.train()
        used = 0
        forward = getattr(pl_module, "precise_bn_forward", None)
        try:
            for batch in itertools.islice(trainer.train_dataloader, self.num_batches):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                if forward is not None:
                    forward(batch)
                else:
                    pl_module(batch[0])
                used += 1
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
            pl_module.train(was_training)
        if trainer.world_size > 1:
            for m in norms:
                m.running_mean.copy_(trainer.strategy.reduce(m.running_mean, reduce_op="mean"))
                m.running_var.copy_(trainer.strategy.reduce(m.running_var, reduce_op="mean"))
        log.info("PreciseBN: recomputed %d BatchNorm layers over %d training batches", len(norms), used)
        return used
