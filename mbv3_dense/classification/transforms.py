"""torchvision's ImageNet transforms for MobileNetV3 training and evaluation, uint8 ``[3, H, W]`` in and out.

Conversion to float and normalisation happen after the batch reaches the device
(:meth:`mbv3_dense.training.task.TaskModule.on_after_batch_transfer`, with the network's own ``normalize``):
a uint8 batch is a quarter of the bytes of a float one, and the loader workers do no float work.
"""

from __future__ import annotations

from torchvision.transforms import v2

from mbv3_dense.constants import IMAGENET_MEAN

# RandomErasing's fill: the ImageNet mean colour in uint8 (124, 116, 104). torchvision's recipe erases
# after normalising with value 0, which is this colour (to within rounding) once normalised.
ERASE_FILL: tuple[int, int, int] = tuple(round(255 * m) for m in IMAGENET_MEAN)


def train_transform(*, crop_size: int = 224, crop_scale: tuple[float, float] = (0.08, 1.0),
                    hflip: bool = True, auto_augment: bool = True, random_erase: float = 0.2) -> v2.Transform:
    """torchvision's ImageNet training recipe for MobileNetV3 on a uint8 ``[3, H, W]`` tensor.

    RandomResizedCrop -> horizontal flip -> AutoAugment (ImageNet policy) -> RandomErasing(p=random_erase,
    filled with :data:`ERASE_FILL`); the result stays uint8 (normalised on the device).
    """
    steps: list[v2.Transform] = [v2.RandomResizedCrop(crop_size, scale=crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment:
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    if random_erase > 0:
        steps.append(v2.RandomErasing(p=random_erase, value=list(ERASE_FILL)))
    return v2.Compose(steps)


def eval_transform(*, resize_size: int = 256, crop_size: int = 224) -> v2.Transform:
    """Resize the short side to ``resize_size``, centre-crop ``crop_size``; uint8 stays uint8."""
    return v2.Compose([v2.Resize(resize_size, antialias=True), v2.CenterCrop(crop_size)])
