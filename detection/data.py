"""COCO detection data: the training and evaluation datasets and the LightningDataModule.

Annotations are read and checked by :mod:`detection.annotations`. Training targets exclude
``iscrowd`` boxes and images without any (non-crowd) box; evaluation keeps every image and every
box, crowd flags and the annotation ``area`` included, in the original image's pixels.

Images travel as uint8 ``[3, H, W]`` RGB; :class:`~detection.module.DetectionModule` turns them into
floats on the device (:meth:`~mbv3_dense.training.task.TaskModule.on_after_batch_transfer`).

Streaming (``streaming``: ``scripts/prepare_streaming.py --task detect``'s chunks, :mod:`mbv3_dense.data.streaming`):
item ``i`` of a split holds the image file's bytes and record ``i``'s cleaned annotations with COCO category
ids (:func:`chunk_item`); the categories come from the chunks' record and become labels here, as from the file.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from detection.annotations import (
    AnnotationError,
    CategoryMap,
    ImageRecord,
    load_coco,
    missing_image_files,
    read_categories,
)
from detection.transforms import train_transform
from mbv3_dense.checkpoints.classes import ClassInfo
from mbv3_dense.data.image_io import decode_image_rgb, read_image_rgb
from mbv3_dense.data.module import TaskDataModule
from mbv3_dense.data.predict import DEFAULT_MAX_PIXELS
from mbv3_dense.data.sampling import SampleKey, as_sample_key, sample_randomness
from mbv3_dense.data.streaming.read import ChunkReader
from mbv3_dense.data.streaming.record import ChunkRecord, ChunkSource, StreamingDataError

log = logging.getLogger(__name__)

Target = dict[str, Tensor]
Batch = tuple[Tensor | list[Tensor], list[Target]]


class _FromFiles(Dataset):
    """A COCO dataset's records and their image files: :meth:`read` of sample ``i`` decodes record ``i``'s image."""

    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> tuple[np.ndarray, ImageRecord]:
        """The decoded ``[H, W, 3]`` image and the record of sample ``index``."""
        rec = self.records[index]
        return read_image_rgb(rec.path), rec


class CocoTrainDataset(_FromFiles):
    """Training split: ``(image [3, S, S] uint8, {"boxes": [G, 4] XYXY in the S x S input, "labels": [G]})``.

    Crowd boxes are left out; images without any other box are dropped (logged).
    """

    def __init__(self, records: list[ImageRecord], transform: A.Compose) -> None:
        self.records = [r for r in records if (~r.iscrowd).any()]
        self.transform = transform

    def __getitem__(self, key: int | SampleKey) -> tuple[Tensor, Target]:
        """``key``: an index, or the :class:`~mbv3_dense.data.sampling.SampleKey` a training sampler yields;
        the augmentation's draws are a function of it, never of a worker's or the OS's state."""
        image, rec = self.read(as_sample_key(key).index)
        keep = ~rec.iscrowd
        with sample_randomness(key) as generators:
            self.transform.set_random_state(generators.numpy, generators.python)
            out = self.transform(image=image, bboxes=rec.boxes[keep], labels=rec.labels[keep].tolist())
        boxes = torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        labels = torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1))
        img = torch.from_numpy(np.ascontiguousarray(out["image"])).permute(2, 0, 1).contiguous()
        return img, {"boxes": boxes, "labels": labels}


class CocoEvalDataset(_FromFiles):
    """Evaluation split: every image at its original size, every box.

    Items: ``(image [3, H, W] uint8, {"image_id", "orig_size" (H, W), "boxes" [G, 4] XYXY
    original pixels, "labels" [G], "iscrowd" [G] bool, "area" [G]})``.
    """

    def __init__(self, records: list[ImageRecord]) -> None:
        self.records = records

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image, rec = self.read(index)
        if image.shape[:2] != (rec.height, rec.width):
            raise AnnotationError(f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but the annotation file "
                                  f"says {rec.width}x{rec.height}")
        img = torch.from_numpy(image).permute(2, 0, 1).contiguous()
        return img, {"image_id": torch.tensor(rec.image_id), "orig_size": torch.tensor([rec.height, rec.width]),
                     "boxes": torch.from_numpy(rec.boxes), "labels": torch.from_numpy(rec.labels),
                     "iscrowd": torch.from_numpy(rec.iscrowd), "area": torch.from_numpy(rec.area)}


class _FromChunks:
    """A COCO dataset's :meth:`read` from a split's chunks: item ``i`` holds the image bytes and the cleaned
    annotations of record ``i`` (:func:`chunk_item`), category ids mapped to labels by ``category_map``."""

    def __init__(self, chunks: ChunkReader, category_map: CategoryMap) -> None:
        self.chunks, self.category_map, self.records = chunks.open(), category_map, []

    def __len__(self) -> int:
        return len(self.chunks)

    def read(self, index: int) -> tuple[np.ndarray, ImageRecord]:
        item = self.chunks[index]
        where = self.chunks.where(index, item["name"])
        labels = [self.category_map.to_label(c, where) for c in item["category_ids"].tolist()]
        rec = ImageRecord(image_id=int(item["image_id"]), path=Path(item["name"]), height=int(item["height"]),
                          width=int(item["width"]), boxes=item["boxes"], labels=np.asarray(labels, dtype=np.int64),
                          iscrowd=item["iscrowd"].astype(bool), area=item["area"])
        return decode_image_rgb(item["image"], where), rec


class StreamedCocoTrainDataset(_FromChunks, CocoTrainDataset):
    """:class:`CocoTrainDataset`'s samples from the training split's chunks (the same images, boxes and draws)."""

    def __init__(self, chunks: ChunkReader, category_map: CategoryMap, transform: A.Compose) -> None:
        _FromChunks.__init__(self, chunks, category_map)
        self.transform = transform


class StreamedCocoEvalDataset(_FromChunks, CocoEvalDataset):
    """:class:`CocoEvalDataset`'s samples from the validation split's chunks."""


def chunk_item(rec: ImageRecord, category_map: CategoryMap) -> dict:
    """A record's streaming item: the image file's bytes as they are, its id, size and cleaned annotations
    (XYXY boxes in its pixels, clamped; COCO category ids, not labels: the reader's category map converts them)."""
    return {"name": str(rec.path).encode(), "image": rec.path.read_bytes(), "image_id": rec.image_id,
            "height": rec.height, "width": rec.width, "boxes": rec.boxes.astype(np.float32),
            "category_ids": np.asarray([category_map.label_to_id[label] for label in rec.labels.tolist()],
                                       dtype=np.int64),
            "iscrowd": rec.iscrowd.astype(np.uint8), "area": rec.area.astype(np.float32)}


def collate_train(batch: list[tuple[Tensor, Target]]) -> Batch:
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def collate_eval(batch: list[tuple[Tensor, Target]]) -> Batch:
    return [b[0] for b in batch], [b[1] for b in batch]


class CocoDataModule(TaskDataModule):
    """COCO detection in the real layout: ``root/train2017``, ``root/val2017``,
    ``root/annotations/instances_{train,val}2017.json`` (each path configurable, relative to ``root``).

    Training batches: ``(images [N, 3, S, S] uint8, targets)`` with boxes in input pixels and
    model labels. Validation batches: ``(list of uint8 [3, H, W] images at original size, targets)``
    with all annotations (see :class:`CocoEvalDataset`).

    Args:
        root: dataset root.
        train_images / val_images: image folders.
        train_annotations / val_annotations: instances files.
        num_classes: the model's classes incl. background (decides the label layout, see :class:`CategoryMap`);
            ``None``: contiguous labels for the annotation file's categories (its count + 1), what fine-tuning
            on your own COCO JSON wants. The categories (ids and names) come from the validation annotation
            file (smaller), else the training one, and both splits are labelled by them.
        image_size: training input side.
        batch_size: training batch per device.
        val_batch_size: evaluation batch per device.
        num_workers: loader workers.
        iou_crop: SSD random IoU crop.
        zoom_out_p: probability of SSD zoom-out.
        photometric_p: probability of photometric distortion.
        hflip_p: probability of a horizontal flip.
        min_box_size: boxes smaller than this (pixels) after clamping/augmenting are dropped.
        predict_images: what ``lightning predict`` runs on: a folder (read recursively), a glob or a
            text file of paths (:func:`mbv3_dense.data.listing.list_images`); images at their original
            sizes, in batches of ``val_batch_size``. Category ids and names come from the validation
            (else training) annotation file's ``categories`` when one exists.
        predict_max_pixels: images with more pixels are skipped with a warning naming them.
        streaming: train and validate from ``scripts/prepare_streaming.py --task detect``'s chunks in this folder
            or URL (``<streaming>/train``, ``<streaming>/val``) instead of ``root``'s files: the same images, boxes
            and augmentation (:mod:`mbv3_dense.data.streaming`); the categories are the chunks'. They were cleaned with
            the preparer's ``--min-box-size``, which must equal ``min_box_size``.
    """

    chunk_kind = ("detect", "coco")
    same_in_both_splits = ("categories",)
    prepared_from = "annotation files"
    train_set: CocoTrainDataset | None
    val_set: CocoEvalDataset | None

    def __init__(
        self,
        *,
        root: str = "/data/coco",
        train_images: str = "train2017",
        val_images: str = "val2017",
        train_annotations: str = "annotations/instances_train2017.json",
        val_annotations: str = "annotations/instances_val2017.json",
        num_classes: int | None = 91,
        image_size: int = 320,
        batch_size: int = 24,
        val_batch_size: int = 8,
        num_workers: int = 4,
        iou_crop: bool = True,
        zoom_out_p: float = 0.0,
        photometric_p: float = 0.0,
        hflip_p: float = 0.5,
        min_box_size: float = 1.0,
        predict_images: str | None = None,
        predict_max_pixels: int = DEFAULT_MAX_PIXELS,
        streaming: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, val_batch_size=val_batch_size, num_workers=num_workers,
                         predict_images=predict_images, predict_max_pixels=predict_max_pixels, streaming=streaming)
        self.root = Path(root)
        self.paths = {"train": (self.root / train_images, self.root / train_annotations),
                      "val": (self.root / val_images, self.root / val_annotations)}
        self._num_classes = num_classes
        self.min_box_size = min_box_size
        self.transform = train_transform(image_size=image_size, iou_crop=iou_crop, zoom_out_p=zoom_out_p,
                                         photometric_p=photometric_p, hflip_p=hflip_p, min_box_size=min_box_size)
        self._category_map: CategoryMap | None = None

    @property
    def category_map(self) -> CategoryMap:
        """Category ids and names <-> labels, read once from the annotation files' ``categories``."""
        if self._category_map is None and self.streaming:
            chunks = self.chunks("train")
            categories = chunks.info["categories"]
            self._category_map = CategoryMap([c["id"] for c in categories], self._num_classes, chunks.location,
                                             {c["id"]: c["name"] for c in categories})
        if self._category_map is None:
            found = [annotations for _, annotations in (self.paths["val"], self.paths["train"])
                     if annotations.is_file()]
            if not found:
                raise AnnotationError(f"no annotation file: neither {self.paths['val'][1]} nor "
                                      f"{self.paths['train'][1]} exists")
            self._category_map = read_categories(found[0], self._num_classes)
        return self._category_map

    @property
    def num_classes(self) -> int:
        """The model's classes, background included (given, or the categories' count + 1)."""
        return self._num_classes if self._num_classes is not None else self.category_map.num_classes

    @property
    def class_names(self) -> list[str]:
        """The name of each label (background first)."""
        return self.category_map.class_names

    @property
    def class_info(self) -> ClassInfo:
        """What checkpoints record of the classes: names and the COCO category id of each label."""
        return self.category_map.class_info

    def _load(self, split: str) -> list[ImageRecord]:
        images, annotations = self.paths[split]
        records, _, stats = load_coco(annotations, images, self._num_classes, self.min_box_size,
                                      category_map=self.category_map)
        missing = missing_image_files(records)
        if missing:
            raise AnnotationError(f"{annotations}: {len(missing)} of {len(records)} listed images are missing from "
                                  f"{images} (first: {', '.join(str(p) for p in missing[:3])})")
        if not records:
            raise AnnotationError(f"{annotations}: lists no images")
        log.info("%s: %d images, %d boxes (%d crowd); %d boxes clamped to the image, %d degenerate or "
                 "outside boxes dropped; %d images without a non-crowd box", annotations, stats.images,
                 stats.boxes, stats.crowd, stats.clamped, stats.dropped_degenerate, stats.images_without_boxes)
        return records

    def check_chunks(self, chunks: ChunkReader) -> None:
        """A split's chunks must have been cleaned with this module's ``min_box_size`` and have the other split's
        categories."""
        if chunks.info["min_box_size"] != self.min_box_size:
            raise StreamingDataError(f"{chunks.location}: boxes were cleaned with min_box_size "
                                     f"{chunks.info['min_box_size']} (prepare_streaming.py --min-box-size), this "
                                     f"module has min_box_size {self.min_box_size}: set the same value")
        super().check_chunks(chunks)

    def chunk_source(self, split: str) -> ChunkSource:
        """What ``scripts/prepare_streaming.py`` writes for ``split`` (after ``setup("fit")``)."""
        dataset = self.split_set(split)
        cmap = self.category_map
        categories = [{"id": i, "name": cmap.names.get(i, str(i))} for i in cmap.category_ids]
        record = ChunkRecord(task="detect", layout="coco", split=split, count=len(dataset.records),
                             info={"categories": categories, "min_box_size": self.min_box_size},
                             source=str(self.paths[split][1]),
                             fields=("name", "image", "image_id", "height", "width", "boxes", "category_ids",
                                     "iscrowd", "area"))
        return ChunkSource(record, dataset.records, partial(chunk_item, category_map=cmap))

    def _setup_streaming(self, stage: str) -> None:
        if stage == "fit" and self.train_set is None:
            self.train_set = StreamedCocoTrainDataset(self.chunks("train"), self.category_map, self.transform)
        if stage in ("fit", "validate", "test") and self.val_set is None:
            self.val_set = StreamedCocoEvalDataset(self.chunks("val"), self.category_map)

    def setup(self, stage: str) -> None:
        if self.streaming and stage != "predict":
            self._setup_streaming(stage)
            return
        if stage == "fit" and self.train_set is None:
            records = self._load("train")
            self.train_set = CocoTrainDataset(records, self.transform)
            if not len(self.train_set):
                raise AnnotationError(f"{self.paths['train'][1]}: no image has a usable (non-crowd, non-degenerate) "
                                      "box: nothing to train on (empty or fully filtered annotation list)")
            log.info("training on %d images; %d images without a non-crowd box dropped from training "
                     "(they stay in evaluation)", len(self.train_set), len(records) - len(self.train_set))
        if stage in ("fit", "validate", "test") and self.val_set is None:
            self.val_set = CocoEvalDataset(self._load("val"))
        if stage == "predict":
            self.setup_predict()
            self._load_categories()

    def _load_categories(self) -> None:
        """Category ids and names for the predictions, when an annotation file is at hand."""
        try:
            log.info("%s: category ids and names for the predictions", self.category_map.source)
        except AnnotationError:
            self._category_map = None
            log.info("no annotation file under %s: predictions take the category ids and names the checkpoint "
                     "records, else labels", self.root)

    def loader_options(self, split: str) -> dict[str, Any]:
        if split == "train":  # drop_last: a last batch of one image would fail in BatchNorm on the 1x1 extra map.
            return {"collate_fn": collate_train, "drop_last": len(self.train_set) > self.batch_size}
        return {"collate_fn": collate_eval}

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()


def eval_dataset(images_dir: str | Path, annotation_file: str | Path, num_classes: int) -> tuple[
        CocoEvalDataset, CategoryMap]:
    """The evaluation dataset and category map of one instances file (for scripts)."""
    records, cmap, _ = load_coco(annotation_file, images_dir, num_classes, min_box_size=0.0)
    return CocoEvalDataset(records), cmap

