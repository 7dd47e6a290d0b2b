"""LR-ASPP's held-out data for ``scripts/export.py --gate``: mIoU on a Cityscapes tree's ``val`` split
(:mod:`mbv3_dense.deploy.gate`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mbv3_dense.data.image_io import read_image_rgb
from mbv3_dense.deploy.gate import GateData
from mbv3_dense.training.progress import progress


def is_cityscapes(root: Path) -> bool:
    """A Cityscapes tree: ``root/leftImg8bit/`` and ``root/gtFine/``."""
    return (root / "leftImg8bit").is_dir() and (root / "gtFine").is_dir()


def cityscapes_gate(root: Path, model: nn.Module, size: tuple[int, int]) -> GateData:
    """mIoU (%, torchmetrics, 19 trainIds, 255 ignored) on the ``val`` split of a Cityscapes tree, each image at
    its own size."""
    from PIL import Image

    from segmentation.data import list_split, read_train_ids
    from segmentation.module import miou_metric

    pairs = list_split(root, "val")
    sizes = []
    for image_path, _ in pairs:
        with Image.open(image_path) as img:
            sizes.append((img.height, img.width))

    def evaluate(network, description: str) -> dict[str, float]:
        metric = miou_metric()
        with torch.inference_mode():
            for image_path, label_path in progress(pairs, desc=description, unit="img"):
                x = model.normalize(torch.from_numpy(read_image_rgb(image_path)).permute(2, 0, 1)[None].float() / 255)
                target = torch.as_tensor(read_train_ids(label_path), dtype=torch.int64)
                metric.update(torch.as_tensor(network(x)).argmax(1), target[None])
        return {"miou": 100 * float(metric.compute())}

    return GateData("segment", "Cityscapes", root, "miou", len(pairs), evaluate, tuple(sorted(set(sizes))))
