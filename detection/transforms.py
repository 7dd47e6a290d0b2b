"""Training augmentation for SSD with albumentations, plus the two SSD transforms it lacks.

:class:`RandomIoUCrop` is SSD's "sample a patch so that the minimum IoU with the objects is 0.1,
0.3, 0.5, 0.7 or 0.9" (Liu et al., 2016, section 2.2, "Data augmentation"), with torchvision's
``RandomIoUCrop`` semantics: scale 0.3-1, aspect ratio 0.5-2, up to 40 trials, boxes whose centre
falls outside the patch are dropped. :class:`ZoomOut` is SSD's "expansion" (section 3.6): the image
is placed at a random position on a canvas up to 4x larger, filled with the mean colour.

Both are albumentations ``DualTransform`` s, so they compose with the library's flips, colour
jitter and resizing, and the boxes (``pascal_voc``: XYXY pixels) are clipped and filtered by
``A.BboxParams(clip=True, filter_invalid_bboxes=True)``.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import numpy as np
from albumentations.augmentations.crops import functional as fcrops
from albumentations.augmentations.crops.transforms import BaseCrop

# torchvision RandomIoUCrop's minimum-IoU options; 1.0 means "keep the whole image".
IOU_OPTIONS: tuple[float, ...] = (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


class RandomIoUCrop(BaseCrop):
    """SSD's random crop with a minimum IoU constraint.

    Args:
        min_scale / max_scale: crop side relative to the image side.
        min_aspect_ratio / max_aspect_ratio: crop width / height.
        options: minimum IoU choices (1.0 = no crop).
        trials: crops tried per chosen option.
        attempts: options tried before giving up and keeping the whole image (torchvision loops forever).
        p: probability of applying.
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, options: tuple[float, ...] = IOU_OPTIONS, trials: int = 40,
                 attempts: int = 50, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.min_scale, self.max_scale = min_scale, max_scale
        self.min_aspect_ratio, self.max_aspect_ratio = min_aspect_ratio, max_aspect_ratio
        self.options, self.trials, self.attempts = tuple(options), trials, attempts

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        full = (0, 0, w, h)
        raw = data.get("bboxes")
        if raw is None or len(raw) == 0:
            return {"crop_coords": full}
        boxes = np.asarray(raw, dtype=np.float64)[:, :4] * [w, h, w, h]  # normalised -> pixels
        rng = self.py_random
        for _ in range(self.attempts):
            min_iou = rng.choice(self.options)
            if min_iou >= 1.0:
                return {"crop_coords": full}
            for _ in range(self.trials):
                scale_w = self.min_scale + (self.max_scale - self.min_scale) * rng.random()
                scale_h = self.min_scale + (self.max_scale - self.min_scale) * rng.random()
                new_w, new_h = int(w * scale_w), int(h * scale_h)
                if new_h == 0 or not self.min_aspect_ratio <= new_w / new_h <= self.max_aspect_ratio:
                    continue
                left, top = int((w - new_w) * rng.random()), int((h - new_h) * rng.random())
                right, bottom = left + new_w, top + new_h
                if left == right or top == bottom:
                    continue
                cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
                if not inside.any():
                    continue
                b = boxes[inside]
                iw = np.clip(np.minimum(b[:, 2], right) - np.maximum(b[:, 0], left), 0, None)
                ih = np.clip(np.minimum(b[:, 3], bottom) - np.maximum(b[:, 1], top), 0, None)
                inter = iw * ih
                union = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) + new_w * new_h - inter
                if (inter / union).max() < min_iou:
                    continue
                return {"crop_coords": (left, top, right, bottom)}
        return {"crop_coords": full}

    def apply_to_bboxes(self, bboxes: np.ndarray, crop_coords: tuple[int, int, int, int],
                        **params: Any) -> np.ndarray:
        """Drop the boxes whose centre is outside the crop (SSD's rule), then crop the rest."""
        if not bboxes.size:
            return bboxes
        h, w = params["shape"][:2]
        left, top, right, bottom = crop_coords
        cx = (bboxes[:, 0] + bboxes[:, 2]) / 2 * w
        cy = (bboxes[:, 1] + bboxes[:, 3]) / 2 * h
        inside = (left < cx) & (cx < right) & (top < cy) & (cy < bottom)
        if (left, top, right, bottom) == (0, 0, w, h):
            inside[:] = True
        return fcrops.crop_bboxes_by_coords(bboxes[inside], crop_coords, (h, w))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("min_scale", "max_scale", "min_aspect_ratio", "max_aspect_ratio", "options", "trials", "attempts")


class ZoomOut(A.DualTransform):
    """Place the image on a larger canvas (side ratio uniform in ``side_range``) filled with ``fill``.

    Args:
        side_range: canvas side / image side.
        fill: RGB fill (the ImageNet mean, as torchvision's SSD recipe).
        p: probability of applying.
    """

    def __init__(self, side_range: tuple[float, float] = (1.0, 4.0),
                 fill: tuple[int, int, int] = (124, 116, 104), p: float = 0.5) -> None:
        super().__init__(p=p)
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"side_range must satisfy 1 <= low <= high, got {side_range}")
        self.side_range = tuple(side_range)
        self.fill = tuple(fill)

    @property
    def targets_as_params(self) -> list[str]:
        return ["image"]

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        h, w = params["shape"][:2]
        r = self.py_random.uniform(*self.side_range)
        canvas_w, canvas_h = int(w * r), int(h * r)
        left = int((canvas_w - w) * self.py_random.random())
        top = int((canvas_h - h) * self.py_random.random())
        return {"left": left, "top": top, "canvas": (canvas_h, canvas_w)}

    def apply(self, img: np.ndarray, left: int, top: int, canvas: tuple[int, int], **params: Any) -> np.ndarray:
        out = np.empty((canvas[0], canvas[1], img.shape[2]), dtype=img.dtype)
        out[...] = np.asarray(self.fill, dtype=img.dtype)[: img.shape[2]]
        out[top:top + img.shape[0], left:left + img.shape[1]] = img
        return out

    def apply_to_bboxes(self, bboxes: np.ndarray, left: int, top: int, canvas: tuple[int, int],
                        **params: Any) -> np.ndarray:
        """Boxes are normalised by albumentations: rescale them to the canvas."""
        if not bboxes.size:
            return bboxes
        h, w = params["shape"][:2]
        out = bboxes.copy()
        out[:, [0, 2]] = (bboxes[:, [0, 2]] * w + left) / canvas[1]
        out[:, [1, 3]] = (bboxes[:, [1, 3]] * h + top) / canvas[0]
        return out

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("side_range", "fill")


def train_transform(*, image_size: int = 320, iou_crop: bool = True, zoom_out_p: float = 0.0,
                    photometric_p: float = 0.0, hflip_p: float = 0.5, min_box_size: float = 1.0) -> A.Compose:
    """The SSD training pipeline: photometric distortion, zoom-out, IoU crop, flip, resize.

    Input: ``image`` HWC uint8 RGB, ``bboxes`` XYXY pixels, ``labels``. Output the same, the image
    ``image_size`` square; boxes smaller than ``min_box_size`` pixels on a side after the transform
    are dropped with their labels. torchvision's SSDLite recipe is IoU crop + flip; its SSD300 recipe
    adds photometric distortion (p 0.5) and zoom-out (p 0.5).
    """
    steps: list[A.BasicTransform] = []
    if photometric_p > 0:
        # torchvision RandomPhotometricDistort's ranges.
        steps.append(A.ColorJitter(brightness=(0.875, 1.125), contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                                   hue=(-0.05, 0.05), p=photometric_p))
    if zoom_out_p > 0:
        steps.append(ZoomOut(p=zoom_out_p))
    if iou_crop:
        steps.append(RandomIoUCrop())
    if hflip_p > 0:
        steps.append(A.HorizontalFlip(p=hflip_p))
    steps.append(A.Resize(image_size, image_size))
    return A.Compose(steps, bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"], clip=True,
                                                     filter_invalid_bboxes=True, min_width=min_box_size,
                                                     min_height=min_box_size))
