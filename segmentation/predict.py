"""What ``lightning predict`` writes for LR-ASPP: Cityscapes labelId PNGs and colour overlays.

Layout under the output folder::

    labelIds/<name>.png    8-bit labelIds at the image's full size (what cityscapesscripts reads;
                           predicted trainIds converted by segmentation.labels.train_ids_to_label_ids)
    overlays/<name>.jpg    the image blended half and half with the Cityscapes palette (unless pictures=False)
    skipped.jsonl, summary.json

The network sees each image at its own size, normalised with ImageNet mean/std
(:func:`preprocess`), one image at a time (sizes differ).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.predict import ImageFile, PredictionWriter
from segmentation.labels import NUM_CLASSES, colorize, train_ids_to_label_ids

OVERLAY_ALPHA = 0.5


def preprocess(image: Tensor) -> Tensor:
    """uint8 ``[3, H, W]`` RGB -> float ``[1, 3, H, W]`` normalised with ImageNet mean/std (the
    model's input; the same numbers as the evaluation transform of :mod:`segmentation.transforms`)."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return ((image.float() / 255.0 - mean) / std)[None]


class SegmentationWriter(PredictionWriter):
    """Writes ``[H, W]`` uint8 trainId maps (layout in the module docstring)."""

    task = "segment"
    outputs = ("labelIds", "overlays")

    def _open(self) -> None:
        (self.output_dir / "labelIds").mkdir(parents=True, exist_ok=True)

    def _write_image(self, file: ImageFile, image: Tensor, output: Tensor) -> None:
        train_ids = output.cpu().numpy().astype(np.uint8)
        if train_ids.max(initial=0) >= NUM_CLASSES:
            raise ValueError(f"{file.path}: predicted trainIds must lie in 0..{NUM_CLASSES - 1}")
        path = self.output_dir / "labelIds" / f"{file.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train_ids_to_label_ids(train_ids)).save(path)
        if self.pictures:
            rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
            blend = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colorize(train_ids).astype(np.float32)
            Image.fromarray(blend.round().astype(np.uint8)).save(self._picture_path(file, "overlays"), quality=90)

    def _close(self) -> None:
        pass


__all__ = ["SegmentationWriter", "preprocess"]
