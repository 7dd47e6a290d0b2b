"""Your own segmentation data: image and mask folders, a classes file, and the LightningDataModule.

Layouts and pair listing (``folders``: ``root/images/<split>/`` and ``root/masks/<split>/``; ``lists``:
``root/images/``, ``root/masks/`` and list files) are :mod:`segmentation.folder_pairs`'.
The classes file is :mod:`segmentation.mask_classes`', the two mask formats (``index``: class indices; ``color``:
RGB colours) :mod:`segmentation.mask_decoder`'s. Batches are those of the Cityscapes module: images uint8
``[N, 3, H, W]``, masks uint8 ``[N, H, W]`` class indices (0..num_classes-1) with the classes file's
ignore value (255 by default); the augmentation (:mod:`segmentation.transforms`, padding with the
ignore value) draws from ``(seed, epoch, index)`` (:mod:`mbv3_dense.data.sampling`).

Bad input stops set-up with an error naming the file(s), before any training step: a missing
folder or list file, an image without its mask or a mask without its image, a non-PNG mask, two images
with one stem, a list entry twice, an unreadable image or mask header, a mask whose mode does not fit
``mask_format``, a mask of another size than its image, and (``check_mask_values``, every mask
decoded once) values or colours the classes file does not know (``on_unknown_value``).

Streaming (``streaming``: ``scripts/prepare_streaming.py --task segment --layout folders``'s chunks,
:mod:`mbv3_dense.data.streaming`): item ``i`` of a split holds pair ``i``'s image bytes as they are and its mask as
the decoder gives it (class indices, re-encoded as an 8-bit PNG: colour masks and the ``on_unknown_value`` policy
are applied once, by the preparer); the classes file's content travels in the chunks' record.
"""

from __future__ import annotations

import logging
from functools import cached_property, partial
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from mbv3_dense.checkpoints.classes import ClassInfo
from mbv3_dense.data.image_io import ImageReadError, decode_image_rgb, decode_label_png, read_image_rgb
from mbv3_dense.data.predict import DEFAULT_MAX_PIXELS
from mbv3_dense.data.streaming.read import ChunkReader
from mbv3_dense.data.streaming.record import ChunkRecord, ChunkSource, StreamingDataError
from segmentation.dataset import PairDataset, SegmentationDataModule
from segmentation.folder_pairs import MaskFolderError, Pair, list_folder_pairs, list_listed_pairs, raise_problems
from segmentation.mask_classes import MaskClasses, find_classes_file, read_classes_file
from segmentation.mask_decoder import (
    MaskDecoder,
    MaskFormat,
    MaskValueError,
    UnknownValuePolicy,
    check_mask_options,
    image_size,
)
from segmentation.transforms import Transform

log = logging.getLogger(__name__)

Layout = Literal["auto", "folders", "lists"]


class MaskFolderSegmentation(PairDataset):
    """Images and class-index masks of one split.

    ``dataset[i]`` is ``(image, mask)`` after ``transform``: a uint8 ``[3, H, W]`` RGB tensor and a uint8
    ``[H, W]`` tensor of class indices (``decoder.classes.ignore_index`` where ignored).

    Args:
        pairs: the image/mask pairs (:mod:`segmentation.folder_pairs`).
        decoder: reads masks into class indices.
        transform: one of :mod:`segmentation.transforms`, called as ``transform(image, mask, rng)`` on the
            class indices (pad with the ignore value).
        source: what the messages call this split (e.g. ``"/data/x (train)"``).
        check_files: read every image and mask header now (no decoding) and raise naming the files if a
            header is unreadable, a mask's mode does not fit the format or a mask's size is not its image's.
        check_mask_values: decode every mask now and raise (``on_unknown_value: error``) naming the files
            and values the classes file does not know, or count them (``ignore``).
    """

    size_error = MaskFolderError

    def __init__(self, pairs: list[Pair], decoder: MaskDecoder, transform: Transform, *, source: str,
                 check_files: bool = False, check_mask_values: bool = False) -> None:
        self.pairs = pairs
        self.decoder = decoder
        self.transform = transform
        self.source = source
        #: ``(width, height)`` of each image, when ``check_files`` read the headers.
        self.sizes: list[tuple[int, int]] | None = None
        if check_files:
            self.check_headers()
        if check_mask_values:
            self.check_mask_values()

    def check_headers(self) -> None:
        """Raise :class:`MaskFolderError` naming the pairs whose headers are unusable (see ``check_files``)."""
        problems, sizes = [], []
        for image, mask, _ in self.pairs:
            try:
                size = image_size(image)
                mask_size, problem = self.decoder.header(mask)
            except ImageReadError as err:
                problems.append(str(err))
                continue
            if problem is None and size != mask_size:
                problem = (f"{image} is {size[0]}x{size[1]} (WxH) but its mask {mask} is "
                           f"{mask_size[0]}x{mask_size[1]}")
            if problem is not None:
                problems.append(problem)
            sizes.append(size)
        raise_problems(f"{self.source}: image/mask pairs", problems, len(self.pairs))
        self.sizes = sizes

    def check_mask_values(self) -> None:
        """Decode every mask; raise :class:`MaskFolderError` naming the masks that cannot be read or (under
        ``on_unknown_value: error``) hold values the classes file does not know; under ``ignore``, log how
        many masks had such values mapped to the ignore value."""
        problems = []
        for _, mask, _ in self.pairs:
            try:
                self.decoder.decode(mask)
            except (ImageReadError, MaskValueError) as err:
                problems.append(str(err))
        raise_problems(f"{self.source}: masks", problems, len(self.pairs))
        mapped = self.decoder.files_with_unknown_values
        if mapped:
            log.warning("%s: %d of %d masks hold values outside the classes file, mapped to %d (ignore)",
                        self.source, len(mapped), len(self.pairs), self.decoder.classes.ignore_index)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str | Path, str | Path]:
        """Pair ``index``: the decoded image, its class indices, and what messages call the two."""
        image_path, mask_path, _ = self.pairs[index]
        return read_image_rgb(image_path), self.decoder.decode(mask_path), image_path, mask_path


class StreamedMaskFolderSegmentation(MaskFolderSegmentation):
    """:class:`MaskFolderSegmentation`'s pairs from a split's chunks: item ``i`` holds pair ``i``'s image bytes and
    its class indices as the decoder gave them (:func:`chunk_item`), so the same crops and targets."""

    def __init__(self, chunks: ChunkReader, transform: Transform) -> None:
        self.chunks, self.transform, self.source = chunks.open(), transform, chunks.location
        self.pairs, self.sizes = [], None

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, index: int) -> tuple[np.ndarray, np.ndarray, str, str]:
        item = self.chunks[index]
        image_source, mask_source = self.chunks.where(index, item["name"]), self.chunks.where(index, item["mask_name"])
        mask = decode_label_png(item["mask"], mask_source)
        if mask.dtype != np.uint8:
            raise StreamingDataError(f"{mask_source}: the mask is not 8-bit class indices (not the preparer's)")
        return decode_image_rgb(item["image"], image_source), mask, image_source, mask_source


def chunk_item(pair: Pair, decoder: MaskDecoder) -> dict:
    """A pair's streaming item: the image's bytes as they are; the mask decoded to class indices by ``decoder``
    (the set-up's checks and ``on_unknown_value`` policy) and written as an 8-bit PNG; their paths."""
    encoded, png = cv2.imencode(".png", decoder.decode(pair.mask))
    if not encoded:
        raise MaskFolderError(f"{pair.mask}: could not encode its class indices as PNG")
    return {"name": str(pair.image).encode(), "image": pair.image.read_bytes(), "mask_name": str(pair.mask).encode(),
            "mask": png.tobytes()}


class MaskFolderDataModule(SegmentationDataModule):
    """Image and mask folders (layouts and formats in the module docstring) for LR-ASPP training and validation.

    Batches are ``(images [N, 3, H, W] uint8, masks [N, H, W] uint8 class indices, ignore value where
    ignored)``; the module makes them float input and int64 targets on the device. Validation runs on full
    frames (``val_batch_size`` > 1 needs images of one size, checked at set-up). :attr:`num_classes`,
    :attr:`class_names` and :attr:`class_info` read the classes file only (``lightning fit`` gives the
    network the data's class count and logs ``val/iou/<class name>``).

    Args:
        root: the dataset root.
        classes_file: the classes file, relative to ``root`` unless absolute; ``None``: the one of
            ``classes.yaml``, ``classes.yml``, ``classes.json``, ``classes.txt`` in ``root``.
        mask_format: ``"index"`` (single-channel class indices; L, P or 16-bit PNG) or ``"color"`` (RGB PNGs
            in the classes file's colours). A mask of the other kind is an error naming it.
        on_unknown_value: a mask value (colour) that is neither a class nor ignored: ``"error"`` stops naming
            the file and values; ``"ignore"`` maps it to the ignore value with a warning naming them.
        layout: ``"folders"`` (``images/<split>/``, ``masks/<split>/``), ``"lists"`` (``images/``, ``masks/``
            and list files), ``"auto"``: folders when ``root/images/<train_split>/`` exists, else lists.
        train_split, val_split: split folder names (layout folders).
        train_list, val_list: list files, relative to ``root`` (layout lists).
        batch_size: training batch size per process.
        val_batch_size: validation batch size per process.
        num_workers: data loader workers.
        crop_size: training crop ``(height, width)`` (padded with the ignore value where the image is smaller).
        scale_range: random scale factors for training.
        hflip: random horizontal flips in training.
        check_files: at set-up, read every image and mask header (no decoding) and stop naming the files
            on an unreadable header, a mask of the wrong kind or of another size than its image.
        check_mask_values: at set-up, decode every mask once and stop naming the files and values the
            classes file does not know (``on_unknown_value: error``), or count them (``ignore``).
        predict_images: what ``lightning predict`` runs on (as :class:`~segmentation.data.CityscapesDataModule`).
        predict_max_pixels: images with more pixels are skipped with a warning naming them.
        streaming: train and validate from ``scripts/prepare_streaming.py --task segment --layout folders``'s
            chunks in this folder or URL (``<streaming>/train``, ``<streaming>/val``) instead of ``root``'s files:
            the same pairs, crops and targets (:mod:`mbv3_dense.data.streaming`). The classes are the chunks' (the
            classes file's content, recorded); ``mask_format``, ``on_unknown_value`` and the checks applied when
            the chunks were prepared.
    """

    chunk_kind = ("segment", "folders")
    train_set: MaskFolderSegmentation | None
    val_set: MaskFolderSegmentation | None
    same_in_both_splits = ("classes",)

    def __init__(self, *, root: str, classes_file: str | None = None, mask_format: MaskFormat = "index",
                 on_unknown_value: UnknownValuePolicy = "error", layout: Layout = "auto", train_split: str = "train",
                 val_split: str = "val", train_list: str = "train.txt", val_list: str = "val.txt",
                 batch_size: int = 8, val_batch_size: int = 1, num_workers: int = 4,
                 crop_size: tuple[int, int] = (512, 512), scale_range: tuple[float, float] = (0.5, 2.0),
                 hflip: bool = True, check_files: bool = True, check_mask_values: bool = True,
                 predict_images: str | None = None, predict_max_pixels: int = DEFAULT_MAX_PIXELS,
                 streaming: str | None = None) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         crop_size=crop_size, scale_range=scale_range, hflip=hflip, predict_images=predict_images,
                         predict_max_pixels=predict_max_pixels, streaming=streaming)
        check_mask_options(mask_format, on_unknown_value)
        if layout not in ("auto", "folders", "lists"):
            raise ValueError(f"layout must be 'auto', 'folders' or 'lists', got {layout!r}")
        self.root = Path(root)
        self.classes_file = classes_file
        self.mask_format = mask_format
        self.on_unknown_value = on_unknown_value
        self.layout = layout
        self.splits = {"train": (train_split, train_list), "val": (val_split, val_list)}
        self.check_files = check_files
        self.check_mask_values = check_mask_values

    # ------------------------------------------------------------------ classes (the classes file only)
    @cached_property
    def classes(self) -> MaskClasses:
        """The classes file's content (read once; streaming: as the chunks record it)."""
        if self.streaming:
            recorded = self.chunks("train").info["classes"]
            colors = recorded["colors"]
            return MaskClasses(tuple(recorded["names"]), tuple(map(tuple, colors)) if colors is not None else None,
                               int(recorded["ignore_index"]), tuple(map(tuple, recorded["ignore_colors"])),
                               Path(recorded["source"]))
        return read_classes_file(find_classes_file(self.root, self.classes_file))

    def chunk_source(self, split: Literal["train", "val"]) -> ChunkSource:
        """What ``scripts/prepare_streaming.py`` writes for ``split`` (after ``setup("fit")``, whose checks ran)."""
        dataset = self.split_set(split)
        c = self.classes
        sizes = set(dataset.sizes or [])
        classes = {"names": list(c.names), "colors": [list(x) for x in c.colors] if c.colors is not None else None,
                   "ignore_index": c.ignore_index, "ignore_colors": [list(x) for x in c.ignore_colors],
                   "source": str(c.source)}
        record = ChunkRecord(task="segment", layout="folders", split=split, count=len(dataset.pairs),
                             info={"classes": classes, "mask_format": self.mask_format,
                                   "on_unknown_value": self.on_unknown_value,
                                   "frame_size": list(sizes.pop()) if len(sizes) == 1 else None},
                             source=dataset.source, fields=("name", "image", "mask_name", "mask"))
        return ChunkSource(record, dataset.pairs, partial(chunk_item, decoder=dataset.decoder))

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def class_names(self) -> list[str]:
        """Class names in index order."""
        return list(self.classes.names)

    @property
    def class_info(self) -> ClassInfo:
        """Names, ``label_ids`` (each class's index: its value in index masks and in predicted label PNGs),
        colours when the classes file has them, ``ignore_index`` (:mod:`mbv3_dense.checkpoints.classes`)."""
        return self.classes.class_info()

    # ------------------------------------------------------------------ splits
    def resolved_layout(self) -> Literal["folders", "lists"]:
        """``layout``, with ``"auto"`` decided: folders when ``root/images/<train_split>/`` exists, else lists."""
        if self.layout != "auto":
            return self.layout
        return "folders" if (self.root / "images" / self.splits["train"][0]).is_dir() else "lists"

    def pairs(self, which: Literal["train", "val"]) -> list[Pair]:
        """The image/mask pairs of the training or validation split (errors as the listing functions)."""
        folder, list_file = self.splits[which]
        if self.resolved_layout() == "folders":
            return list_folder_pairs(self.root, folder)
        return list_listed_pairs(self.root, list_file)

    def split_dataset(self, which: Literal["train", "val"], transform: Transform | None = None,
                      ) -> MaskFolderSegmentation:
        """The dataset of a split with the set-up checks (``check_files``, ``check_mask_values``); ``transform``
        defaults to the split's own (training crops for ``"train"``, full frames for ``"val"``)."""
        decoder = MaskDecoder(self.classes, mask_format=self.mask_format, on_unknown_value=self.on_unknown_value)
        if transform is None:
            transform = self.split_transform(which, self.classes.ignore_index)
        pairs = self.pairs(which)
        layout = self.resolved_layout()
        name = self.splits[which][0] if layout == "folders" else self.splits[which][1]
        dataset = MaskFolderSegmentation(pairs, decoder, transform, source=f"{self.root} ({name})",
                                         check_files=self.check_files, check_mask_values=self.check_mask_values)
        log.info("%s (%s, layout %s): %d image/mask pairs, %d classes from %s, %s masks", self.root, name, layout,
                 len(dataset), self.num_classes, self.classes.source.name, self.mask_format)
        return dataset

    def _setup_streaming(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = StreamedMaskFolderSegmentation(self.chunks("train"),
                                                            self.split_transform("train", self.classes.ignore_index))
        if stage in ("fit", "validate"):
            self.val_set = StreamedMaskFolderSegmentation(self.chunks("val"), self.split_transform("val"))
            if self.val_batch_size > 1 and self.chunks("val").info["frame_size"] is None:
                raise MaskFolderError(f"{self.chunks('val').location}: validation runs on full frames, "
                                      f"{self.val_batch_size} a batch, but the images have different sizes; set "
                                      "val_batch_size: 1")

    def setup(self, stage: str) -> None:
        if self.streaming and stage != "predict":
            self._setup_streaming(stage)
            return
        if stage == "fit":
            self.train_set = self.split_dataset("train")
        if stage in ("fit", "validate"):
            self.val_set = self.split_dataset("val")
            self._check_val_sizes(self.val_set)
        if stage == "predict":
            self.setup_predict()

    def _check_val_sizes(self, dataset: MaskFolderSegmentation) -> None:
        """Full-frame validation batches stack images: with ``val_batch_size`` > 1 they must share one size."""
        if self.val_batch_size <= 1 or dataset.sizes is None:
            return
        first = dataset.sizes[0]
        for (image, _, _), size in zip(dataset.pairs, dataset.sizes, strict=True):
            if size != first:
                raise MaskFolderError(
                    f"{dataset.source}: validation runs on full frames, {self.val_batch_size} a batch, but "
                    f"{dataset.pairs[0].image} is {first[0]}x{first[1]} and {image} is {size[0]}x{size[1]} (WxH); "
                    "set val_batch_size: 1 for images of different sizes")


__all__ = ["MaskFolderDataModule", "MaskFolderSegmentation", "StreamedMaskFolderSegmentation", "chunk_item"]
