"""A small generated ImageFolder dataset for demos and tests: shapes and textures on noisy backgrounds.

Each class is one kind of figure (``circle``, ``square``, ``triangle``, ...) drawn with a random
colour, size, position and rotation over a random two-colour gradient background with pixel
noise and a few distractor blobs, so that a classifier has to learn shape rather than colour.
Every image is drawn from its own random stream keyed by ``(seed, split, class, index)``: the
output is deterministic for a seed, the validation split never repeats a training image, and
no two images are alike.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Supersampling factor: figures are drawn larger and downsampled, which antialiases their edges.
_SUPERSAMPLE = 2
_SPLITS = {"train": 0, "val": 1}


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _circle(d: ImageDraw.ImageDraw, cx, cy, r, angle, colour, rng) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)


def _square(d, cx, cy, r, angle, colour, rng) -> None:
    d.polygon(_polygon(cx, cy, r, 4, angle), fill=colour)


def _triangle(d, cx, cy, r, angle, colour, rng) -> None:
    d.polygon(_polygon(cx, cy, r, 3, angle), fill=colour)


def _cross(d, cx, cy, r, angle, colour, rng) -> None:
    w = r * rng.uniform(0.25, 0.4)
    for bar in ([(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)]):
        d.polygon(_rotated(bar, cx, cy, angle), fill=colour)


def _ring(d, cx, cy, r, angle, colour, rng) -> None:
    d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r * rng.uniform(0.2, 0.35))))


def _star(d, cx, cy, r, angle, colour, rng) -> None:
    inner = r * rng.uniform(0.35, 0.5)
    points = [(cx + (r if k % 2 == 0 else inner) * math.cos(angle + math.pi * k / 5),
               cy + (r if k % 2 == 0 else inner) * math.sin(angle + math.pi * k / 5)) for k in range(10)]
    d.polygon(points, fill=colour)


def _stripes(d, cx, cy, r, angle, colour, rng) -> None:
    bars = int(rng.integers(3, 6))
    pitch = 2 * r / bars
    for k in range(bars):
        x0 = cx - r + k * pitch
        bar = [(x0, cy - r), (x0 + pitch * 0.5, cy - r), (x0 + pitch * 0.5, cy + r), (x0, cy + r)]
        d.polygon(_rotated(bar, cx, cy, angle), fill=colour)


def _checker(d, cx, cy, r, angle, colour, rng) -> None:
    cells = int(rng.integers(3, 5))
    pitch = 2 * r / cells
    for i in range(cells):
        for j in range(cells):
            if (i + j) % 2:
                continue
            x0, y0 = cx - r + i * pitch, cy - r + j * pitch
            cell = [(x0, y0), (x0 + pitch, y0), (x0 + pitch, y0 + pitch), (x0, y0 + pitch)]
            d.polygon(_rotated(cell, cx, cy, angle), fill=colour)


Drawer = Callable[..., None]
# The classes, in order; ``num_classes`` takes the first ones.
KINDS: dict[str, Drawer] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "ring": _ring,
    "star": _star,
    "stripes": _stripes,
    "checker": _checker,
}


def draw_image(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``kind`` (a key of :data:`KINDS`)."""
    big = size * _SUPERSAMPLE
    # Background: a linear gradient between two random colours, plus pixel noise (added below).
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:big, 0:big] / big
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    background = c0 * (1 - t[..., None]) + c1 * t[..., None]
    img = Image.fromarray(background.astype(np.uint8))
    d = ImageDraw.Draw(img)
    # Distractors: specks that belong to no class (kept small: larger round blobs read as circles).
    for _ in range(int(rng.integers(0, 4))):
        bx, by, br = rng.uniform(0, big), rng.uniform(0, big), rng.uniform(0.015, 0.035) * big
        d.ellipse([bx - br, by - br, bx + br, by + br], fill=tuple(int(v) for v in rng.uniform(0, 255, 3)))
    # The figure: a colour far enough from the local background to be visible.
    r = rng.uniform(0.26, 0.44) * big
    cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
    bg_here = background[int(cy), int(cx)]
    colour = rng.uniform(0, 255, 3)
    for _ in range(20):
        if np.abs(colour - bg_here).sum() > 150:
            break
        colour = rng.uniform(0, 255, 3)
    KINDS[kind](d, cx, cy, r, rng.uniform(0, 2 * math.pi), tuple(int(v) for v in colour), rng)
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(4, 16), (size, size, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@dataclass(frozen=True)
class ImageFolderSpec:
    """What to generate.

    Attributes:
        num_classes: how many of :data:`KINDS` to use (at most ``len(KINDS)``), the first ones.
        classes: the kinds to use, by name (a dataset with other classes, e.g. to fine-tune on);
            replaces ``num_classes`` when given.
        train_per_class: training images per class.
        val_per_class: validation images per class (drawn from other random streams).
        size: side of the square images in pixels.
        seed: the dataset seed; the same seed writes the same files.
    """

    num_classes: int = 6
    classes: tuple[str, ...] | None = None
    train_per_class: int = 200
    val_per_class: int = 50
    size: int = 64
    seed: int = 0


def generate_imagefolder(root: str | Path, spec: ImageFolderSpec = ImageFolderSpec()) -> dict[str, int]:
    """Write ``root/{train,val}/<class>/<kind>_<index>.jpg``; returns ``{"train": images, "val": images}``
    (the call shape of :func:`detection.synthetic.generate_coco` and
    :func:`segmentation.synthetic.generate_cityscapes`; existing files with the same names are overwritten)."""
    kinds = list(spec.classes) if spec.classes is not None else list(KINDS)[:spec.num_classes]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not 1 <= len(kinds) <= len(KINDS) or len(set(kinds)) != len(kinds):
        raise ValueError(f"classes must be 1 to {len(KINDS)} distinct kinds of {list(KINDS)}, got {kinds}")
    if spec.size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {spec.size}")
    root = Path(root)
    counts = {}
    for split, count in (("train", spec.train_per_class), ("val", spec.val_per_class)):
        for kind in kinds:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([spec.seed, _SPLITS[split], list(KINDS).index(kind), i])
                draw_image(kind, spec.size, rng).save(folder / f"{kind}_{i:05d}.jpg", quality=92)
        counts[split] = count * len(kinds)
    return counts


def write_imagefolder(root: str | Path, **spec: object) -> Path:
    """:func:`generate_imagefolder` with the :class:`ImageFolderSpec` fields as keywords; returns ``root``."""
    generate_imagefolder(root, ImageFolderSpec(**spec))
    return Path(root)
