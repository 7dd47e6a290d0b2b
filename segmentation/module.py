"""The LightningModule where segmentation data and the LR-ASPP model meet: loss, metrics, poly LR.

The class count is the network's (``model.num_classes``: 19 Cityscapes trainIds, or a classes file's
count, which ``lightning fit`` gives the network from the data). Class names and the ignore value come
from the data module's class info (:mod:`mbv3_dense.checkpoints.classes`; Cityscapes: the trainId names, 255),
else the network's ``class_names``, else the indices.

Logged: ``train/loss``, ``val/loss``, ``val/miou`` (mean IoU over the classes that occur in the ground
truth or the predictions, as the official evaluator averages), ``val/iou/<class name>`` (per class; 0
where a class is absent from both) and, from :class:`mbv3_dense.training.latency.LatencyCallback`,
``latency_ms`` at the configured size (1024x2048 in the paper's protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassJaccardIndex

from mbv3_dense.checkpoints.classes import ClassInfoError, check_class_info
from mbv3_dense.data.predict import PredictBatch
from mbv3_dense.training.guards import check_loss
from mbv3_dense.training.task import TaskModule
from segmentation.labels import IGNORE_INDEX, NUM_CLASSES, cityscapes_class_info
from segmentation.predict import SegmentationWriter, class_colors, class_map, overlay


def segmentation_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Pixel-wise cross-entropy; ``logits [N, C, H, W]``, ``target [N, H, W]`` class indices (0..C-1),
    ``ignore_index`` ignored.

    Returns 0 (with a gradient) when every pixel is ignored, instead of NaN.
    """
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    # fp32 under mixed precision: a softmax over the classes averaged over millions of pixels.
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


def miou_metric(num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> MulticlassJaccardIndex:
    """mIoU over ``num_classes`` (default the 19 trainIds), ``ignore_index`` ignored; classes absent from ground
    truth and predictions are left out of the mean (as the official evaluator's NaN-skipping average)."""
    return MulticlassJaccardIndex(num_classes=num_classes, ignore_index=ignore_index, average="macro")


class SegmentationModule(TaskModule):
    """Trains and validates an LR-ASPP model on class-index masks (Cityscapes trainIds or a classes file's indices).

    Batches: ``(images [N, 3, H, W] uint8, masks [N, H, W] uint8 class indices, the ignore value where ignored)``;
    on the device the images are normalised with the network's ``normalize`` and the masks become int64
    (:meth:`batch_to_input`). At set-up the data module's ``class_info`` names the classes and gives the ignore
    value (:meth:`use_class_info`).

    Args:
        model: the network (e.g. :func:`segmentation.lraspp_mobilenet_v3_large`); its forward returns
            logits ``[N, model.num_classes, H, W]`` at input size.
        options: :class:`~mbv3_dense.training.task.TaskModule`'s (optimizer, scheduler, lr_batch_size,
            weight_decay_norm_bias, nonfinite_loss, channels_last, compile, freeze_backbone_epochs,
            backbone_lr_multiplier, freeze_bn_statistics, predict_backend; the command line lists them). The
            scheduler is stepped every iteration (poly LR:
            ``torch.optim.lr_scheduler.PolynomialLR(total_iters=<max_steps>, power=0.9)``).
    """

    task = "segment"
    monitor = "val/miou"
    scheduler_interval = "step"

    def __init__(self, *, model: nn.Module, **options: Any) -> None:
        super().__init__(model=model, **options)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.num_classes = int(model.num_classes)
        #: Class names by index for ``val/iou/<name>`` (``None``: the indices); set by :meth:`use_class_info`.
        self.class_names: list[str] | None = self._network_class_names()
        self.ignore_index = IGNORE_INDEX
        self._make_metrics()

    def _make_metrics(self) -> None:
        self.val_miou = miou_metric(self.num_classes, self.ignore_index)
        self.val_iou = MulticlassJaccardIndex(num_classes=self.num_classes, ignore_index=self.ignore_index,
                                              average="none")
        self.val_loss = MeanMetric()

    def _network_class_names(self) -> list[str] | None:
        names = getattr(self.model, "class_names", None)
        return list(names) if names is not None and len(names) == self.num_classes else None

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the data's class info, where the data module has one
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.use_class_info(self._class_info, type(datamodule).__name__)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # the classes the checkpoint records
        if self._class_info is not None and len(self._class_info["names"]) == self.num_classes:
            self.use_class_info(self._class_info, "the checkpoint")

    def draw_predictions(self, images: list[Tensor]) -> list[Image.Image]:
        """Validation images (uint8 ``[3, H, W]``) blended with their predicted classes' colours
        (:class:`~mbv3_dense.training.callbacks.ValidationPictures`)."""
        colors = class_colors(self.class_info or cityscapes_class_info())
        on_device = [image.to(self.device) for image in images]
        return [overlay(image, classes.numpy(), colors) for image, classes in
                zip(images, self.predict_step(PredictBatch(on_device, None, [], [], []), 0), strict=True)]

    def use_class_info(self, info: Mapping[str, Any] | None, source: str = "the data") -> None:
        """Name the classes and take the ignore value from the data's class info
        (:mod:`mbv3_dense.checkpoints.classes`);
        ``None``: the network's ``class_names`` (else the indices) and 255.

        Raises:
            mbv3_dense.checkpoints.classes.ClassInfoError: the data has another class count than the network's outputs.
        """
        if info is None:
            self.class_names, ignore_index = self._network_class_names(), IGNORE_INDEX
        else:
            info = check_class_info(info, source)
            if len(info["names"]) != self.num_classes:
                raise ClassInfoError(
                    f"{source}: the data has {len(info['names'])} classes ({', '.join(info['names'][:10])}) but the "
                    f"network outputs {self.num_classes}; set model.init_args.model.init_args.num_classes: "
                    f"{len(info['names'])} (lightning fit does when the data module reports num_classes)")
            self.class_names, ignore_index = info["names"], info.get("ignore_index", IGNORE_INDEX)
        if ignore_index != self.ignore_index:
            self.ignore_index = ignore_index
            self._make_metrics()

    def batch_to_input(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """uint8 images -> the network's input; uint8 trainId masks -> int64 (an eighth of the bytes travel)."""
        images, masks = batch
        return self.images_to_input(images), masks.long()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        images, masks = batch
        loss = segmentation_loss(self.model(images), masks, self.ignore_index)
        checked = check_loss(self, loss, {"cross_entropy": loss}, self.nonfinite_loss)
        if checked is not loss:
            return checked  # skipped (None; a zero loss under DDP)
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, masks = batch
        logits = self.model(images)
        self.val_loss.update(segmentation_loss(logits, masks, self.ignore_index), weight=images.shape[0])
        preds = logits.argmax(1)
        self.val_miou.update(preds, masks)
        self.val_iou.update(preds, masks)

    def on_validation_epoch_end(self) -> None:
        # compute() syncs the confusion matrices across processes (every rank calls it).
        per_class = self.val_iou.compute()
        self.log("val/miou", self.val_miou.compute(), prog_bar=True)
        metrics = {"val/loss": self.val_loss.compute()}
        names = self.class_names or [str(i) for i in range(self.num_classes)]
        metrics.update({f"val/iou/{name}": per_class[i] for i, name in enumerate(names)})
        self.log_dict(metrics)
        for metric in (self.val_miou, self.val_iou, self.val_loss):
            metric.reset()

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[Tensor]:
        """Per image of ``batch`` (uint8, original sizes; one forward pass each, since sizes differ):
        the argmax class indices, uint8 ``[H, W]`` at the image's size, on the CPU (normalised by the
        network's own ``normalize``, :meth:`~mbv3_dense.training.task.TaskModule.images_to_input`)."""
        out = []
        for image in batch.images:
            x = self.images_to_input(image[None])
            out.append(class_map(self.predict_network(x)(x)))
        return out

    def prediction_writer(self, **options) -> SegmentationWriter:
        """The writer ``lightning predict`` adds when the config names none (class info from the data module)."""
        return SegmentationWriter(**options)
