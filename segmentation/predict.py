"""What ``lightning predict`` writes for LR-ASPP: label PNGs in the data's label values and colour overlays.

Layout under the output folder, for Cityscapes (the 19 trainIds; the default class info)::

    labelIds/<name>.png    8-bit labelIds at the image's full size (what cityscapesscripts reads;
                           predicted trainIds converted by segmentation.labels.train_ids_to_label_ids)
    overlays/<name>.jpg    the image blended half and half with the Cityscapes palette (unless pictures=False)
    skipped.jsonl, summary.json

and for any other class info (e.g. a mask folder's classes file, :mod:`segmentation.folder`)::

    labels/<name>.png      palette PNG at the image's full size: each pixel the class's ``label_ids`` value
                           (a mask folder's class index), the palette the class colours, so the file reads
                           back as an index mask and shows as a colour mask
    overlays/<name>.jpg    the image blended half and half with the class colours

Class colours come from the class info; classes without colours get
:func:`segmentation.mask_classes.distinct_palette` (Pascal VOC's colour map).

The network sees each image at its own size, normalised with its own ``normalize`` (ImageNet mean/std),
one image at a time (sizes differ).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from mbv3_dense.checkpoints.classes import check_class_info
from mbv3_dense.data.listing import ImageFile
from mbv3_dense.data.predict import PredictionWriter
from segmentation.labels import cityscapes_class_info, is_cityscapes_class_info
from segmentation.mask_classes import distinct_palette

OVERLAY_ALPHA = 0.5
CITYSCAPES_FOLDER = "labelIds"
LABELS_FOLDER = "labels"


def class_map(logits: object) -> Tensor:
    """The network's ``[1, C, H, W]`` logits -> the argmax class indices, uint8 ``[H, W]`` on the CPU
    (``lightning predict`` and ``scripts/predict.py``)."""
    return torch.as_tensor(logits).argmax(1)[0].to(torch.uint8).cpu()


def class_colors(info: Mapping[str, Any]) -> np.ndarray:
    """``[C, 3]`` uint8 colours of a class info's classes (its own, else a distinct palette)."""
    colors = info.get("colors")
    return np.asarray(colors, dtype=np.uint8) if colors is not None else distinct_palette(len(info["names"]))


def overlay(image: Tensor, classes: np.ndarray, colors: np.ndarray) -> Image.Image:
    """uint8 ``[3, H, W]`` blended half and half with ``colors[classes]`` (``classes``: ``[H, W]`` indices)."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    blend = (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colors[classes].astype(np.float32)
    return Image.fromarray(blend.round().astype(np.uint8))


class SegmentationWriter(PredictionWriter):
    """Writes ``[H, W]`` uint8 class-index maps (layout in the module docstring).

    Args:
        output_dir / overwrite / pictures: as :class:`~mbv3_dense.data.predict.PredictionWriter`.
        class_info: what the class indices mean (:mod:`mbv3_dense.checkpoints.classes`): ``names``; ``label_ids``,
            the value
            written per class (default the index); ``colors`` (default
            :func:`~segmentation.mask_classes.distinct_palette`). ``None``: under ``lightning predict`` the
            module's (the checkpoint's record, else the data's), else Cityscapes'.
    """

    task = "segment"
    outputs = (CITYSCAPES_FOLDER, LABELS_FOLDER, "overlays")

    def __init__(self, output_dir: str | Path | None = None, *, overwrite: bool = False, pictures: bool = True,
                 class_info: Mapping[str, Any] | None = None) -> None:
        super().__init__(output_dir, overwrite=overwrite, pictures=pictures, class_info=(
            check_class_info(class_info, "SegmentationWriter class_info") if class_info is not None else None))

    def _configure_classes(self) -> None:
        info = self.class_info if self.class_info is not None else cityscapes_class_info()
        num_classes = len(info["names"])
        self._num_classes = num_classes
        self._cityscapes = is_cityscapes_class_info(info)
        self._folder = CITYSCAPES_FOLDER if self._cityscapes else LABELS_FOLDER
        label_ids = info.get("label_ids", list(range(num_classes)))
        if min(label_ids) < 0 or max(label_ids) > 255:
            raise ValueError(f"class info label_ids must lie in 0..255 for 8-bit label PNGs, got {label_ids}")
        self._label_lookup = np.asarray(label_ids, dtype=np.uint8)
        self._colors = class_colors(info)
        # The label PNG's palette: entry label_ids[c] is class c's colour (other entries black).
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[self._label_lookup] = self._colors
        self._png_palette = palette.ravel().tolist()

    def _open(self) -> None:
        self._configure_classes()  # again once lightning predict knows the classes (on_predict_start)

    def _write_image(self, file: ImageFile, image: Tensor, output: Tensor) -> None:
        classes = output.cpu().numpy().astype(np.uint8)
        if classes.max(initial=0) >= self._num_classes:
            raise ValueError(f"{file.path}: predicted class {int(classes.max())} but the class info names "
                             f"{self._num_classes} classes (0..{self._num_classes - 1}); pass the class info of "
                             "the data the network was trained on")
        path = self.output_dir / self._folder / f"{file.name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        labels = Image.fromarray(self._label_lookup[classes])
        if not self._cityscapes:  # Cityscapes' labelIds stay plain 8-bit greyscale, as the evaluator's ground truth
            labels.putpalette(self._png_palette)  # L -> P, the values kept as palette indices
        labels.save(path)
        if self.pictures:
            overlay(image, classes, self._colors).save(self._picture_path(file, "overlays"), quality=90)

    def _close(self) -> None:
        pass


__all__ = ["SegmentationWriter"]
