"""COCO annotations: read with pycocotools, checked, and converted once.

COCO ``bbox`` XYWH -> XYXY pixels, and COCO category ids <-> the model's labels
(:class:`CategoryMap`). Every problem names the file and the image or annotation id.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor

from mbv3_dense.checkpoints.classes import BACKGROUND, ClassInfo, check_class_info, check_unique_names
from mbv3_dense.errors import InputError

log = logging.getLogger(__name__)


class AnnotationError(InputError, ValueError):
    """An annotation file or entry that cannot be used; the message names the file and the entry."""


class CategoryMap:
    """COCO category ids <-> model labels (0 is background), the one place they are converted.

    With ``num_classes == len(categories) + 1`` (or ``None``) labels are contiguous (the i-th category by
    id is label i + 1: 81 classes for COCO); with ``num_classes`` above the largest id the label *is* the
    category id (torchvision's 91-class layout). Anything else is an error.

    Args:
        category_ids: the ids of the annotation file's ``categories``.
        num_classes: the model's classes including background; ``None``: contiguous.
        source: named in error messages (the annotation file).
        names: category id -> name (the file's ``categories``); missing ones are named by their id.
    """

    def __init__(self, category_ids: list[int], num_classes: int | None, source: str = "annotations",
                 names: dict[int, str] | None = None) -> None:
        ids = sorted(int(i) for i in category_ids)
        if not ids:
            raise AnnotationError(f"{source}: no categories")
        if len(set(ids)) != len(ids):
            raise AnnotationError(f"{source}: category ids listed more than once: "
                                  f"{sorted({i for i in ids if ids.count(i) > 1})}")
        self.source = source
        if num_classes is None:
            num_classes = len(ids) + 1
        self.num_classes = num_classes
        if num_classes == len(ids) + 1:
            self.layout = "contiguous"
            self.label_to_id = [0, *ids]
        elif num_classes > ids[-1]:
            self.layout = "category_id"
            self.label_to_id = list(range(num_classes))
        else:
            raise AnnotationError(
                f"{source}: {len(ids)} categories (ids up to {ids[-1]}) are more than a model of num_classes="
                f"{num_classes} can hold: it takes {num_classes - 1} categories with contiguous labels, or ids "
                f"below {num_classes} as labels; use num_classes {len(ids) + 1} (contiguous, or null to follow the "
                f"file) or above {ids[-1]} (label = category id)")
        self.category_ids = ids
        self.names = {int(k): str(v) for k, v in (names or {}).items()}
        self._id_to_label = {c: self.label_to_id.index(c) for c in ids}

    @classmethod
    def from_class_info(cls, info: dict, source: str = "checkpoint") -> CategoryMap:
        """The map a checkpoint's class info describes (``names`` and ``category_ids`` per label)."""
        ids = info.get("category_ids") or list(range(len(info["names"])))
        names = dict(zip(ids, info["names"], strict=True))
        return cls([i for i in ids[1:] if names[i] != "N/A"], len(ids), source, names)

    @property
    def class_names(self) -> list[str]:
        """The name of each label: background first; in the category-id layout, unused ids are ``N/A``
        (as torchvision's COCO list)."""
        known = set(self.category_ids)
        return [BACKGROUND if i == 0 else (self.names.get(c, str(c)) if c in known else "N/A")
                for i, c in enumerate(self.label_to_id)]

    @property
    def class_info(self) -> ClassInfo:
        """What checkpoints record (:mod:`mbv3_dense.checkpoints.classes`): names and the category id of each label."""
        return check_class_info({"names": self.class_names, "category_ids": self.label_to_id}, self.source)

    def to_label(self, category_id: int, where: str = "") -> int:
        """Model label of a category id. Raises AnnotationError naming the unknown id."""
        try:
            return self._id_to_label[int(category_id)]
        except KeyError:
            raise AnnotationError(
                f"{self.source}: {where + ': ' if where else ''}unknown category_id {category_id} "
                f"(categories: {self.category_ids})") from None

    def to_category_ids(self, labels: Tensor) -> Tensor:
        """Model labels ``[K]`` -> COCO category ids ``[K]`` (vectorised lookup)."""
        table = torch.as_tensor(self.label_to_id, dtype=torch.int64, device=labels.device)
        return table[labels.long()]


def read_categories(annotation_file: str | Path, num_classes: int | None) -> CategoryMap:
    """The category map of an instances file's ``categories`` (ids and names), without reading its images.

    Raises:
        AnnotationError: missing or unreadable file, no categories, or more categories than ``num_classes``
            holds; duplicated names (two categories one name) are refused too.
    """
    path = Path(annotation_file)
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found")
    try:
        categories = json.loads(path.read_text())["categories"]
        ids = [int(c["id"]) for c in categories]
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in categories}
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{path}: cannot read its categories ({type(err).__name__}: {err})") from err
    try:
        check_unique_names(list(names.values()), f"{path} (categories)")
    except ValueError as err:
        raise AnnotationError(str(err)) from err
    return CategoryMap(ids, num_classes, str(path), names)


@dataclass
class ImageRecord:
    """One image and its cleaned annotations (XYXY, original pixels)."""

    image_id: int
    path: Path
    height: int
    width: int
    boxes: np.ndarray  # [G, 4] float32
    labels: np.ndarray  # [G] int64
    iscrowd: np.ndarray  # [G] bool
    area: np.ndarray  # [G] float32 (the annotation's area, as COCOeval uses)


@dataclass
class LoadStats:
    """What cleaning did; logged when a dataset is built."""

    images: int = 0
    boxes: int = 0
    clamped: int = 0
    dropped_degenerate: int = 0
    crowd: int = 0
    images_without_boxes: int = 0
    notes: list[str] = field(default_factory=list)


_IMAGE_KEYS = ("id", "file_name", "height", "width")
_ANNOTATION_KEYS = ("id", "image_id", "category_id", "bbox")


def validate_coco_dict(data: object, source: str) -> None:
    """Check the structure of a parsed instances file before pycocotools indexes it.

    Raises:
        AnnotationError: naming ``source`` and the first offending entry: a missing top-level key
            (``images``, ``annotations``, ``categories``), an entry without a required key, a
            ``bbox`` that is not four numbers, a duplicate image or annotation id, or annotations
            whose ``image_id`` is not among the images (counted, first ones named).
    """
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: expected a JSON object with images/annotations/categories, "
                              f"got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{source}: missing or non-list top-level key {key!r} (is this an instances "
                                  "file? image_info_*.json files have no annotations)")
    for kind, entries, keys in (("image", data["images"], _IMAGE_KEYS),
                                ("annotation", data["annotations"], _ANNOTATION_KEYS),
                                ("category", data["categories"], ("id",))):
        for i, entry in enumerate(entries):
            missing = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if missing:
                ident = entry.get("id", f"#{i}") if isinstance(entry, dict) else f"#{i}"
                raise AnnotationError(f"{source}: {kind} {ident} has no {', '.join(missing)}")
    for kind, entries in (("image", data["images"]), ("annotation", data["annotations"])):
        seen: set = set()
        for entry in entries:
            if entry["id"] in seen:
                raise AnnotationError(f"{source}: duplicate {kind} id {entry['id']}")
            seen.add(entry["id"])
    image_ids = {img["id"] for img in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        first = ", ".join(f"annotation {a['id']} -> image {a['image_id']}" for a in orphans[:3])
        raise AnnotationError(f"{source}: {len(orphans)} annotations refer to images that are not in 'images' "
                              f"({first}{', ...' if len(orphans) > 3 else ''})")
    for ann in data["annotations"]:
        box = ann["bbox"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
            raise AnnotationError(f"{source}: annotation {ann['id']} of image {ann['image_id']}: bbox {box!r} "
                                  "is not four finite numbers [x, y, width, height]")


def missing_image_files(records: list[ImageRecord]) -> list[Path]:
    """The records whose image file does not exist (one ``stat`` each)."""
    return [r.path for r in records if not r.path.is_file()]


def load_coco(annotation_file: str | Path, images_dir: str | Path, num_classes: int | None,
              min_box_size: float = 1.0, *, category_map: CategoryMap | None = None,
              ) -> tuple[list[ImageRecord], CategoryMap, LoadStats]:
    """Read a COCO instances file into records, clamping boxes to the image.

    Labels follow ``category_map`` when given (the data module's, so that both splits share one), else the
    file's own categories with ``num_classes`` (``None``: contiguous).

    Boxes partly outside the image are clamped to it; boxes narrower or lower than ``min_box_size``
    pixels after clamping (degenerate, or entirely outside) are dropped. Both are counted.

    Raises:
        AnnotationError: unreadable or malformed JSON, missing keys, malformed boxes, duplicate image
            ids, annotations of images that are not listed, or an unknown ``category_id`` (each named
            with the file and the entry).
    """
    annotation_file, images_dir = Path(annotation_file), Path(images_dir)
    if not annotation_file.is_file():
        raise AnnotationError(f"{annotation_file}: annotation file not found")
    try:
        data = json.loads(annotation_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise AnnotationError(f"{annotation_file}: not valid JSON ({err})") from err
    validate_coco_dict(data, str(annotation_file))
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    names = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
    cmap = category_map or CategoryMap(coco.getCatIds(), num_classes, str(annotation_file), names)
    stats = LoadStats()
    records = []
    for image_id in sorted(coco.getImgIds()):
        info = coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        boxes, labels, crowd, areas = [], [], [], []
        for ann in coco.imgToAnns.get(image_id, []):
            where = f"annotation {ann.get('id')} of image {image_id}"
            label = cmap.to_label(ann["category_id"], where)
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            box = np.array([x, y, x + bw, y + bh], dtype=np.float32)
            clamped = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
            if clamped[2] - clamped[0] < min_box_size or clamped[3] - clamped[1] < min_box_size:
                stats.dropped_degenerate += 1
                continue
            if not np.array_equal(clamped, box):
                stats.clamped += 1
            boxes.append(clamped)
            labels.append(label)
            crowd.append(bool(ann.get("iscrowd", 0)))
            areas.append(float(ann.get("area", bw * bh)))
        stats.boxes += len(boxes)
        stats.crowd += sum(crowd)
        if not any(not c for c in crowd):
            stats.images_without_boxes += 1
        records.append(ImageRecord(
            image_id=int(image_id), path=images_dir / info["file_name"], height=h, width=w,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4), labels=np.asarray(labels, dtype=np.int64),
            iscrowd=np.asarray(crowd, dtype=bool), area=np.asarray(areas, dtype=np.float32)))
    stats.images = len(records)
    return records, cmap, stats
