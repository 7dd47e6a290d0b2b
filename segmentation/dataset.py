"""What the segmentation datasets share: pair ``i``'s image and mask, checked to be of one size, through the
split's transform with draws that are a function of the sample key (:mod:`mbv3_dense.data.sampling`)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mbv3_dense.data.sampling import SampleKey, as_sample_key, sample_randomness
from segmentation.transforms import Transform


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
