"""Cityscapes pipelines (the paper's protocol: random scale 0.5-2.0, 769x769 crops, flips), uint8 out.

A pipeline is called as ``transform(image, mask, rng)``: ``image`` ``[H, W, 3]`` uint8 RGB, ``mask``
``[H, W]`` uint8 ids (resampled nearest-neighbour only, so labelIds and trainIds alike), ``rng`` the
sample's ``random.Random`` (:func:`mbv3_dense.data.sampling.sample_randomness`). It returns the image as a
uint8 ``[3, h, w]`` tensor (normalised later, on the device) and the mask as a uint8 ``[h, w]`` array.

:class:`ScaleCropFlip` crops before it resizes: it draws a scale, a padding position and a crop as
"resize the whole frame, pad to the crop size, crop, flip" would (albumentations' RandomScale ->
PadIfNeeded(position="random") -> RandomCrop -> HorizontalFlip, draw for draw), then computes which
source pixels the crop covers and resamples only those: at scale 2 a 2048x1024 frame is never blown
up to 4096x2048 to keep 769x769 of it. The image is sampled bilinearly and the mask by nearest
neighbour at exactly the points ``cv2.resize`` samples, so the output is resize-then-crop's to within
OpenCV's fixed-point rounding (tests/test_data_pipeline.py). Where the crop reaches past the image it
is padded with 0 in the image and ``fill_mask`` in the mask (255 = ignore for trainIds: trainId 0 is
road, so padding with 0 would teach road).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import NamedTuple

import cv2
import numpy as np
import torch
from torch import Tensor

from segmentation.labels import IGNORE_INDEX

# A pipeline: (image [H, W, 3] uint8, mask [H, W] uint8 ids, the sample's Random) -> (uint8 [3, h, w], mask ids).
Transform = Callable[[np.ndarray, np.ndarray, random.Random], tuple[Tensor, np.ndarray]]


class CropDraw(NamedTuple):
    """One draw of :class:`ScaleCropFlip`, in the pixels of the scaled frame.

    Attributes:
        scale: the scale factor; the scaled frame is ``(int(H * scale), int(W * scale))``.
        top, left: the crop's top-left corner in the scaled frame (negative where padding comes first).
        flip: mirror the crop horizontally.
    """

    scale: float
    top: int
    left: int
    flip: bool


def to_chw_tensor(image: np.ndarray) -> Tensor:
    """``[H, W, 3]`` uint8 array -> contiguous ``[3, H, W]`` uint8 tensor."""
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


class ScaleCropFlip:
    """Random scale in ``scale_range``, a ``crop_size`` crop (padded where the scaled frame is smaller), flip.

    Args:
        crop_size: ``(height, width)`` of the output.
        scale_range: scale factors, drawn uniformly.
        hflip: mirror half of the crops.
        fill_mask: the mask's value where the crop leaves the frame.
    """

    def __init__(self, *, crop_size: tuple[int, int] = (769, 769), scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: bool = True, fill_mask: int = IGNORE_INDEX) -> None:
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.hflip = hflip
        self.fill_mask = fill_mask

    def draw(self, height: int, width: int, rng: random.Random) -> CropDraw:
        """The scale, crop position and flip of one sample of a ``height x width`` frame.

        The draws are albumentations' (2.0) for RandomScale, PadIfNeeded(position="random"),
        RandomCrop and HorizontalFlip(p=0.5), in that order, so that the distribution of scales,
        padding positions and crop positions is the one of the resize-first pipeline.
        """
        low, high = self.scale_range
        scale = rng.uniform(low - 1.0, high - 1.0) + 1.0  # RandomScale's limits are relative to 1
        crop_h, crop_w = self.crop_size
        rows, cols = int(height * scale), int(width * scale)
        pad_top = rng.randint(0, max(0, crop_h - rows))
        pad_left = rng.randint(0, max(0, crop_w - cols))
        # RandomCrop on the padded frame: start = int((side - crop + 1) * u), u uniform in [0, 1).
        y = int((max(rows, crop_h) - crop_h + 1) * rng.random())
        x = int((max(cols, crop_w) - crop_w + 1) * rng.random())
        flip = self.hflip and rng.random() < 0.5
        return CropDraw(scale, y - pad_top, x - pad_left, flip)

    def apply(self, image: np.ndarray, mask: np.ndarray, draw: CropDraw) -> tuple[np.ndarray, np.ndarray]:
        """The crop of ``draw``: ``([h, w, 3] uint8, [h, w] mask)``, sampled from the source pixels it covers."""
        height, width = mask.shape
        crop_h, crop_w = self.crop_size
        rows, cols = int(height * draw.scale), int(width * draw.scale)
        out_image = np.zeros((crop_h, crop_w, 3), dtype=np.uint8)
        out_mask = np.full((crop_h, crop_w), self.fill_mask, dtype=mask.dtype)
        # The part of the crop inside the scaled frame, in crop pixels.
        y0, y1 = max(0, -draw.top), min(crop_h, rows - draw.top)
        x0, x1 = max(0, -draw.left), min(crop_w, cols - draw.left)
        if y1 > y0 and x1 > x0:
            # cv2.resize's sampling: scaled pixel i reads source coordinate (i + 0.5) * side / scaled_side - 0.5
            # (bilinear, edges replicated) and floor(i * side / scaled_side) (nearest).
            ky, kx = height / rows, width / cols
            top, left = draw.top + y0, draw.left + x0
            matrix = np.array([[kx, 0.0, (left + 0.5) * kx - 0.5], [0.0, ky, (top + 0.5) * ky - 0.5]])
            out_image[y0:y1, x0:x1] = cv2.warpAffine(image, matrix, (x1 - x0, y1 - y0),
                                                     flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                                     borderMode=cv2.BORDER_REPLICATE)
            src_y = np.minimum(np.floor(np.arange(top, top + y1 - y0) * (1.0 / (rows / height))), height - 1)
            src_x = np.minimum(np.floor(np.arange(left, left + x1 - x0) * (1.0 / (cols / width))), width - 1)
            out_mask[y0:y1, x0:x1] = mask[src_y.astype(np.intp)[:, None], src_x.astype(np.intp)[None, :]]
        if draw.flip:
            out_image, out_mask = cv2.flip(out_image, 1), np.ascontiguousarray(out_mask[:, ::-1])
        return out_image, out_mask

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: random.Random) -> tuple[Tensor, np.ndarray]:
        draw = self.draw(*mask.shape, rng)
        out_image, out_mask = self.apply(image, mask, draw)
        return to_chw_tensor(out_image), out_mask


class FullFrame:
    """Evaluation: the frame as it is (the official protocol evaluates at 1024x2048), uint8."""

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: random.Random) -> tuple[Tensor, np.ndarray]:
        return to_chw_tensor(image), mask


def train_transform(*, crop_size: tuple[int, int] = (769, 769), scale_range: tuple[float, float] = (0.5, 2.0),
                    hflip: bool = True, fill_mask: int = IGNORE_INDEX) -> ScaleCropFlip:
    """Random scale in ``scale_range``, pad to and random crop of ``crop_size`` (h, w), horizontal flip."""
    return ScaleCropFlip(crop_size=tuple(crop_size), scale_range=tuple(scale_range), hflip=hflip, fill_mask=fill_mask)


def eval_transform() -> FullFrame:
    """Full resolution, no change (normalisation happens on the device)."""
    return FullFrame()
