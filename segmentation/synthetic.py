"""A small generated Cityscapes tree: street-like scenes with real Cityscapes labelIds.

Each scene has a sky, a row of buildings with windows, a road in perspective with sidewalks on
either side, trees (vegetation), cars on the road, people on the sidewalks, traffic signs on
poles, and some ignore pixels (an ego-vehicle strip, labelId 1). Layouts, colours, textures and
noise are random; the validation split uses other cities and another seed, so it is held out.

The files follow the official layout and naming (``<city>_<seq>_<frame>_leftImg8bit.png``,
``<city>_<seq>_<frame>_gtFine_labelIds.png``), so the data module and the official evaluator
read them as they read Cityscapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageDraw

TRAIN_CITIES = ("aachen", "bochum", "cologne")
VAL_CITIES = ("frankfurt", "lindau", "munster")

_ID = {name: name2label[name].id for name in (
    "sky", "building", "road", "sidewalk", "vegetation", "car", "person", "traffic sign", "pole", "ego vehicle")}
#: Train classes the generated scenes contain (names as in the Cityscapes table).
PRESENT_CLASSES = ("road", "sidewalk", "building", "vegetation", "sky", "person", "car", "traffic sign", "pole")


@dataclass(frozen=True)
class CityscapesSpec:
    """Size of the generated tree.

    Attributes:
        height: image height.
        width: image width.
        train_per_city: training images per train city.
        val_per_city: validation images per val city.
        seed: seed of the training split; validation uses ``seed + 1000``.
    """

    height: int = 256
    width: int = 512
    train_per_city: int = 40
    val_per_city: int = 4
    seed: int = 0


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in base)


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One street scene: ``(image [H, W, 3] uint8 RGB, labelIds [H, W] uint8)``."""
    h, w = height, width
    img = Image.new("RGB", (w, h))
    lab = Image.new("L", (w, h), 0)
    di, dl = ImageDraw.Draw(img), ImageDraw.Draw(lab)

    def fill(kind: str, shape: str, xy, color) -> None:
        getattr(di, shape)(xy, fill=color)
        getattr(dl, shape)(xy, fill=_ID[kind])

    horizon = int(h * rng.uniform(0.38, 0.52))
    # Sky: a vertical gradient between two blues/greys.
    top, bottom = np.array(_jitter(rng, (70, 130, 200), 30)), np.array(_jitter(rng, (170, 200, 230), 25))
    t = np.linspace(0, 1, horizon)[:, None]
    sky = (top * (1 - t) + bottom * t).astype(np.uint8)
    img.paste(Image.fromarray(np.repeat(sky[:, None, :], w, axis=1)), (0, 0))
    dl.rectangle((0, 0, w, horizon), fill=_ID["sky"])
    # Buildings: a row of blocks standing on the horizon, with window grids.
    x = int(-rng.integers(0, w // 8))
    while x < w:
        bw = int(rng.integers(w // 10, w // 4))
        top_y = int(rng.integers(int(h * 0.05), max(int(h * 0.06), horizon - h // 10)))
        color = _jitter(rng, tuple(int(v) for v in rng.choice([(120, 110, 100), (150, 140, 130), (110, 90, 80),
                                                                  (160, 150, 120), (90, 90, 100)])), 25)
        fill("building", "rectangle", (x, top_y, x + bw, horizon + 2), color)
        win = tuple(max(0, c - 60) for c in color)
        step = max(6, bw // 6)
        for wx in range(x + step // 2, x + bw - step // 2, step):
            for wy in range(top_y + step // 2, horizon - step // 2, step):
                di.rectangle((wx, wy, wx + step // 3, wy + step // 3), fill=win)  # texture, still building
        x += bw + int(rng.integers(0, w // 20))
    # Road in perspective, sidewalks beside it.
    vx = int(w * rng.uniform(0.35, 0.65))
    left_bottom, right_bottom = int(w * rng.uniform(-0.3, 0.15)), int(w * rng.uniform(0.85, 1.3))
    fill("sidewalk", "rectangle", (0, horizon, w, h), _jitter(rng, (200, 180, 190), 25))
    fill("road", "polygon", [(vx - 4, horizon), (vx + 4, horizon), (right_bottom, h), (left_bottom, h)],
         _jitter(rng, (90, 80, 95), 15))
    lane = _jitter(rng, (230, 230, 230), 20)
    for k in range(6):  # dashed centre line: road pixels
        y0 = horizon + (h - horizon) * k / 6
        y1 = y0 + (h - horizon) / 12
        di.line((vx, y0, vx + (w / 2 - vx) * (y0 - horizon) / (h - horizon) * 0.3, y1), fill=lane, width=2)
    # Trees: trunks (vegetation in Cityscapes' annotation of street trees) with round crowns.
    for _ in range(int(rng.integers(1, 4))):
        tx = int(rng.integers(0, w))
        r = int(rng.integers(h // 14, h // 6))
        ty = horizon - int(rng.integers(0, h // 6))
        green = _jitter(rng, (70, 130, 50), 25)
        fill("vegetation", "rectangle", (tx - r // 6, ty, tx + r // 6, horizon + r // 2), (90, 70, 50))
        for _ in range(4):
            ox, oy = int(rng.integers(-r // 2, r // 2 + 1)), int(rng.integers(-r // 2, 1))
            fill("vegetation", "ellipse", (tx + ox - r, ty + oy - r, tx + ox + r, ty + oy + r), green)
    # Traffic signs on poles beside the road.
    for _ in range(int(rng.integers(0, 3))):
        px = int(rng.choice([rng.integers(0, max(1, vx - w // 6)), rng.integers(min(w - 1, vx + w // 6), w)]))
        base = int(rng.integers(horizon + (h - horizon) // 4, h - 5))
        size = max(6, int((base - horizon) * 0.25))
        pole_top = base - 3 * size
        fill("pole", "rectangle", (px - max(1, size // 8), pole_top, px + max(1, size // 8), base),
             _jitter(rng, (150, 150, 150), 20))
        fill("traffic sign", "rectangle", (px - size // 2, pole_top - size, px + size // 2, pole_top),
             _jitter(rng, (230, 210, 20), 25))
    # Cars on the road and people on the sidewalks: larger when nearer (lower in the image).
    objects = [("car", int(rng.integers(1, 4))), ("person", int(rng.integers(1, 4)))]
    placed = []
    for kind, count in objects:
        for _ in range(count):
            base = int(rng.uniform(horizon + (h - horizon) * 0.2, h))
            depth = (base - horizon) / (h - horizon)
            if kind == "car":
                cw, ch = int(w * 0.28 * depth) + 8, int(h * 0.22 * depth) + 5
                cx = int(vx + (rng.uniform(-0.45, 0.45)) * (right_bottom - left_bottom) * depth)
                placed.append((base, kind, cx, cw, ch))
            else:
                pw, ph = int(w * 0.04 * depth) + 3, int(h * 0.35 * depth) + 8
                side = rng.choice([-1, 1])
                edge = left_bottom if side < 0 else right_bottom
                road_x = vx + (edge - vx) * depth
                cx = int(road_x + side * rng.uniform(0.02, 0.12) * w)
                placed.append((base, kind, cx, pw, ph))
    for base, kind, cx, ow, oh in sorted(placed):  # far objects first, near ones occlude them
        if kind == "car":
            body = tuple(int(v) for v in rng.integers(20, 235, size=3))
            fill("car", "rounded_rectangle" if ow > 12 else "rectangle",
                 (cx - ow // 2, base - oh, cx + ow // 2, base), body)
            di.rectangle((cx - ow // 3, base - oh + oh // 8, cx + ow // 3, base - oh // 2), fill=(40, 50, 60))
            for wx in (cx - ow // 3, cx + ow // 3):
                fill("car", "ellipse", (wx - oh // 5, base - oh // 5, wx + oh // 5, base + oh // 6), (15, 15, 15))
        else:
            cloth = tuple(int(v) for v in rng.integers(20, 220, size=3))
            fill("person", "rectangle", (cx - ow // 2, base - oh + oh // 5, cx + ow // 2, base), cloth)
            head = max(2, oh // 10)
            fill("person", "ellipse", (cx - head, base - oh, cx + head, base - oh + 2 * head), (225, 180, 150))
    # Ego vehicle at the bottom in some frames (ignored in evaluation, labelId 1).
    if rng.random() < 0.5:
        fill("ego vehicle", "rectangle", (0, h - int(h * rng.uniform(0.04, 0.1)), w, h), (30, 30, 35))
    image = np.asarray(img, dtype=np.float32)
    # Texture and sensor noise, and a global brightness change.
    noise = rng.normal(0, rng.uniform(4, 12), size=image.shape).astype(np.float32)
    image = (image * rng.uniform(0.75, 1.2) + noise).clip(0, 255).astype(np.uint8)
    return image, np.asarray(lab, dtype=np.uint8)


def write_split(root: Path, split: str, cities: tuple[str, ...], per_city: int, *, height: int, width: int,
                seed: int) -> int:
    """Write ``per_city`` scenes for each city of ``split``; returns the number of images."""
    rng = np.random.default_rng(seed)
    for city in cities:
        image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_city):
            stem = f"{city}_{i:06d}_{19 + i % 7:06d}"
            image, label_ids = render_scene(rng, height, width)
            Image.fromarray(image).save(image_dir / f"{stem}_leftImg8bit.png")
            Image.fromarray(label_ids, mode="L").save(label_dir / f"{stem}_gtFine_labelIds.png")
    return len(cities) * per_city


def generate_cityscapes(root: str | Path, spec: CityscapesSpec = CityscapesSpec()) -> dict[str, int]:
    """Write a generated Cityscapes tree (``train`` and ``val``) under ``root``; returns images per split."""
    root = Path(root)
    return {
        "train": write_split(root, "train", TRAIN_CITIES, spec.train_per_city, height=spec.height,
                             width=spec.width, seed=spec.seed),
        "val": write_split(root, "val", VAL_CITIES, spec.val_per_city, height=spec.height, width=spec.width,
                           seed=spec.seed + 1000),
    }


# The name before the three generators were named alike.
SyntheticSpec = CityscapesSpec
