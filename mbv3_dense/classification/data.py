"""ImageNet-style classification data: an ImageFolder tree, torchvision's training transforms.

Layout: ``root/train/<class>/**/<image>`` and ``root/val/<class>/**/<image>`` (ImageNet's
``ILSVRC2012_img_val`` sorted into class folders, as torchvision's reference scripts expect).
Class indices are the sorted training folder names. Files are recognised by extension (case
insensitive, :data:`~mbv3_dense.data.listing.IMAGE_EXTENSIONS`); anything else is counted and ignored. Images are
decoded by :func:`mbv3_dense.data.image_io.read_image_rgb` (EXIF orientation applied; grayscale,
palette, RGBA, CMYK, 16-bit converted to RGB).

Bad files: ``on_bad_image="error"`` (default) raises :class:`~mbv3_dense.data.image_io.ImageReadError`
naming the file; ``"skip"`` drops the sample from its batch with a warning naming the file, and
each batch carries the number it dropped (``ClassificationBatch.skipped``), which the
:class:`~mbv3_dense.classification.module.ClassificationModule` sums into ``data/skipped_images``.

Streaming (``streaming``: ``scripts/prepare_streaming.py --task classify``'s chunks, :mod:`mbv3_dense.data.streaming`):
item ``i`` of a split holds the bytes of the file sample ``i`` reads, its label and its path; the class names
come from the chunks' record.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mbv3_dense.checkpoints.classes import ClassInfo, check_class_info
from mbv3_dense.classification.transforms import eval_transform, train_transform
from mbv3_dense.data.image_io import ImageReadError, decode_image_rgb, read_image_rgb
from mbv3_dense.data.listing import IMAGE_EXTENSIONS, is_image_name
from mbv3_dense.data.module import TaskDataModule
from mbv3_dense.data.predict import DEFAULT_MAX_PIXELS
from mbv3_dense.data.sampling import SampleKey, as_sample_key, sample_randomness
from mbv3_dense.data.streaming.read import ChunkReader
from mbv3_dense.data.streaming.record import ChunkRecord, ChunkSource

log = logging.getLogger(__name__)

BadImagePolicy = Literal["error", "skip"]


class ClassificationBatch(NamedTuple):
    """A collated batch. ``images``: uint8 ``[N, 3, H, W]`` RGB as loaded (the module turns them into the
    network's normalised float input on the device,
    :meth:`~mbv3_dense.training.task.TaskModule.on_after_batch_transfer`);
    ``labels``: int64 ``[N]`` class indices; ``skipped``: int64 scalar, samples dropped as unreadable."""

    images: Tensor
    labels: Tensor
    skipped: Tensor


class FolderScan(NamedTuple):
    samples: list[tuple[Path, int]]
    ignored: int  # files that are not images by their extension
    empty_classes: list[str]


def find_classes(split_dir: Path) -> list[str]:
    """Sorted names of the class folders in ``split_dir`` (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such folder (expected <root>/train and <root>/val)")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{split_dir}: no class folders found (expected {split_dir}/<class>/<image>)")
    return classes


def scan_image_folder(split_dir: Path, class_to_idx: dict[str, int]) -> FolderScan:
    """List ``(path, label)`` for the image files under ``split_dir/<class>/`` (recursively, sorted)."""
    samples: list[tuple[Path, int]] = []
    ignored = 0
    empty: list[str] = []
    for name, label in sorted(class_to_idx.items(), key=lambda item: item[1]):
        folder = split_dir / name
        found = 0
        if folder.is_dir():
            for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
                dirnames.sort()
                for filename in sorted(filenames):
                    if is_image_name(filename):
                        samples.append((Path(dirpath) / filename, label))
                        found += 1
                    else:
                        ignored += 1
        if found == 0:
            empty.append(name)
    return FolderScan(samples, ignored, empty)


class ImageFolderDataset(Dataset):
    """``(image [3, H, W] uint8, label)`` pairs of an ImageFolder split; ``None`` for a skipped file.

    Args:
        samples: ``(path, label)`` pairs.
        transform: maps a uint8 ``[3, H, W]`` tensor to the (uint8) crop the batch carries.
        on_bad_image: ``"error"`` raises naming the file; ``"skip"`` warns naming it and returns ``None``.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: v2.Transform, *,
                 on_bad_image: BadImagePolicy = "error") -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.samples = samples
        self.transform = transform
        self.on_bad_image = on_bad_image

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        """The decoded ``[H, W, 3]`` image and the label of sample ``index``."""
        path, label = self.samples[index]
        return read_image_rgb(path), label

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, int] | None:
        """``key``: an index, or the :class:`~mbv3_dense.data.sampling.SampleKey` a training sampler yields;
        the transform's random draws are a function of it (:func:`~mbv3_dense.data.sampling.sample_randomness`)."""
        try:
            array, label = self.read(as_sample_key(key).index)
        except ImageReadError as err:
            if self.on_bad_image == "error":
                raise
            warnings.warn(f"skipping unreadable image: {err}", stacklevel=1)
            return None
        # A [3, H, W] view of the HWC array, not a copy: torchvision's uint8 resize reads this
        # channels-last layout directly (and faster than a contiguous copy it would convert back).
        image = torch.from_numpy(array).permute(2, 0, 1)
        with sample_randomness(key):
            return self.transform(image), label


class StreamedImageFolderDataset(ImageFolderDataset):
    """:class:`ImageFolderDataset`'s samples from a split's chunks: item ``i`` holds the bytes of the file of
    sample ``i`` (:func:`chunk_item`), decoded by the same reader, so the same pixels and augmentation."""

    def __init__(self, chunks: ChunkReader, transform: v2.Transform, *,
                 on_bad_image: BadImagePolicy = "error") -> None:
        super().__init__([], transform, on_bad_image=on_bad_image)
        self.chunks = chunks.open()

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, index: int) -> tuple[np.ndarray, int]:
        item = self.chunks[index]
        return decode_image_rgb(item["image"], self.chunks.where(index, item["name"])), int(item["label"])


def chunk_item(sample: tuple[Path, int]) -> dict:
    """A sample's streaming item: the file's bytes as they are, its label and its path (for messages)."""
    path, label = sample
    return {"name": str(path).encode(), "image": path.read_bytes(), "label": int(label)}


def collate_skipping(items: list[tuple[Tensor, int] | None]) -> ClassificationBatch:
    """Stack the readable samples; count the ``None`` ones (skipped files)."""
    kept = [item for item in items if item is not None]
    skipped = torch.tensor(len(items) - len(kept))
    if not kept:
        return ClassificationBatch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                                   skipped)
    images = torch.stack([image for image, _ in kept])
    labels = torch.tensor([label for _, label in kept], dtype=torch.long)
    return ClassificationBatch(images, labels, skipped)


class ImageFolderDataModule(TaskDataModule):
    """ImageFolder classification data (ImageNet or any tree of the same layout).

    Class folders: every class must have training images (an empty training class folder is an
    error naming it, since its index would be unlearnable); validation class folders must be a
    subset of the training ones (a missing or empty one is logged). Training batches are drawn by a
    :class:`~mbv3_dense.data.sampling.SeededSampler` (order fixed by seed and epoch, sharded over the
    processes under DDP; a resumed epoch continues where it stopped), and each sample's augmentation
    is a function of ``(seed, epoch, index)``: worker count, rank and resumes change nothing.
    Validation under DDP uses an unpadded distributed sampler, so every image is counted once
    (a padded one repeats images to even out the ranks, and top-1 would count them twice).

    Args:
        root: folder holding ``train/`` and ``val/``.
        batch_size: per device.
        num_workers: loader processes per device.
        crop_size: training crop (RandomResizedCrop) and validation centre crop.
        val_resize_size: validation short-side resize before the centre crop.
        crop_scale: RandomResizedCrop area range.
        hflip: random horizontal flips in training.
        auto_augment: AutoAugment with the ImageNet policy in training.
        random_erase: RandomErasing probability in training (filled with the ImageNet mean colour,
            :data:`~mbv3_dense.classification.transforms.ERASE_FILL`).
        on_bad_image: ``"error"`` (stop, naming the file) or ``"skip"`` (warn naming the file,
            drop it from its batch, count it).
        pin_memory: pin host memory for faster copies to the GPU.
        predict_images: what ``lightning predict`` runs on: a folder (read recursively), a glob or a
            text file of paths (:func:`mbv3_dense.data.listing.list_images`). Each image goes through the
            validation transform (short side ``val_resize_size``, centre crop ``crop_size``), in
            batches of ``batch_size``; class names come from ``root/train`` when it exists.
        predict_max_pixels: images with more pixels are skipped with a warning naming them.
        streaming: train and validate from ``scripts/prepare_streaming.py --task classify``'s chunks in this
            folder or URL (``<streaming>/train``, ``<streaming>/val``) instead of ``root``'s files: the same
            samples, classes and augmentation (:mod:`mbv3_dense.data.streaming`). ``root`` is then only read for
            ``lightning predict``'s class names.
    """

    chunk_kind = ("classify", "imagefolder")
    same_in_both_splits = ("class_names",)
    train_set: ImageFolderDataset | None
    val_set: ImageFolderDataset | None

    def __init__(
        self,
        *,
        root: str | Path,
        batch_size: int = 128,
        num_workers: int = 8,
        crop_size: int = 224,
        val_resize_size: int = 256,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: bool = True,
        auto_augment: bool = True,
        random_erase: float = 0.2,
        on_bad_image: BadImagePolicy = "error",
        pin_memory: bool = True,
        predict_images: str | None = None,
        predict_max_pixels: int = DEFAULT_MAX_PIXELS,
        streaming: str | None = None,
    ) -> None:
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        super().__init__(batch_size=batch_size, val_batch_size=batch_size, num_workers=num_workers,
                         predict_images=predict_images, predict_max_pixels=predict_max_pixels, streaming=streaming)
        self.root = Path(root)
        self.on_bad_image = on_bad_image
        self.pin_memory = pin_memory
        self.train_tf = train_transform(crop_size=crop_size, crop_scale=tuple(crop_scale), hflip=hflip,
                                        auto_augment=auto_augment, random_erase=random_erase)
        self.val_tf = self.predict_transform = eval_transform(resize_size=val_resize_size, crop_size=crop_size)
        self.classes: list[str] = []
        self.predict_class_names: list[str] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        """The class folders of ``root/train``, sorted (streaming: as the chunks record them): the name of each
        class index."""
        if not self.classes:
            self.classes = list(self.chunks("train").info["class_names"]) if self.streaming else \
                find_classes(self.root / "train")
        return list(self.classes)

    @property
    def class_info(self) -> ClassInfo:
        """What checkpoints record of the classes (:mod:`mbv3_dense.checkpoints.classes`): their names."""
        source = self.chunks("train").location if self.streaming else str(self.root / "train")
        return check_class_info({"names": self.class_names}, source)

    def chunk_source(self, split: str) -> ChunkSource:
        """What ``scripts/prepare_streaming.py`` writes for ``split`` (after ``setup("fit")``)."""
        dataset = self.split_set(split)
        record = ChunkRecord(task="classify", layout="imagefolder", split=split, count=len(dataset.samples),
                             info={"class_names": self.class_names}, source=str(self.root / split),
                             fields=("name", "image", "label"))
        return ChunkSource(record, dataset.samples, chunk_item)

    def _setup_streaming(self, stage: str | None) -> None:
        self.classes = list(self.chunks("train").info["class_names"])
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = StreamedImageFolderDataset(self.chunks("train"), self.train_tf,
                                                        on_bad_image=self.on_bad_image)
        if stage in ("fit", "validate", None) and self.val_set is None:
            self.val_set = StreamedImageFolderDataset(self.chunks("val"), self.val_tf, on_bad_image=self.on_bad_image)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":
            self._setup_predict()
            return
        if self.streaming:
            self._setup_streaming(stage)
            return
        classes = find_classes(self.root / "train")
        self.classes = classes
        class_to_idx = {name: i for i, name in enumerate(classes)}
        if stage in ("fit", None) and self.train_set is None:
            scan = scan_image_folder(self.root / "train", class_to_idx)
            if scan.empty_classes:
                raise FileNotFoundError(
                    f"{self.root / 'train'}: class folders without any image file "
                    f"({', '.join(IMAGE_EXTENSIONS)}): {scan.empty_classes[:10]}"
                )
            self._note("train", scan)
            self.train_set = ImageFolderDataset(scan.samples, self.train_tf, on_bad_image=self.on_bad_image)
        if stage in ("fit", "validate", None) and self.val_set is None:
            val_dir = self.root / "val"
            unknown = sorted(set(find_classes(val_dir)) - set(classes))
            if unknown:
                raise ValueError(f"{val_dir}: class folders that are not in {self.root / 'train'}: {unknown[:10]}")
            scan = scan_image_folder(val_dir, class_to_idx)
            if not scan.samples:
                raise FileNotFoundError(f"{val_dir}: no image files found")
            if scan.empty_classes:
                log.warning("%s: %d classes have no validation images: %s", val_dir, len(scan.empty_classes),
                            scan.empty_classes[:10])
            self._note("val", scan)
            self.val_set = ImageFolderDataset(scan.samples, self.val_tf, on_bad_image=self.on_bad_image)

    def _setup_predict(self) -> None:
        self.setup_predict()
        try:
            self.predict_class_names = find_classes(self.root / "train")
        except FileNotFoundError:
            log.info("%s: no class folders; predictions name classes by index", self.root / "train")

    def _note(self, split: str, scan: FolderScan) -> None:
        log.info("%s/%s: %d images in %d classes (bad-image policy: %s)", self.root, split,
                 len(scan.samples), len(self.classes), self.on_bad_image)
        if scan.ignored:
            log.info("%s/%s: ignored %d files that are not images by their extension", self.root, split,
                     scan.ignored)

    def loader_options(self, split: str) -> dict[str, Any]:
        options = {"collate_fn": collate_skipping, "pin_memory": self.pin_memory}
        return {**options, "drop_last": len(self.train_set) > self.batch_size} if split == "train" else options
