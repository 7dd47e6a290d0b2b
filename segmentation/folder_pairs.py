"""Image and mask folders: the two layouts, and the listing of their image/mask pairs.

Layout, one of two (:class:`~segmentation.folder.MaskFolderDataModule`'s ``layout="auto"`` takes the first when
``root/images/<train_split>/`` exists)::

    folders                                     lists
    root/classes.yaml                           root/classes.yaml
    root/images/train/<path>.jpg                root/images/<path>.jpg
    root/masks/train/<path>.png                 root/masks/<path>.png
    root/images/val/...  root/masks/val/...     root/train.txt  root/val.txt

An image pairs with the mask of the same relative path without its extension
(``images/train/a/x.jpg`` <-> ``masks/train/a/x.png``); images may be any format
:data:`~mbv3_dense.classification.data.IMAGE_EXTENSIONS` names, masks are PNG (lossless: JPEG would
change the class values). A list file names one image a line, relative to ``images/``, with or without
its extension (``a/x`` or ``a/x.jpg``); blank lines and ``#`` comments are skipped.


Each listing checks what it can without reading pixels and raises :class:`MaskFolderError` naming the file(s):
a missing folder or list file, an image without its mask or a mask without its image, a non-PNG mask, two
images with one stem, a list entry twice.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from mbv3_dense.data.listing import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

MASK_SUFFIX = ".png"
# Errors show this many problems (and the count of all).
_SHOWN = 5


class MaskFolderError(ValueError):
    """The folders, list files or file pairs are not what the layout promises; names the file(s)."""


class Pair(NamedTuple):
    """An image and its mask; ``name`` is the relative path without extension that pairs them."""

    image: Path
    mask: Path
    name: str


def raise_problems(what: str, problems: list[str], total: int) -> None:
    """Raise :class:`MaskFolderError` listing the first ``problems`` (of ``total`` items) when there are any."""
    if problems:
        shown = "; ".join(problems[:_SHOWN])
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise MaskFolderError(f"{what}: {len(problems)} of {total} are unusable: {shown}{more}")


def _walk(folder: Path) -> list[Path]:
    """Every file under ``folder`` (symlinks followed, hidden files and folders left out), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return files


def _stem(path: Path, folder: Path) -> str:
    return PurePosixPath(path.relative_to(folder).as_posix()).with_suffix("").as_posix()


def list_folder_pairs(root: str | Path, split: str) -> list[Pair]:
    """The pairs of ``root/images/<split>/`` and ``root/masks/<split>/``, sorted by name.

    Raises:
        MaskFolderError: a missing or imageless folder; an image without a mask or a mask without an image
            (naming the file and the path it was looked for at); a mask that is not PNG; two images (or
            masks) with one name.
    """
    root = Path(root)
    image_dir, mask_dir = root / "images" / split, root / "masks" / split
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise MaskFolderError(f"{folder}: no such folder (expected root/images/{split}/ and root/masks/{split}/, "
                                  f"or list files with layout: lists)")
    images: dict[str, list[Path]] = defaultdict(list)
    other = []
    for path in _walk(image_dir):
        (images[_stem(path, image_dir)].append(path) if path.suffix.lower() in IMAGE_EXTENSIONS
         else other.append(path))
    if not images:
        raise MaskFolderError(f"{image_dir}: holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    if other:
        log.warning("%s: %d files are not images by their extension and were left out: %s", image_dir, len(other),
                    ", ".join(str(p) for p in other[:5]))
    masks: dict[str, list[Path]] = defaultdict(list)
    problems = []
    for path in _walk(mask_dir):
        if path.suffix.lower() == MASK_SUFFIX:
            masks[_stem(path, mask_dir)].append(path)
        elif path.suffix.lower() in IMAGE_EXTENSIONS:
            problems.append(f"{path}: masks must be PNG (lossless; JPEG compression changes class values)")
    for name, paths in sorted(images.items()):
        if len(paths) > 1:
            problems.append(f"{paths[0]} and {paths[1]}: two images named {name!r} (one mask cannot pair with both)")
        if name not in masks:
            problems.append(f"{paths[0]}: no mask (expected {mask_dir / name}{MASK_SUFFIX})")
    for name, paths in sorted(masks.items()):
        if name not in images:
            problems.append(f"{paths[0]}: mask without an image (expected {image_dir / name}.<jpg|png|...>)")
    raise_problems(f"{root} ({split}): image and mask files", problems, len(images) + len(masks))
    return [Pair(images[name][0], masks[name][0], name) for name in sorted(images)]


def list_listed_pairs(root: str | Path, list_file: str) -> list[Pair]:
    """The pairs named by ``root/<list_file>`` (entries relative to ``root/images/``; masks in ``root/masks/``).

    Raises:
        MaskFolderError: a missing or empty list file; an entry that is absolute or leaves ``images/``, names
            no image, two images (``x.jpg`` and ``x.png`` for ``x``), or an image without a mask; an entry
            listed twice (each naming the list file and line).
    """
    root = Path(root)
    list_path = root / list_file
    if not list_path.is_file():
        raise MaskFolderError(f"{list_path}: no such list file (expected one image a line, relative to "
                              f"{root / 'images'}; or root/images/<split>/ folders with layout: folders)")
    image_dir, mask_dir = root / "images", root / "masks"
    listings: dict[Path, dict[str, list[Path]]] = {}

    def candidates(entry: PurePosixPath) -> list[Path]:
        parent = image_dir / entry.parent
        if parent not in listings:
            found: dict[str, list[Path]] = defaultdict(list)
            if parent.is_dir():
                for child in sorted(parent.iterdir()):
                    if child.suffix.lower() in IMAGE_EXTENSIONS and child.is_file():
                        found[child.stem].append(child)
                        found[child.name].append(child)
            listings[parent] = found
        return listings[parent].get(entry.name, [])

    pairs, problems, seen = [], [], {}
    lines = list_path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{list_path}:{number}"
        entry = PurePosixPath(text.replace("\\", "/"))
        if entry.is_absolute() or ".." in entry.parts:
            problems.append(f"{where}: {text!r} must be a path relative to {image_dir}")
            continue
        found = candidates(entry)
        if not found:
            problems.append(f"{where}: {text!r} names no image under {image_dir} ({', '.join(IMAGE_EXTENSIONS)})")
            continue
        if len(found) > 1:
            problems.append(f"{where}: {text!r} names {len(found)} images ({', '.join(str(p) for p in found)}); "
                            "list it with its extension")
            continue
        name = _stem(found[0], image_dir)
        if name in seen:
            problems.append(f"{where}: {text!r} is listed twice (first at line {seen[name]})")
            continue
        seen[name] = number
        mask = mask_dir / f"{name}{MASK_SUFFIX}"
        if not mask.is_file():
            problems.append(f"{where}: {found[0]}: no mask (expected {mask})")
            continue
        pairs.append(Pair(found[0], mask, name))
    if not pairs and not problems:
        raise MaskFolderError(f"{list_path}: the list file names no image")
    raise_problems(f"{list_path}: entries", problems, len(pairs) + len(problems))
    return pairs


__all__ = ["MASK_SUFFIX", "MaskFolderError", "Pair", "list_folder_pairs", "list_listed_pairs", "raise_problems"]
