"""SSDLite's held-out data for ``scripts/export.py --gate``: COCO mAP on a COCO tree (:mod:`mbv3_dense.deploy.gate`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mbv3_dense.deploy.backend import detect
from mbv3_dense.deploy.gate import GateData, GateDataError
from mbv3_dense.training.progress import progress


def is_coco(root: Path) -> bool:
    """A COCO tree: ``root/annotations/instances_*.json``."""
    return any((root / "annotations").glob("instances_*.json"))


def coco_gate(root: Path, model: nn.Module, size: tuple[int, int]) -> GateData:
    """COCO mAP@[.5:.95] and mAP@0.5 (%, torchmetrics with faster_coco_eval, crowd flags and areas from the
    annotations) on ``root/annotations/instances_val*.json`` (else the only ``instances_*.json``) and its images
    folder (``val2017/`` for ``instances_val2017.json``)."""
    from torchmetrics.detection import MeanAveragePrecision

    from detection.data import eval_dataset

    files = sorted((root / "annotations").glob("instances_val*.json")) or sorted((root / "annotations").glob(
        "instances_*.json"))
    if len(files) != 1:
        raise GateDataError(f"{root}/annotations: expected one instances_val*.json, found "
                            f"{[f.name for f in files]}")
    images = root / files[0].stem.removeprefix("instances_")
    dataset, _ = eval_dataset(images, files[0], model.num_classes)
    if not len(dataset):
        raise GateDataError(f"{files[0]}: lists no images")

    def evaluate(network, description: str) -> dict[str, float]:
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
        metric.warn_on_many_detections = False  # the 100 best per image are COCO's protocol (detection/metric.py)
        with torch.inference_mode():
            for index in progress(range(len(dataset)), desc=description, unit="img"):
                image, target = dataset[index]
                found = detect(model, network, [image.float() / 255])[0]
                metric.update([found], [{"boxes": target["boxes"], "labels": target["labels"],
                                         "iscrowd": target["iscrowd"].long(), "area": target["area"]}])
        result = metric.compute()
        return {"map": 100 * float(result["map"]), "map_50": 100 * float(result["map_50"])}

    return GateData("detect", "COCO", root, "map", len(dataset), evaluate)
