"""Generated segmentation data: a small Cityscapes tree, and the same streets as image and mask folders.

:func:`generate_cityscapes` writes street-like scenes with real Cityscapes labelIds.

Each scene has a sky, a row of buildings with windows, a road in perspective with sidewalks on
either side, trees (vegetation), cars on the road, people on the sidewalks, traffic signs on
poles, and some ignore pixels (an ego-vehicle strip, labelId 1). Layouts, colours, textures and
noise are random; the validation split uses other cities and another seed, so it is held out.

The files follow the official layout and naming (``<city>_<seq>_<frame>_leftImg8bit.png``,
``<city>_<seq>_<frame>_gtFine_labelIds.png``), so the data module and the official evaluator
read them as they read Cityscapes.

:func:`generate_mask_folders` writes the layout of :mod:`segmentation.folder` (images, masks, a classes
file) with classes chosen by name: the street scene's (road, sky, car, ...) and two surfaces of its own,
grass and water, which take the place of the sidewalks (each side of the road one of the chosen
surfaces). Scene elements whose class is not chosen are ignore pixels. Masks are class-index PNGs or
colour PNGs, images PNG or JPEG.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
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



# ---------------------------------------------------------------------------------------------- mask folders
#: Surfaces the folder generator paints in place of the sidewalks.
SURFACES = ("sidewalk", "grass", "water")
#: Class names :func:`generate_mask_folders` can draw.
FOLDER_VOCABULARY = (*PRESENT_CLASSES, "grass", "water")
#: The default classes: three Cityscapes names, two new surfaces, two more Cityscapes names.
DEFAULT_FOLDER_CLASSES = ("road", "grass", "water", "building", "vegetation", "sky", "car")
# Colours written to the classes file: Cityscapes' palette for its classes, our own for the new surfaces.
_NEW_COLORS = {"grass": (90, 200, 60), "water": (30, 110, 220)}
FOLDER_IGNORE = 255
FOLDER_IGNORE_COLOR = (0, 0, 0)


def folder_class_color(name: str) -> tuple[int, int, int]:
    """The colour the generator gives a class of :data:`FOLDER_VOCABULARY`."""
    return _NEW_COLORS[name] if name in _NEW_COLORS else tuple(name2label[name].color)


@dataclass(frozen=True)
class MaskFolderSpec:
    """Size and form of a generated mask-folder dataset.

    Attributes:
        height: image height.
        width: image width.
        train_images: training images.
        val_images: validation images (another seed: held out).
        seed: seed of the training split; validation uses ``seed + 1000``.
        classes: class names in index order, from :data:`FOLDER_VOCABULARY`.
        image_format: ``"jpg"`` or ``"png"``.
        mask_format: ``"index"`` (8-bit class indices, 255 = ignore) or ``"color"`` (RGB in the class colours,
            black = ignore).
        layout: ``"folders"`` (``images/{train,val}/``) or ``"lists"`` (flat, ``train.txt``/``val.txt``).
        classes_file: the classes file's name (``.yaml``, ``.json`` or ``.txt``; a ``.txt`` has no colours,
            so not with colour masks).
    """

    height: int = 256
    width: int = 512
    train_images: int = 120
    val_images: int = 24
    seed: int = 0
    classes: tuple[str, ...] = DEFAULT_FOLDER_CLASSES
    image_format: Literal["jpg", "png"] = "jpg"
    mask_format: Literal["index", "color"] = "index"
    layout: Literal["folders", "lists"] = "folders"
    classes_file: str = "classes.yaml"


def _check_spec(spec: MaskFolderSpec) -> None:
    unknown = [c for c in spec.classes if c not in FOLDER_VOCABULARY]
    if unknown or not spec.classes or len(set(spec.classes)) != len(spec.classes):
        raise ValueError(f"MaskFolderSpec.classes: distinct names from {FOLDER_VOCABULARY}, got {spec.classes}")
    if spec.image_format not in ("jpg", "png") or spec.mask_format not in ("index", "color") \
            or spec.layout not in ("folders", "lists"):
        raise ValueError(f"MaskFolderSpec: image_format jpg|png, mask_format index|color, layout folders|lists; "
                         f"got {spec.image_format!r}, {spec.mask_format!r}, {spec.layout!r}")
    suffix = Path(spec.classes_file).suffix
    if suffix not in (".yaml", ".yml", ".json", ".txt") or (suffix == ".txt" and spec.mask_format == "color"):
        raise ValueError(f"MaskFolderSpec.classes_file {spec.classes_file!r}: .yaml, .json or .txt (a .txt has no "
                         "colours, so not with colour masks)")


def render_folder_scene(rng: np.random.Generator, height: int, width: int,
                        classes: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A street scene (:func:`render_scene`) with the sidewalk on each side of the road replaced by one of the
    chosen :data:`SURFACES`: ``(image [H, W, 3] uint8 RGB, class indices [H, W] uint8, 255 = ignore)``."""
    image, label_ids = render_scene(rng, height, width)
    image = image.astype(np.float32)
    to_class = np.full(256, FOLDER_IGNORE, dtype=np.uint8)
    for index, name in enumerate(classes):
        if name in _ID:
            to_class[_ID[name]] = index
    out = to_class[label_ids]
    # Left and right of the road's centre, row by row (the road spans the horizon to the bottom).
    road = label_ids == _ID["road"]
    columns = np.arange(width, dtype=np.float32)
    counts = road.sum(1)
    centre = np.where(counts > 0, (road * columns).sum(1) / np.maximum(counts, 1), width / 2)
    left = columns[None, :] < centre[:, None]
    surfaces = [s for s in SURFACES if s in classes] or ["sidewalk"]
    yy = np.arange(height, dtype=np.float32)[:, None]
    for side in (left, ~left):
        surface = surfaces[int(rng.integers(len(surfaces)))]
        where = side & (label_ids == _ID["sidewalk"])
        if surface == "grass":
            base = np.array(_jitter(rng, (70, 140, 50), 20), dtype=np.float32)
            texture = rng.normal(0, 22, size=(height, width, 1)).astype(np.float32)
            image[where] = (base + texture * np.array([0.6, 1.0, 0.4], dtype=np.float32))[where]
        elif surface == "water":
            base = np.array(_jitter(rng, (40, 90, 170), 20), dtype=np.float32)
            waves = 1.0 + 0.18 * np.sin(yy * rng.uniform(0.6, 1.4) + rng.uniform(0, 6.3))
            shade = (base * waves[..., None] + rng.normal(0, 5, size=(height, width, 1))).astype(np.float32)
            image[where] = np.broadcast_to(shade, (height, width, 3))[where]
        out[where] = classes.index(surface) if surface in classes else FOLDER_IGNORE
    return image.clip(0, 255).astype(np.uint8), out


def write_classes_file(path: Path, classes: tuple[str, ...], *, with_colors: bool, ignore_color: bool) -> None:
    """A classes file (:mod:`segmentation.mask_classes`) for ``classes``; the format follows the suffix."""
    if path.suffix == ".txt":
        path.write_text("".join(f"{name}\n" for name in classes))
        return
    entries = [{"name": name, "color": list(folder_class_color(name))} if with_colors else name for name in classes]
    data = {"classes": entries, "ignore_index": FOLDER_IGNORE}
    if ignore_color:
        data["ignore_colors"] = [list(FOLDER_IGNORE_COLOR)]
    path.write_text(json.dumps(data, indent=2) + "\n" if path.suffix == ".json"
                    else yaml.safe_dump(data, sort_keys=False, default_flow_style=None))


def generate_mask_folders(root: str | Path, spec: MaskFolderSpec = MaskFolderSpec()) -> dict[str, int]:
    """Write a generated mask-folder dataset (``train`` and ``val``, layout of :mod:`segmentation.folder`) under
    ``root``; returns images per split. The same spec writes the same files."""
    _check_spec(spec)
    root = Path(root)
    color = spec.mask_format == "color"
    palette = np.array([*(folder_class_color(n) for n in spec.classes)], dtype=np.uint8)
    root.mkdir(parents=True, exist_ok=True)
    write_classes_file(root / spec.classes_file, spec.classes, with_colors=True, ignore_color=color)
    counts = {}
    for split, count, seed in (("train", spec.train_images, spec.seed), ("val", spec.val_images, spec.seed + 1000)):
        rng = np.random.default_rng(seed)
        names = []
        for i in range(count):
            name = f"{split}/scene_{i:04d}" if spec.layout == "folders" else f"{split}_{i:04d}"
            image, classes = render_folder_scene(rng, spec.height, spec.width, spec.classes)
            image_path, mask_path = root / "images" / f"{name}.{spec.image_format}", root / "masks" / f"{name}.png"
            image_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(image_path, **({"quality": 95} if spec.image_format == "jpg" else {}))
            if color:
                rgb = np.zeros((*classes.shape, 3), dtype=np.uint8)  # FOLDER_IGNORE_COLOR where ignored
                valid = classes != FOLDER_IGNORE
                rgb[valid] = palette[classes[valid]]
                Image.fromarray(rgb).save(mask_path)
            else:
                Image.fromarray(classes).save(mask_path)  # uint8 [H, W]: mode L
            names.append(name)
        if spec.layout == "lists":
            (root / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
        counts[split] = count
    return counts
