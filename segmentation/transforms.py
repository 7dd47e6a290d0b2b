"""Albumentations pipelines for Cityscapes (the paper's protocol: random scale 0.5-2.0, 769x769 crops).

Both pipelines take ``image`` (``[H, W, 3]`` uint8 RGB) and ``mask`` (``[H, W]`` uint8 trainIds,
255 = ignore) and return ``image`` as a float ``[3, H, W]`` tensor normalised with ImageNet
mean/std and ``mask`` as an ``[H, W]`` tensor. Crops that reach past the image are padded with
0 in the image and 255 (ignore) in the mask: trainId 0 is road, so padding with 0 would teach road.
"""

from __future__ import annotations

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from segmentation.labels import IGNORE_INDEX


def train_transform(*, crop_size: tuple[int, int] = (769, 769), scale_range: tuple[float, float] = (0.5, 2.0),
                    hflip: bool = True) -> A.Compose:
    """Random scale in ``scale_range``, pad to and random crop of ``crop_size`` (h, w), horizontal flip."""
    crop_h, crop_w = crop_size
    low, high = scale_range
    return A.Compose([
        # RandomScale's limits are relative to 1: (low - 1, high - 1) draws factors in [low, high].
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_h, min_width=crop_w, position="random", border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=crop_h, width=crop_w),
        A.HorizontalFlip(p=0.5 if hflip else 0.0),
        A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0),
        ToTensorV2(),
    ])


def eval_transform() -> A.Compose:
    """Full resolution: normalisation only (the official protocol evaluates at 1024x2048)."""
    return A.Compose([A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, max_pixel_value=255.0), ToTensorV2()])
