"""torchvision's ImageNet transforms for MobileNetV3 training and evaluation (uint8 ``[3, H, W]`` in)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD


def train_transform(*, crop_size: int = 224, crop_scale: tuple[float, float] = (0.08, 1.0),
                    hflip: bool = True, auto_augment: bool = True, random_erase: float = 0.2) -> v2.Transform:
    """torchvision's ImageNet training recipe for MobileNetV3 on a uint8 ``[3, H, W]`` tensor.

    RandomResizedCrop -> horizontal flip -> AutoAugment (ImageNet policy) -> float in [0, 1] ->
    normalise (ImageNet mean/std) -> RandomErasing(p=random_erase).
    """
    steps: list[v2.Transform] = [v2.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase))
    return v2.Compose(steps)


def eval_transform(*, resize_size: int = 256, crop_size: int = 224) -> v2.Transform:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``, normalise."""
    return v2.Compose([
        v2.Resize(resize_size, antialias=True),
        v2.CenterCrop(crop_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
