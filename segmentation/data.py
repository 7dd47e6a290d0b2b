"""Cityscapes on disk: the dataset over the official layout and the LightningDataModule.

Layout (the official one)::

    root/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    root/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png

Label files hold labelIds (8-bit, single channel); they are converted to trainIds (0..18,
255 = ignore) here, at the edge, with :func:`segmentation.labels.label_ids_to_train_ids`, after the
transform: the training crop resamples labelIds by nearest neighbour, which commutes with the lookup,
so only the crop's pixels are mapped (a third of a frame's), and padding gets labelId 0 ("unlabeled",
ignored in training). Images travel as uint8 ``[3, H, W]``; the module normalises them on the device.

Streaming (``streaming``: ``scripts/prepare_streaming.py --task segment``'s chunks, :mod:`mbv3_dense.data.streaming`):
item ``i`` of a split holds the bytes of pair ``i``'s image and labelIds PNG, read as the files are.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image

from mbv3_dense.checkpoints.classes import ClassInfo
from mbv3_dense.data.image_io import ImageReadError, decode_image_rgb, decode_label_png, read_image_rgb, read_label_png
from mbv3_dense.data.predict import DEFAULT_MAX_PIXELS
from mbv3_dense.data.streaming.read import ChunkReader
from mbv3_dense.data.streaming.record import ChunkRecord, ChunkSource
from segmentation.dataset import PairDataset, SegmentationDataModule
from segmentation.labels import CLASS_NAMES, NUM_CLASSES, cityscapes_class_info, label_ids_to_train_ids
from segmentation.transforms import Transform

log = logging.getLogger(__name__)

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
# What a training crop's padding holds in labelId space: "unlabeled", which maps to trainId 255 (ignore).
PAD_LABEL_ID = 0


class CityscapesDataError(ValueError):
    """The Cityscapes tree or one of its files is not what the layout promises; names the file(s)."""


def label_path_for(image_path: Path, root: Path, split: str) -> Path:
    """``leftImg8bit/<split>/<city>/X_leftImg8bit.png`` -> ``gtFine/<split>/<city>/X_gtFine_labelIds.png``."""
    stem = image_path.name[: -len(IMAGE_SUFFIX)]
    return root / "gtFine" / split / image_path.parent.name / f"{stem}{LABEL_SUFFIX}"


def list_split(root: str | Path, split: str, *, require_labels: bool = True) -> list[tuple[Path, Path]]:
    """Sorted ``(image, label)`` pairs of a split.

    Raises:
        CityscapesDataError: the split folder is missing or holds no ``*_leftImg8bit.png``, or an
            image has no label file (naming both; only when ``require_labels``).
    """
    root = Path(root)
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise CityscapesDataError(f"{image_dir}: no such split folder (expected root/leftImg8bit/{split}/<city>/)")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise CityscapesDataError(f"{image_dir}: split folder holds no <city>/*{IMAGE_SUFFIX} images")
    pairs = []
    for image in images:
        label = label_path_for(image, root, split)
        if require_labels and not label.is_file():
            raise CityscapesDataError(f"{image}: its label file {label} does not exist")
        pairs.append((image, label))
    return pairs


def check_pair(image_path: Path, label_path: Path) -> str | None:
    """Header-only check of one pair (no decoding): a problem message naming the file(s), or ``None``.

    Finds unreadable files, colour (RGB/RGBA) or 16/32-bit label images and size mismatches; truncated
    pixel data and labelIds outside the table show only when the label is decoded (:func:`read_train_ids`).
    """
    try:
        with Image.open(image_path) as img:
            image_size = img.size
        with Image.open(label_path) as lab:
            label_size, mode = lab.size, lab.mode
    except (OSError, SyntaxError, ValueError) as err:
        return f"{err}"
    if mode not in ("L", "P"):
        kind = "colour" if mode in ("RGB", "RGBA") else "16/32-bit"
        return (f"{label_path}: {kind} label image (mode {mode}); Cityscapes labelIds are 8-bit single-channel PNGs "
                "(*_gtFine_labelIds.png, not *_color.png or *_instanceIds.png)")
    if image_size != label_size:
        return (f"{image_path} is {image_size[0]}x{image_size[1]} (WxH) but its label {label_path} is "
                f"{label_size[0]}x{label_size[1]}")
    return None


def check_pairs(pairs: list[tuple[Path, Path]]) -> list[str]:
    """:func:`check_pair` over a split; the list of problems (empty when all pairs pass)."""
    return [problem for image, label in pairs if (problem := check_pair(image, label)) is not None]


def read_label_ids(label_path: Path) -> np.ndarray:
    """Read a ``*_gtFine_labelIds.png`` as ``[H, W]`` uint8 labelIds.

    Raises:
        ImageReadError: missing/corrupt file or a colour (RGB) label image.
        CityscapesDataError: a 16-bit label image (labelIds are 8-bit; 16-bit files are usually
            ``*_instanceIds.png``).
    """
    return checked_label_ids(read_label_png(label_path), label_path)


def checked_label_ids(ids: np.ndarray, label_path: str | Path) -> np.ndarray:
    """``ids`` (a decoded label PNG) when they are 8-bit labelIds; :class:`CityscapesDataError` naming ``label_path``
    for a 16-bit label image."""
    if ids.dtype != np.uint8:
        raise CityscapesDataError(
            f"{label_path}: label image is 16/32-bit; Cityscapes labelIds are 8-bit single-channel PNGs "
            "(is this an *_instanceIds.png?)"
        )
    return ids


def read_train_ids(label_path: Path) -> np.ndarray:
    """Read a ``*_gtFine_labelIds.png`` and return ``[H, W]`` uint8 trainIds (errors as :func:`read_label_ids`)."""
    return label_ids_to_train_ids(read_label_ids(label_path), label_path)


class CityscapesSegmentation(PairDataset):
    """Images and trainId masks of one split.

    ``dataset[i]`` is ``(image, mask)`` after ``transform``: a uint8 ``[3, H, W]`` RGB tensor and a
    uint8 ``[H, W]`` tensor of trainIds (255 = ignore).

    Args:
        root: the Cityscapes root folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: one of :mod:`segmentation.transforms`, called as ``transform(image, label_ids, rng)``
            on the labelIds (padding, if any, with :data:`PAD_LABEL_ID`); trainIds are looked up after it.
        check_files: run :func:`check_pairs` over the split now and raise naming the first problems.
    """

    size_error = CityscapesDataError
    mask_word = "label"

    def __init__(self, root: str | Path, split: str, transform: Transform, *,
                 check_files: bool = False) -> None:
        self.root = Path(root)
        self.split = split
        self.pairs = list_split(self.root, split)
        self.transform = transform
        if check_files:
            problems = check_pairs(self.pairs)
            if problems:
                raise CityscapesDataError(f"{self.root} ({split}): {len(problems)} of {len(self.pairs)} image/label "
                                          f"pairs are unusable; first: " + "; ".join(problems[:3]))

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str | Path, str | Path]:
        """Pair ``index``: the decoded image, its labelIds, and what messages call the two."""
        image_path, label_path = self.pairs[index]
        return read_image_rgb(image_path), read_label_ids(label_path), image_path, label_path

    def target(self, mask: np.ndarray, mask_source: str | Path) -> np.ndarray:
        """The transformed labelIds as trainIds."""
        return label_ids_to_train_ids(mask, mask_source)


class StreamedCityscapesSegmentation(CityscapesSegmentation):
    """:class:`CityscapesSegmentation`'s pairs from a split's chunks: item ``i`` holds the bytes of pair ``i``'s
    image and labelIds PNG (:func:`chunk_item`), decoded by the same readers, so the same crops and trainIds."""

    def __init__(self, chunks: ChunkReader, transform: Transform) -> None:
        self.chunks, self.split, self.transform, self.pairs = chunks.open(), chunks.record.split, transform, []

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        item = self.chunks[index]
        image_source = self.chunks.where(index, item["name"])
        label_source = self.chunks.where(index, item["label_name"])
        return (decode_image_rgb(item["image"], image_source),
                checked_label_ids(decode_label_png(item["label"], label_source), label_source),
                image_source, label_source)


def chunk_item(pair: tuple[Path, Path]) -> dict:
    """A pair's streaming item: the image's and the labelIds PNG's bytes as they are, and their paths."""
    image_path, label_path = pair
    return {"name": str(image_path).encode(), "image": image_path.read_bytes(),
            "label_name": str(label_path).encode(), "label": label_path.read_bytes()}


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine annotations for LR-ASPP training and validation.

    Batches are ``(images [N, 3, H, W] uint8, masks [N, H, W] uint8 trainIds, 255 = ignore)``; the module
    makes them float input and int64 targets on the device.
    Validation runs at full resolution. Under DDP, validation uses an unpadded distributed
    sampler, so each image is counted once (a padded sampler would duplicate images, and the
    synced confusion matrix would count them twice).

    Args:
        root: the Cityscapes root (``leftImg8bit/`` and ``gtFine/`` inside).
        batch_size: training batch size per process.
        val_batch_size: validation batch size per process (full-size images of one size).
        num_workers: data loader workers.
        crop_size: training crop ``(height, width)``; 769x769 is the paper's protocol.
        scale_range: random scale factors for training.
        hflip: random horizontal flips in training.
        train_split: split used for training.
        val_split: split used for validation.
        check_files: before training, read every image and label header (no decoding) and stop with
            an error naming the files if a label is missing, coloured, 16-bit or of another size
            than its image (about a second for Cityscapes' 3475 pairs on a local disk).
        predict_images: what ``lightning predict`` runs on: a folder (read recursively), a glob or a
            text file of paths (:func:`mbv3_dense.data.listing.list_images`); each image at its own size,
            one forward pass per image, ``val_batch_size`` images per loader batch.
        predict_max_pixels: images with more pixels are skipped with a warning naming them.
        streaming: train and validate from ``scripts/prepare_streaming.py --task segment``'s chunks in this folder
            or URL (``<streaming>/train``, ``<streaming>/val``) instead of ``root``'s files: the same pairs, crops
            and trainIds (:mod:`mbv3_dense.data.streaming`). The preparer ran the ``check_files`` checks.
    """

    chunk_kind = ("segment", "cityscapes")
    train_set: CityscapesSegmentation | None
    val_set: CityscapesSegmentation | None

    def __init__(self, *, root: str, batch_size: int = 8, val_batch_size: int = 1, num_workers: int = 4,
                 crop_size: tuple[int, int] = (769, 769), scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: bool = True, train_split: str = "train", val_split: str = "val",
                 check_files: bool = True, predict_images: str | None = None,
                 predict_max_pixels: int = DEFAULT_MAX_PIXELS, streaming: str | None = None) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         crop_size=crop_size, scale_range=scale_range, hflip=hflip, predict_images=predict_images,
                         predict_max_pixels=predict_max_pixels, streaming=streaming)
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.check_files = check_files

    @property
    def num_classes(self) -> int:
        """19: the trainIds."""
        return NUM_CLASSES

    @property
    def class_names(self) -> list[str]:
        """The 19 trainId names in trainId order."""
        return list(CLASS_NAMES)

    @property
    def class_info(self) -> ClassInfo:
        """trainId names, their labelIds, the Cityscapes palette, ignore 255
        (:func:`segmentation.labels.cityscapes_class_info`)."""
        return cityscapes_class_info()

    def chunk_source(self, split: str) -> ChunkSource:
        """What ``scripts/prepare_streaming.py`` writes for ``split`` (``"train"``: ``train_split``, ``"val"``:
        ``val_split``; after ``setup("fit")``)."""
        dataset = self.split_set(split)
        record = ChunkRecord(task="segment", layout="cityscapes", split=split, count=len(dataset.pairs),
                             info={"class_info": self.class_info, "split": dataset.split},
                             source=str(self.root), fields=("name", "image", "label_name", "label"))
        return ChunkSource(record, dataset.pairs, chunk_item)

    def _dataset(self, split: str, transform: Transform) -> CityscapesSegmentation:
        if self.streaming:
            return StreamedCityscapesSegmentation(self.chunks(split), transform)
        return CityscapesSegmentation(self.root, self.train_split if split == "train" else self.val_split, transform,
                                      check_files=self.check_files)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = self._dataset("train", self.split_transform("train", PAD_LABEL_ID))
            log.info("Cityscapes %s: %d images", self.train_split, len(self.train_set))
        if stage in ("fit", "validate"):
            self.val_set = self._dataset("val", self.split_transform("val"))
            log.info("Cityscapes %s: %d images", self.val_split, len(self.val_set))
        if stage == "predict":
            self.setup_predict()


__all__ = ["CityscapesDataError", "CityscapesDataModule", "CityscapesSegmentation", "ImageReadError", "check_pair",
           "check_pairs", "list_split", "read_label_ids", "read_train_ids"]
