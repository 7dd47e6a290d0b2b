"""What the two segmentation data sources (Cityscapes, image and mask folders) share: the dataset's item (pair
``i``'s image and mask, checked to be of one size, through the split's transform with draws that are a function of
the sample key, :mod:`mbv3_dense.data.sampling`) and the data module's transforms."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mbv3_dense.data.module import TaskDataModule
from mbv3_dense.data.sampling import SampleKey, as_sample_key, sample_randomness
from segmentation.transforms import Transform, eval_transform, train_transform


class PairDataset(Dataset):
    """Base of :class:`~segmentation.data.CityscapesSegmentation` and
    :class:`~segmentation.folder.MaskFolderSegmentation`: ``dataset[i]`` is ``(image, mask)`` after
    ``transform``, a uint8 ``[3, H, W]`` RGB tensor and a ``[H, W]`` tensor of class indices (:meth:`target`).

    Subclasses set ``pairs`` and ``transform`` and read a pair (:meth:`read`).
    """

    #: What a pair whose image and mask differ in size raises, and what it calls the mask.
    size_error: ClassVar[type[Exception]] = ValueError
    mask_word: ClassVar[str] = "mask"
    pairs: list
    transform: Transform

    def __len__(self) -> int:
        return len(self.pairs)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str | Path, str | Path]:
        """Pair ``index``: the decoded image, its mask, and what messages call the two."""
        raise NotImplementedError

    def target(self, mask: np.ndarray, mask_source: str | Path) -> np.ndarray:
        """The transformed mask as the batch carries it (the class indices as they are)."""
        return mask

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, Tensor]:
        """``key``: an index, or the :class:`~mbv3_dense.data.sampling.SampleKey` a training sampler yields;
        the augmentation's draws are a function of it, never of a worker's or the OS's state."""
        image, mask, image_source, mask_source = self.read(as_sample_key(key).index)
        if image.shape[:2] != mask.shape:
            raise self.size_error(f"{image_source} is {image.shape[1]}x{image.shape[0]} (WxH) but its {self.mask_word} "
                                  f"{mask_source} is {mask.shape[1]}x{mask.shape[0]}")
        with sample_randomness(key) as generators:
            image, mask = self.transform(image, mask, generators.python)
        return image, torch.from_numpy(self.target(mask, mask_source))  # uint8: long on the device


class SegmentationDataModule(TaskDataModule):
    """Base of :class:`~segmentation.data.CityscapesDataModule` and :class:`~segmentation.folder.MaskFolderDataModule`:
    training crops, validation on full frames (:meth:`split_transform`).

    Args:
        crop_size: training crop ``(height, width)``.
        scale_range: random scale factors for training.
        hflip: random horizontal flips in training.
        batch_size, val_batch_size, num_workers, predict_images, predict_max_pixels, streaming: as
            :class:`~mbv3_dense.data.module.TaskDataModule`.
    """

    def __init__(self, *, batch_size: int, val_batch_size: int, num_workers: int, crop_size: tuple[int, int],
                 scale_range: tuple[float, float], hflip: bool, predict_images: str | None, predict_max_pixels: int,
                 streaming: str | None) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         predict_images=predict_images, predict_max_pixels=predict_max_pixels, streaming=streaming)
        self.crop_size = tuple(crop_size)
        self.scale_range = tuple(scale_range)
        self.hflip = hflip

    def split_transform(self, split: str, fill_mask: int = 0) -> Transform:
        """``"train"``: random scale, crop (the mask padded with ``fill_mask`` where the image is smaller) and flip,
        drawn from the sample key; otherwise the full frame as it is."""
        if split != "train":
            return eval_transform()
        return train_transform(crop_size=self.crop_size, scale_range=self.scale_range, hflip=self.hflip,
                               fill_mask=fill_mask)
