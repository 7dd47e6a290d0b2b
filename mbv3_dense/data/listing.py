"""Image files: which names are images, and the images a user names (a folder, a glob, a list file, one image).

- :data:`IMAGE_EXTENSIONS` and :func:`is_image_name`: what every image folder reader here counts as an image.
- :func:`list_images` turns what the user typed (a folder, read recursively; a glob; a text file of
  paths, one a line, relative ones taken from the text file's folder; a single image) into a sorted
  list of image files, each with a unique output name (its path under the common folder, without
  the extension) and an ``image_id`` (the file name when every name is a distinct number, as COCO's
  ``000000397133.jpg``, else a running id from 1 in sorted order).
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from pathlib import Path
from typing import NamedTuple

from mbv3_dense.errors import InputError

log = logging.getLogger(__name__)

#: File name endings read as images (compared case-insensitively).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
LIST_SUFFIXES = (".txt", ".lst")
_GLOB_CHARS = set("*?[")


class ImageListError(InputError, FileNotFoundError):
    """The images to predict on cannot be listed: a missing path, or nothing to predict on (names it)."""


class ImageFile(NamedTuple):
    """One image to predict on. ``name``: unique output name (posix path, no extension)."""

    path: Path
    name: str
    image_id: int


class ImageList(NamedTuple):
    files: list[ImageFile]
    root: Path  # the folder output names are relative to
    ignored: list[Path]  # files in a listed folder that are not images by their extension


def is_image_name(name: str) -> bool:
    """Whether a file name is an image's by its extension (:data:`IMAGE_EXTENSIONS`, any case); hidden files are not."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(spec: str | Path) -> ImageList:
    """The image files that ``spec`` names, sorted, with output names and image ids.

    Raises:
        ImageListError: ``spec`` does not exist, is an empty folder / a glob matching no image / an
            empty list file, or is a file that is neither an image nor a ``.txt``/``.lst`` list.
    """
    text = str(spec)
    ignored: list[Path] = []
    if any(c in _GLOB_CHARS for c in text) and not Path(text).exists():
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        paths = [p for p in matches if is_image_name(p.name)]
        ignored = [p for p in matches if not is_image_name(p.name)]
        if not paths:
            raise ImageListError(f"{text}: the pattern matches no image file ({', '.join(IMAGE_EXTENSIONS)})")
    else:
        path = Path(text).expanduser()
        if path.is_dir():
            paths = []
            for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(filenames):
                    (paths if is_image_name(filename) else ignored).append(Path(dirpath) / filename)
            if not paths:
                what = f"only {len(ignored)} files that are not images by their extension" if ignored else "no files"
                raise ImageListError(f"{path}: no image files to predict on (the folder holds {what}; "
                                     f"image extensions: {', '.join(IMAGE_EXTENSIONS)})")
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            lines = [line.strip() for line in path.read_text().splitlines()]
            paths = [(path.parent / line) if not Path(line).is_absolute() else Path(line)
                     for line in lines if line and not line.startswith("#")]
            if not paths:
                raise ImageListError(f"{path}: the list file names no image")
        elif path.is_file():
            if not is_image_name(path.name):
                raise ImageListError(f"{path}: neither an image ({', '.join(IMAGE_EXTENSIONS)}), a folder, "
                                     f"nor a list of paths ({', '.join(LIST_SUFFIXES)})")
            paths = [path]
        else:
            raise ImageListError(f"{path}: no such file or folder")
    paths = sorted(dict.fromkeys(paths))
    root = Path(os.path.commonpath([str(p.absolute().parent) for p in paths]))
    return ImageList(_name_files(paths, root), root, ignored)


def _name_files(paths: list[Path], root: Path) -> list[ImageFile]:
    rel = [p.absolute().relative_to(root).as_posix() for p in paths]
    stems = [r.rsplit(".", 1)[0] if "." in Path(r).name else r for r in rel]
    clashes = {s for s, n in Counter(stems).items() if n > 1}
    # Two files that differ only by extension keep it (``a_png``, ``a_jpg``): no output is overwritten.
    names = [r.replace(".", "_") if s in clashes else s for r, s in zip(rel, stems, strict=True)]
    numeric = [Path(p).stem for p in paths]
    if all(s.isdigit() for s in numeric) and len(set(map(int, numeric))) == len(numeric):
        ids = [int(s) for s in numeric]
    else:
        ids = list(range(1, len(paths) + 1))
    return [ImageFile(p, n, i) for p, n, i in zip(paths, names, ids, strict=True)]


def note_ignored(images: ImageList, source: str) -> None:
    """Log the files of a listed folder that were left out because they are not images by extension."""
    if images.ignored:
        shown = ", ".join(str(p) for p in images.ignored[:5])
        log.warning("%s: %d files are not images by their extension and were left out: %s%s", source,
                    len(images.ignored), shown, ", ..." if len(images.ignored) > 5 else "")
    log.info("%s: %d images to predict on", source, len(images.files))


def predict_images_for(spec: str | Path | None) -> ImageList:
    """A data module's ``predict_images`` for ``lightning predict``: the listed images, with the files
    left out noted.

    Raises:
        ValueError: no ``--data.predict_images`` given.
        FileNotFoundError: nothing there (:func:`list_images`).
    """
    if spec is None:
        raise ValueError("lightning predict needs the images: --data.predict_images PATH (a folder, a glob or a "
                         "text file of paths)")
    images = list_images(spec)
    note_ignored(images, spec)
    return images
