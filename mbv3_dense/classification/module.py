"""Training and validating an image classifier: the LightningModule of ``lightning fit -c configs/*_imagenet.yaml``."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from mbv3_dense.classification.data import ClassificationBatch
from mbv3_dense.classification.predict import ClassificationWriter, TopK, draw_top5, top_k
from mbv3_dense.data.predict import PredictBatch
from mbv3_dense.training.guards import check_loss
from mbv3_dense.training.task import TaskModule

log = logging.getLogger(__name__)


@torch.no_grad()
def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average = decay * average + (1 - decay) * model`` over parameters and floating-point
    buffers (BN running statistics); integer buffers are copied. Both have the same structure."""
    for avg, new in zip(average.state_dict().values(), model.state_dict().values(), strict=True):
        if avg.dtype.is_floating_point:
            avg.lerp_(new.detach(), 1.0 - decay)
        else:
            avg.copy_(new)


@torch.no_grad()
def count_outputs(model: nn.Module, size: int = 32) -> int:
    """Width of ``model``'s output on one ``[1, 3, size, size]`` input (evaluated in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        return int(model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device)).shape[-1])
    finally:
        model.train(was_training)


class ClassificationModule(TaskModule):
    """Cross-entropy training of a classifier with top-1/top-5 validation accuracy.

    The batch is a :class:`~mbv3_dense.classification.data.ClassificationBatch` (uint8 images
    ``[N, 3, H, W]``, normalised with the network's ``normalize`` once on the device, labels ``[N]``,
    count of skipped files).
    Logs ``train/loss``, ``train/top1``, ``val/loss``, ``val/top1``, ``val/top5`` (fractions in
    [0, 1]) and ``data/skipped_images`` when a skip policy dropped files.

    With ``ema_decay`` the module keeps ``model_ema``, an exponential moving average of
    ``model``'s weights updated after every optimizer step; validation then uses it, and it is
    saved in (and resumed from) the checkpoint under ``model_ema.*``, which
    :func:`mbv3_dense.checkpoints.weights.lightning_model_state` prefers when loading the ``.ckpt``.

    Args:
        model: the network, ``[N, 3, H, W] -> [N, num_classes]`` logits, e.g.
            :func:`mbv3_dense.mobilenet_v3_large`.
        label_smoothing: cross-entropy label smoothing.
        ema_decay: per-step decay of the weight average; ``None`` disables it.
        options: :class:`~mbv3_dense.training.task.TaskModule`'s (optimizer, scheduler, lr_batch_size,
            weight_decay_norm_bias, nonfinite_loss, channels_last, compile, freeze_backbone_epochs,
            backbone_lr_multiplier, freeze_bn_statistics, predict_backend; the command line lists them). The
            scheduler is stepped once per epoch.
    """

    task = "classify"
    monitor = "val/top1"

    def __init__(self, *, model: nn.Module, label_smoothing: float = 0.0, ema_decay: float | None = None,
                 **options: Any) -> None:
        super().__init__(model=model, **options)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        # The metrics need the class count: read it off the network's output once.
        self.num_classes = num_classes = count_outputs(model)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        self.ema_decay = ema_decay
        self.model_ema: nn.Module | None = None
        if ema_decay is not None:
            self.model_ema = copy.deepcopy(model).requires_grad_(False)
        self.train_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_loss = MeanMetric()  # image-weighted, synced by torchmetrics: exact under DDP with uneven shards
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        # top-5 needs at least 5 classes; with fewer it is the same as top-(num_classes) = 1.0.
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")

    @property
    def eval_model(self) -> nn.Module:
        """The network that validation uses: the weight average when kept, else ``model``."""
        return self.model_ema if self.model_ema is not None else self.model

    def batch_to_input(self, batch: ClassificationBatch) -> ClassificationBatch:
        return batch._replace(images=self.images_to_input(batch.images))

    def precise_bn_forward(self, batch: ClassificationBatch) -> None:
        # PreciseBN resets every BN of the module, the average's included: recompute both.
        self.model(batch.images)
        if self.model_ema is not None:
            self.model_ema(batch.images)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "predict":
            names = getattr(datamodule, "predict_class_names", None)
            if names is not None and len(names) != self.num_classes:
                raise ValueError(f"{datamodule.root / 'train'} has {len(names)} class folders but the network has "
                                 f"{self.num_classes} outputs: its class names do not fit these weights (point "
                                 "--data.root at the training data of the checkpoint, or at a folder without train/)")
            return
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes ({datamodule.root}) but the module was configured "
                f"with a network of {self.num_classes} outputs: set the network's num_classes "
                f"(model.init_args.model.init_args.num_classes) to {data_classes}"
            )

    def training_step(self, batch: ClassificationBatch, batch_idx: int) -> Tensor | None:
        self._log_skipped(batch, "train")
        self._no_update = batch.labels.numel() == 0  # a step that changes no weight leaves the average alone
        if self._no_update:
            return None
        logits = self.model(batch.images)
        loss = self.criterion(logits.float(), batch.labels)  # fp32 under mixed precision
        checked = check_loss(self, loss, {"cross_entropy": loss}, self.nonfinite_loss)
        if checked is not loss:
            self._no_update = checked is None
            return checked  # skipped (None; a zero loss under DDP)
        self.train_top1(logits.detach(), batch.labels)
        bs = batch.labels.numel()
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/top1", self.train_top1, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        # The average follows every optimizer step, inside the step, so that a checkpoint written at
        # on_train_batch_end (step checkpoints) already holds the average of that step.
        super().optimizer_step(*args, **kwargs)
        if self.model_ema is not None and not getattr(self, "_no_update", False):
            ema_update(self.model_ema, self.model, self.ema_decay)

    def validation_step(self, batch: ClassificationBatch, batch_idx: int) -> None:
        self._log_skipped(batch, "val")
        if batch.labels.numel() == 0:
            return
        logits = self.eval_model(batch.images)
        bs = batch.labels.numel()
        self.val_top1(logits, batch.labels)
        self.val_top5(logits, batch.labels)
        self.val_loss.update(self.criterion(logits.float(), batch.labels), weight=bs)
        self.log("val/loss", self.val_loss, batch_size=bs)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=bs)
        self.log("val/top5", self.val_top5, batch_size=bs)

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[TopK]:
        """Top-5 (or all, with fewer classes) softmax probabilities of each image of ``batch``, whose
        ``inputs`` the data module's validation transform made; uses the weight average when kept."""
        if batch.inputs is None:
            return []
        x = self.images_to_input(batch.inputs)
        return top_k(self.predict_network(x)(x))

    def draw_predictions(self, images: list[Tensor]) -> list[Image.Image]:
        """Validation crops (uint8 ``[3, H, W]``) with their top-5 drawn
        (:class:`~mbv3_dense.training.callbacks.ValidationPictures`)."""
        x = self.images_to_input(torch.stack(images).to(self.device))
        top = self.eval_model(x).float().softmax(dim=1).topk(min(5, self.num_classes), dim=1)
        names = (self.class_info or {}).get("names") or [str(i) for i in range(self.num_classes)]
        return [draw_top5(image, [(names[i], p) for p, i in zip(probs.tolist(), idx.tolist(), strict=True)], 192)
                for image, probs, idx in zip(images, top.values.cpu(), top.indices.cpu(), strict=True)]

    def prediction_writer(self, **options) -> ClassificationWriter:
        """The writer ``lightning predict`` adds when the config names none."""
        return ClassificationWriter(**options)

    def _log_skipped(self, batch: ClassificationBatch, split: str) -> None:
        if batch.skipped.item():
            self.log(f"data/skipped_images_{split}", batch.skipped.float(), reduce_fx="sum", on_step=False,
                     on_epoch=True, batch_size=1, sync_dist=True)
