"""The LightningModule where COCO data and SSDLite meet: loss parts, COCO mAP, latency hooks."""

from __future__ import annotations

import logging
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from torchmetrics import MeanMetric

from detection.data import Batch
from detection.loss import SSDLoss
from detection.metric import GatheredMeanAveragePrecision
from detection.model import SSDLite
from detection.predict import DetectionWriter, draw_detections
from mbv3_dense.data.predict import PredictBatch
from mbv3_dense.deploy.backend import detect
from mbv3_dense.training.guards import check_loss
from mbv3_dense.training.task import TaskModule

log = logging.getLogger(__name__)

# torchmetrics' result keys -> logged names (COCO's AP, AP50, AP75, APs, APm, APl).
MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


class DetectionModule(TaskModule):
    """Train and evaluate an :class:`~detection.model.SSDLite`.

    Logs ``train/{loss,box_loss,cls_loss}``, ``val/{loss,box_loss,cls_loss}`` and ``val/{map, map_50,
    map_75, map_small, map_medium, map_large}`` (torchmetrics ``MeanAveragePrecision`` with the
    faster-coco-eval backend, fed the annotations' ``area`` and ``iscrowd``, on the original image
    sizes). Labels stay model labels throughout; the evaluation script converts to COCO ids.

    Args:
        model: the detector.
        loss: the SSD loss (hard negative mining by default).
        warmup_steps: linear LR warm-up from ``warmup_factor`` over this many optimizer steps
            (torchvision's detection reference: 1000 iterations from 0.001).
        warmup_factor: starting LR factor of the warm-up.
        options: :class:`~mbv3_dense.training.task.TaskModule`'s (optimizer, scheduler, lr_batch_size,
            weight_decay_norm_bias, nonfinite_loss, channels_last, compile, freeze_backbone_epochs,
            backbone_lr_multiplier, freeze_bn_statistics, predict_backend; the command line lists them). The
            scheduler is stepped once per epoch (cosine in torchvision's recipe); a NaN/inf loss under
            ``nonfinite_loss: stop`` is reported with its box and class parts.
    """

    task = "detect"
    monitor = "val/map"
    end_to_end_export = True

    def __init__(self, *, model: SSDLite, loss: SSDLoss | None = None, warmup_steps: int = 1000,
                 warmup_factor: float = 0.001, **options: Any) -> None:
        super().__init__(model=model, **options)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "loss"])
        self.loss = loss or SSDLoss()
        if (self.loss.classification == "focal") != (model.score_activation == "sigmoid"):
            raise ValueError(f"loss classification {self.loss.classification!r} does not fit the model's "
                             f"score_activation {model.score_activation!r} (focal needs 'sigmoid', "
                             "hard_negative_mining needs 'softmax')")
        self.warmup_steps, self.warmup_factor = warmup_steps, warmup_factor
        # Image-weighted means that torchmetrics syncs: exact under DDP with uneven shards (a logged
        # sync_dist mean would average the ranks' means).
        self.val_losses = nn.ModuleDict({k: MeanMetric() for k in ("loss", "box_loss", "cls_loss")})
        self.val_map = GatheredMeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")

    # ------------------------------------------------------------------ hooks used by callbacks
    def example_input(self, height: int, width: int) -> Tensor:
        """A ``[1, 3, H, W]`` [0, 1] image (what :meth:`inference_step` takes)."""
        return torch.rand(1, 3, height, width, device=self.device)

    def inference_step(self, x: Tensor) -> list[dict[str, Tensor]]:
        """One inference end to end: resize + normalise, network, decoding and NMS."""
        return self.model.predict(list(x))

    def batch_to_input(self, batch: Batch) -> Batch:
        """Training batches: uint8 images -> the network's normalised input. Validation batches (a list of
        images of their own sizes): uint8 -> float in [0, 1], which :meth:`SSDLite.preprocess` normalises and
        resizes (in torchvision's order)."""
        images, targets = batch
        if isinstance(images, Tensor):
            return self.images_to_input(images), targets
        return [img.float().div(255) if not img.is_floating_point() else img for img in images], targets

    def precise_bn_forward(self, batch: Batch) -> None:
        images, _ = batch
        self.model(images)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        num_classes = getattr(dm, "num_classes", None)
        if num_classes is not None and num_classes != self.model.num_classes:
            raise ValueError(f"data num_classes={num_classes} but the model has {self.model.num_classes} classes; "
                             "set both to the same value (91: label = COCO id, 81: contiguous)")

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Batch, batch_idx: int) -> Tensor | None:
        images, targets = batch
        outputs = self.model(images)
        anchors = self.model.default_boxes(*images.shape[-2:], device=images.device)
        losses = self.loss(outputs, anchors, targets)
        parts = {k: losses[k] for k in ("box_loss", "cls_loss")}
        loss = check_loss(self, losses["loss"], parts, self.nonfinite_loss)
        if loss is not losses["loss"]:
            return loss  # skipped (None; a zero loss under DDP)
        self.log_dict({f"train/{k}": losses[k] for k in ("box_loss", "cls_loss")}, batch_size=len(targets))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        sizes = [(int(t["orig_size"][0]), int(t["orig_size"][1])) for t in targets]
        outputs = self.model(self.model.preprocess(images))
        detections = self.model.postprocess(outputs, sizes)
        in_h, in_w = self.model.image_size
        train_targets = []
        for t, (h, w) in zip(targets, sizes, strict=True):
            keep = ~t["iscrowd"]
            scale = torch.tensor([in_w / w, in_h / h, in_w / w, in_h / h], device=t["boxes"].device)
            train_targets.append({"boxes": t["boxes"][keep] * scale, "labels": t["labels"][keep]})
        anchors = self.model.default_boxes(device=self.device)
        losses = self.loss(outputs, anchors, train_targets)
        for key, mean in self.val_losses.items():
            mean.update(losses[key], weight=len(targets))
        self.log_dict({f"val/{k}": mean for k, mean in self.val_losses.items()}, batch_size=len(targets))
        self.val_map.update(detections, [
            {"boxes": t["boxes"], "labels": t["labels"], "iscrowd": t["iscrowd"].long(), "area": t["area"]}
            for t in targets])

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()  # every rank: torchmetrics gathers the states
        self.val_map.reset()
        self.log_dict({f"val/{k}": result[k].float() for k in MAP_KEYS if k != "map_50"}, sync_dist=False)
        self.log("val/map_50", result["map_50"].float(), prog_bar=True, sync_dist=False)

    def predict_step(self, batch: PredictBatch, batch_idx: int) -> list[dict[str, Tensor]]:
        """The batch's images (uint8, original sizes) through :func:`mbv3_dense.deploy.backend.detect`, as
        ``scripts/predict.py`` runs them: per image XYXY boxes in its own pixels, scores and model labels, on the
        CPU. The network runs on ``predict_backend`` (exported ones at ``image_size``, the size every image is
        resized to; on the CPU, as their outputs are); preprocess and postprocess are the model's own."""
        detections = detect(self.model, lambda x: self.predict_network(x)(x),
                            [img.float().div(255) for img in batch.images])
        return [{k: v.cpu() for k, v in det.items()} for det in detections]

    def draw_predictions(self, images: list[Tensor], threshold: float = 0.3) -> list[Image.Image]:
        """Validation images (uint8 ``[3, H, W]``, own sizes) with their detections above ``threshold`` drawn
        and named (:class:`~mbv3_dense.training.callbacks.ValidationPictures`)."""
        names = (self.class_info or {}).get("names") or [str(i) for i in range(self.model.num_classes)]
        detections = self.model.predict([image.to(self.device).float().div(255) for image in images])
        return [draw_detections(image, [{"box_xyxy": box, "score": score, "class": names[label]} for box, score, label
                                        in zip(det["boxes"].tolist(), det["scores"].tolist(), det["labels"].tolist(),
                                               strict=True)], threshold)
                for image, det in zip(images, detections, strict=True)]

    def prediction_writer(self, **options) -> DetectionWriter:
        """The writer ``lightning predict`` adds when the config names none."""
        return DetectionWriter(**options)

    # ------------------------------------------------------------------ optimisation
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Linear warm-up: the LR is scaled for the step only, so epoch schedulers are undisturbed."""
        step = self.trainer.global_step
        if step >= self.warmup_steps:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        alpha = step / max(1, self.warmup_steps)
        factor = self.warmup_factor * (1 - alpha) + alpha
        lrs = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] *= factor
        try:
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        finally:
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr

