"""The LightningModule where Cityscapes data and the LR-ASPP model meet: loss, metrics, poly LR.

Logged: ``train/loss``, ``val/loss``, ``val/miou`` (mean IoU over the 19 trainIds that occur in
the ground truth or the predictions, as the official evaluator averages), ``val/iou/<class>``
(per class; 0 where a class is absent from both) and, from
:class:`mbv3_dense.latency.LatencyCallback`, ``latency_ms`` at the configured size (1024x2048 in
the paper's protocol).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassJaccardIndex

from mbv3_dense.guards import NonFinitePolicy, check_loss
from mbv3_dense.predict import PredictBatch
from mbv3_dense.task import TaskModule
from segmentation.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES
from segmentation.predict import SegmentationWriter, preprocess


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Pixel-wise cross-entropy; ``logits [N, C, H, W]``, ``target [N, H, W]`` trainIds, 255 ignored.

    Returns 0 (with a gradient) when every pixel is ignored, instead of NaN.
    """
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    # fp32 under mixed precision: a softmax over 19 classes averaged over millions of pixels.
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def miou_metric() -> MulticlassJaccardIndex:
    """mIoU over the 19 trainIds, 255 ignored; classes absent from ground truth and predictions are
    left out of the mean (as the official evaluator's NaN-skipping average)."""
    return MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, average="macro")


class SegmentationModule(TaskModule):
    """Trains and validates an LR-ASPP model on Cityscapes trainIds.

    Batches: ``(images [N, 3, H, W] uint8, masks [N, H, W] uint8 trainIds, 255 = ignore)``; on the device the
    images are normalised with the network's ``normalize`` and the masks become int64 (:meth:`batch_to_input`).

    Args:
        model: the network (e.g. :func:`segmentation.lraspp_mobilenet_v3_large`); its forward returns
            logits ``[N, 19, H, W]`` at input size.
        optimizer, scheduler (stepped every iteration; poly LR:
            ``torch.optim.lr_scheduler.PolynomialLR(total_iters=<max_steps>, power=0.9)``), lr_batch_size,
            weight_decay_norm_bias, nonfinite_loss, channels_last, compile, freeze_backbone_epochs,
            backbone_lr_multiplier, freeze_bn_statistics: as :class:`~mbv3_dense.task.TaskModule`.
    """

    task = "segment"
    scheduler_interval = "step"

    def __init__(self, *, model: nn.Module, optimizer: OptimizerCallable = torch.optim.SGD,
                 scheduler: LRSchedulerCallable | None = None, lr_batch_size: int | None = None,
                 weight_decay_norm_bias: bool = False, nonfinite_loss: NonFinitePolicy = "stop",
                 channels_last: bool | None = None, compile: bool = False,  # noqa: A002 - the option's name
                 freeze_backbone_epochs: int = 0, backbone_lr_multiplier: float = 1.0,
                 freeze_bn_statistics: bool = False) -> None:
        super().__init__(model=model, optimizer=optimizer, scheduler=scheduler, lr_batch_size=lr_batch_size,
                         weight_decay_norm_bias=weight_decay_norm_bias, nonfinite_loss=nonfinite_loss,
                         channels_last=channels_last, compile=compile, freeze_backbone_epochs=freeze_backbone_epochs,
                         backbone_lr_multiplier=backbone_lr_multiplier, freeze_bn_statistics=freeze_bn_statistics)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.val_miou = miou_metric()
        self.val_iou = MulticlassJaccardIndex(num_classes=NUM_CLASSES, ignore_index=IGNORE_INDEX, average="none")
        self.val_loss = MeanMetric()

    def batch_to_input(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """uint8 images -> the network's input; uint8 trainId masks -> int64 (an eighth of the bytes travel)."""
        images, masks = batch
        return self.images_to_input(images), masks.long()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, masks = batch
        loss = segmentation_loss(self.model(images), masks)
        checked = check_loss(self, loss, {"cross_entropy": loss}, self.nonfinite_loss)
        if checked is not loss:
            return checked  # skipped (None; a zero loss under DDP)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, masks = batch
        logits = self.model(images)
        self.val_loss.update(segmentation_loss(logits, masks), weight=images.shape[0])
        preds = logits.argmax(1)
        self.val_miou.update(preds, masks)
        self.val_iou.update(preds, masks)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the confusion matrices across processes (every rank calls it).
        per_class = self.val_iou.compute()
        self.log("val/miou", self.val_miou.compute(), prog_bar=True)
        metrics = {"val/loss": self.val_loss.compute()}
        metrics.update({f"val/iou/{name}": per_class[i] for i, name in enumerate(CLASS_NAMES)})
        self.log_dict(metrics)
        for metric in (self.val_miou, self.val_iou, self.val_loss):
            metric.reset()

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[Tensor]:
        """Per image of ``batch`` (uint8, original sizes; one forward pass each, since sizes differ):
        the argmax trainIds, uint8 ``[H, W]`` at the image's size, on the CPU."""
        return [self.model(preprocess(image)).argmax(1)[0].to(torch.uint8).cpu() for image in batch.images]

    def prediction_writer(self, **options) -> SegmentationWriter:  # noqa: ANN003 - the writer's options
        """The writer ``lightning predict`` adds when the config names none."""
        return SegmentationWriter(**options)
