"""Callbacks shared by every task."""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from mbv3_dense.data.sampling import SeededSampler
from mbv3_dense.training.task import InferenceHooks

log = logging.getLogger(__name__)


class PreciseBN(L.Callback):
    """Recompute BatchNorm running statistics over training batches before each validation.

    In short runs the running averages (momentum 0.01-0.03) lag far behind the weights, so
    eval-mode metrics sit near zero although the network has learned (docs/robustness.md;
    detectron2 calls this PreciseBN). This runs ``num_batches`` training batches through the
    network in train mode without gradients, with every BN accumulating an exact average, then
    restores the momenta. Under DDP the statistics are averaged over the processes.

    Each batch goes to the device as Lightning moves training batches (``transfer_batch_to_device``,
    then ``on_after_batch_transfer``, where this project's modules turn uint8 images into the network's
    input). The LightningModule may define ``precise_bn_forward(batch)`` to say how that batch goes
    through the network; by default ``pl_module(batch[0])`` is called.

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
        """Recompute the statistics now; returns the number of batches used.

        Only the BatchNorm layers that train in train mode are recomputed: a module may keep some in eval
        mode (a frozen backbone, frozen BatchNorm statistics while fine-tuning), and their statistics stay.
        """
        was_training = pl_module.training
        pl_module.train()
        norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
        if not norms:
            pl_module.train(was_training)
            return 0
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: every batch weighs the same
        used = 0
        forward = pl_module.precise_bn_forward if isinstance(pl_module, InferenceHooks) else None
        # Dropout draws in train mode: fork the generators so that the training run's own streams
        # go on as if this pass had not happened (a run with and without PreciseBN differs only by BN).
        try:
            with torch.random.fork_rng(devices=[]):
                for batch in itertools.islice(_fresh_loader(trainer.train_dataloader), self.num_batches):
                    batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                    batch = pl_module.on_after_batch_transfer(batch, 0)
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


def _fresh_loader(loader: DataLoader) -> DataLoader:
    """A loader over the same data, sampler and collation as ``loader`` but with its own iterator.

    Iterating the trainer's loader itself would reset its persistent workers' iterator, i.e. the
    training epoch in progress when validation runs mid-epoch. The sampler is shared: its order is a
    function of (seed, epoch), so iterating it again draws nothing and changes nothing.
    """
    if not isinstance(loader, DataLoader):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler,
                      drop_last=loader.drop_last, collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=torch.Generator().manual_seed(0))


class ResumeState(L.Callback):
    """Save the random number generators in every checkpoint; on resume, restore them and continue
    the interrupted epoch where it stopped.

    Lightning's checkpoints hold weights, optimizer, LR schedulers, loops and callback states but
    not the RNG states; and a plain ``DataLoader`` restarts the interrupted epoch at its first
    batch. This callback stores the torch (CPU and CUDA), numpy and Python generator states under
    ``checkpoint["rng_states"]`` (tensors and tuples only, so ``torch.load(weights_only=True)``
    reads them) and, when training starts from a checkpoint, restores them at ``on_train_start``,
    after the data loaders were created and the sanity check ran, i.e. just before the next
    training batch is drawn. The data order continues where it stopped because every data module
    of this project builds its sampler with :func:`~mbv3_dense.data.sampling.training_sampler`, which
    skips the batches the interrupted epoch had done; with another sampler this warns.

    Since samples draw their augmentation from ``(seed, epoch, index)``, a run resumed from a step
    checkpoint sees the same batches, augmentations and dropout masks as an uninterrupted run, with
    any number of loader workers and on every rank under DDP (docs/robustness.md).
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self._loaded = checkpoint.get("rng_states")
        if self._loaded is None:
            log.warning("the checkpoint holds no RNG states (written without ResumeState): random streams restart")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        # Batches of the interrupted epoch whose step ran (a checkpoint written at on_train_batch_end
        # counts its batch as processed, not yet completed); none when the epoch had ended.
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if done >= trainer.num_training_batches:
            done = 0
        loader = trainer.train_dataloader
        sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
        if done and not isinstance(sampler, SeededSampler):
            log.warning("resuming epoch %d after %d batches with a sampler that cannot skip them: the epoch "
                        "restarts its data order (use mbv3_dense.data.sampling.training_sampler)",
                        trainer.current_epoch, done)
        if self._loaded is not None:
            states, self._loaded = self._loaded, None
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])
            kind, keys, pos, has_gauss, cached = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(_as_tuples(states["python"]))


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


class ValidationPictures(L.Callback):
    """Predictions drawn on a few fixed validation images after every validation, to see a run learn.

    The images are ``num_images`` of the validation set, evenly spaced and the same every time. The
    module draws them (``draw_predictions(images) -> PIL images``: top-5 for the classifier, boxes with
    class names for SSDLite, class-colour overlays for LR-ASPP). Each picture goes to TensorBoard
    (``val_pictures/<i>``, a slider over the steps) and, the latest one, to
    ``<log_dir>/val_pictures/<i>.png``. Rank 0 only; nothing is drawn during the sanity check.

    Args:
        num_images: pictures per validation (0 disables the callback).
    """

    def __init__(self, *, num_images: int = 4) -> None:
        self.num_images = num_images

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # on every rank: Lightning broadcasts it (rank 0 alone would hang under DDP)
        draw = getattr(pl_module, "draw_predictions", None)
        dataset = getattr(trainer.val_dataloaders, "dataset", None)
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0 or draw is None \
                or dataset is None or not len(dataset):
            return
        count = min(self.num_images, len(dataset))
        picks = sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})
        items = [dataset[i] for i in picks]
        images = [item[0] for item in items if item is not None]  # an unreadable file skipped by policy: None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad():
                pictures = draw(images)
        finally:
            pl_module.train(was_training)
        folder = Path(log_dir or trainer.default_root_dir) / "val_pictures"
        folder.mkdir(parents=True, exist_ok=True)
        for i, picture in enumerate(pictures):
            picture.save(folder / f"{i}.png")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(f"val_pictures/{i}", np.asarray(picture), trainer.global_step,
                                                dataformats="HWC")
