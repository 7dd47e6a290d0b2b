"""A small generated COCO-format detection dataset for demos and tests.

Layout (the real COCO one): ``root/{train2017,val2017}/*.jpg`` and
``root/annotations/instances_{train,val}2017.json``. Objects are filled shapes (one shape per
category, random colour, size, rotation) on noisy two-colour gradients with faint distractor
strokes. Categories carry real, non-contiguous COCO ids and names. Some images have no object, a
few have an ``iscrowd`` region (a cluster of small shapes under one box, RLE segmentation), and the
validation split is drawn from a different random stream than the training split.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

# (COCO category id, name, shape): real ids, deliberately not contiguous.
Category = tuple[int, str, str]
CATEGORIES: tuple[Category, ...] = (
    (1, "person", "circle"),
    (3, "car", "square"),
    (18, "dog", "triangle"),
    (44, "bottle", "star"),
)
_SPLIT_STREAM = {"train": 0, "val": 1}


@dataclass(frozen=True)
class DetectionSpec:
    """What to generate.

    Attributes:
        train_images / val_images: images per split.
        min_side / max_side: image sides are drawn in this range (pixels).
        min_object / max_object: object sizes (box side, pixels).
        max_objects: objects per image (1..max_objects, or none for ``empty_fraction`` of images).
        empty_fraction: share of images without any object.
        crowd_fraction: share of images with one ``iscrowd`` region.
        seed: base seed; the split and image index select independent streams.
        categories: ``(category id, name, shape)`` of each category; shapes: ``circle``, ``square``,
            ``triangle``, ``star``, ``hexagon``, ``cross``.
    """

    train_images: int = 400
    val_images: int = 60
    min_side: int = 288
    max_side: int = 384
    min_object: int = 56  # SSDLite320's smallest default box is ~64 px: far smaller objects go unfound
    max_object: int = 150
    max_objects: int = 4
    empty_fraction: float = 0.05
    crowd_fraction: float = 0.1
    seed: int = 0
    categories: tuple[Category, ...] = CATEGORIES


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    if shape == "circle":
        return None
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(angle + math.pi * k / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(angle + math.pi * k / 5)) for k in range(10)]
    if shape == "cross":
        w = 0.35 * r
        arm = [(r, w), (w, w), (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w), (-w, -r), (w, -r), (w, -w),
               (r, -w)]
        c, s = math.cos(angle), math.sin(angle)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in arm]
    sides = {"square": 4, "triangle": 3, "hexagon": 6}[shape]
    return [(cx + r * math.cos(angle + 2 * math.pi * k / sides), cy + r * math.sin(angle + 2 * math.pi * k / sides))
            for k in range(sides)]


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, angle: float,
          colour: tuple[int, int, int]) -> tuple[float, float, float, float]:
    """Draw one shape; returns its tight XYXY box."""
    poly = _shape_polygon(shape, cx, cy, r, angle)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        return cx - r, cy - r, cx + r, cy + r
    draw.polygon(poly, fill=colour)
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return min(xs), min(ys), max(xs), max(ys)


def _background(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = a * (1 - t) + b * t + np.zeros((h, w, 3))
    img += rng.normal(0, 18, (h, w, 3))
    img = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 6)):  # faint distractor strokes
        x0, y0, x1, y1 = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0, h)
        draw.line([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)), width=int(rng.integers(1, 4)))
    return img


def _image(rng: np.random.Generator, spec: DetectionSpec, image_id: int) -> tuple[Image.Image, list[dict]]:
    w, h = (int(v) for v in rng.integers(spec.min_side, spec.max_side + 1, 2))
    img = _background(rng, h, w)
    draw = ImageDraw.Draw(img)
    anns: list[dict] = []
    n = 0 if rng.random() < spec.empty_fraction else int(rng.integers(1, spec.max_objects + 1))
    placed: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _attempt in range(20):
            side = rng.uniform(spec.min_object, min(spec.max_object, 0.8 * min(w, h)))
            r = side / 2
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            box = (cx - r, cy - r, cx + r, cy + r)
            # Keep objects mostly apart so every box stays visible.
            if all(min(box[2], p[2]) - max(box[0], p[0]) < 0.3 * side or
                   min(box[3], p[3]) - max(box[1], p[1]) < 0.3 * side for p in placed):
                break
        else:
            continue
        placed.append(box)
        cat_id, _, shape = spec.categories[int(rng.integers(len(spec.categories)))]
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0, x1, y1 = _draw(draw, shape, cx, cy, r, rng.uniform(0, 2 * math.pi), colour)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        anns.append({"image_id": image_id, "category_id": cat_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": 0,
                     "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
    if rng.random() < spec.crowd_fraction:
        cat_id, _, shape = spec.categories[int(rng.integers(len(spec.categories)))]
        gx, gy = rng.uniform(0, w - 80), rng.uniform(0, h - 80)
        for _ in range(5):  # a cluster of small shapes under one crowd box
            _draw(draw, shape, gx + rng.uniform(8, 72), gy + rng.uniform(8, 72), 8, rng.uniform(0, 6.3),
                  tuple(int(v) for v in rng.integers(0, 256, 3)))
        mask = np.zeros((h, w), dtype=np.uint8, order="F")
        mask[int(gy):int(gy) + 80, int(gx):int(gx) + 80] = 1
        rle = mask_utils.encode(mask)
        anns.append({"image_id": image_id, "category_id": cat_id, "bbox": [gx, gy, 80.0, 80.0], "area": 6400.0,
                     "iscrowd": 1, "segmentation": {"counts": rle["counts"].decode("ascii"), "size": [h, w]}})
    return img, anns


def write_coco_split(root: str | Path, split: str, spec: DetectionSpec) -> Path:
    """Write ``root/<split>2017/*.jpg`` and ``root/annotations/instances_<split>2017.json``; returns the JSON path."""
    root = Path(root)
    count = spec.train_images if split == "train" else spec.val_images
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([spec.seed, _SPLIT_STREAM[split], index])
        image_id = 1 + index + (0 if split == "train" else 100000)  # COCO ids are arbitrary integers
        img, anns = _image(rng, spec, image_id)
        name = f"{image_id:012d}.jpg"
        img.save(image_dir / name, quality=92)
        images.append({"id": image_id, "file_name": name, "width": img.width, "height": img.height})
        for ann in anns:
            ann["id"] = len(annotations) + 1
            annotations.append(ann)
    out = root / "annotations" / f"instances_{split}2017.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"info": {"description": "mbv3-dense generated shapes (COCO format)"}, "licenses": [],
            "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n, _ in spec.categories]}
    out.write_text(json.dumps(data))
    return out


def generate_coco(root: str | Path, spec: DetectionSpec = DetectionSpec()) -> dict[str, int]:
    """Write both splits; returns ``{"train": images, "val": images}``."""
    write_coco_split(root, "train", spec)
    write_coco_split(root, "val", spec)
    return {"train": spec.train_images, "val": spec.val_images}
