"""The classes of a mask dataset: the classes file, read into :class:`MaskClasses`.

A mask folder dataset (:mod:`segmentation.folder`) names its classes in one small file, read by
:func:`read_classes_file`. Three forms, chosen by the file's suffix:

``classes.yaml`` / ``classes.yml`` / ``classes.json``::

    classes:                        # index order: the first entry is class 0
      - name: road
        color: [128, 64, 128]       # RGB, 0..255; all classes have one, or none does
      - name: grass
        color: [152, 251, 152]
    ignore_index: 255               # optional (255): the mask value the loss and metrics ignore
    ignore_colors: [[0, 0, 0]]      # optional, colour masks only: colours that mean "ignore"

  An entry may also be a bare name (``- road``) when no class has a colour.

``classes.txt``: one class name per line, in index order; blank lines and lines starting with ``#`` are
skipped; no colours, ignore value 255.

How mask files become class indices under these classes is :mod:`segmentation.mask_decoder`'s.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mbv3_dense.checkpoints.classes import ClassInfo, check_class_info, check_unique_names

DEFAULT_IGNORE_INDEX = 255
#: Names :func:`find_classes_file` looks for in a dataset root, in this order.
CLASSES_FILE_NAMES = ("classes.yaml", "classes.yml", "classes.json", "classes.txt")
_TOP_KEYS = {"classes", "ignore_index", "ignore_colors"}
_CLASS_KEYS = {"name", "color"}


class ClassesFileError(ValueError):
    """A classes file that cannot be used; names the file and what is wrong."""


@dataclass(frozen=True)
class MaskClasses:
    """What a classes file says.

    Attributes:
        names: class names in index order.
        colors: RGB colour of each class, or ``None`` when the file gives none.
        ignore_index: the mask value (index masks) and training target of ignored pixels; not a class index.
        ignore_colors: colours of ignored pixels in colour masks.
        source: the file, for messages.
    """

    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...] | None
    ignore_index: int
    ignore_colors: tuple[tuple[int, int, int], ...]
    source: Path

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def class_info(self) -> ClassInfo:
        """The class info (:mod:`mbv3_dense.checkpoints.classes`): names, ``label_ids`` (the value of each class in
        index masks and in the label PNGs written by ``lightning predict``: its index), colours when the
        file has them, the ignore value."""
        info: dict[str, Any] = {"names": list(self.names), "label_ids": list(range(self.num_classes)),
                                "ignore_index": self.ignore_index}
        if self.colors is not None:
            info["colors"] = [list(c) for c in self.colors]
        return check_class_info(info, str(self.source), self.num_classes)


def find_classes_file(root: str | Path, classes_file: str | None = None) -> Path:
    """The classes file of a dataset: ``classes_file`` (relative to ``root`` unless absolute), or the one
    of :data:`CLASSES_FILE_NAMES` that ``root`` holds.

    Raises:
        ClassesFileError: the named file does not exist, ``root`` holds none or more than one of them.
    """
    root = Path(root)
    if classes_file is not None:
        path = Path(classes_file).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ClassesFileError(f"{path}: classes file not found (classes_file is taken relative to root {root})")
        return path
    found = [root / name for name in CLASSES_FILE_NAMES if (root / name).is_file()]
    if not found:
        raise ClassesFileError(f"{root}: no classes file ({', '.join(CLASSES_FILE_NAMES)}); write one (class names "
                               "in index order, see docs/segmentation.md) or name it with classes_file")
    if len(found) > 1:
        raise ClassesFileError(f"{root}: more than one classes file ({', '.join(p.name for p in found)}); keep one "
                               "or name it with classes_file")
    return found[0]


def _color(value: Any, source: Path, where: str) -> tuple[int, int, int]:
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)):
        raise ClassesFileError(f"{source}: {where}: a colour is [r, g, b] with integers 0..255, got {value!r}")
    return int(value[0]), int(value[1]), int(value[2])


def _parse_structured(data: Any, source: Path) -> MaskClasses:
    if not isinstance(data, Mapping):
        raise ClassesFileError(f"{source}: expected a mapping with a 'classes' list, got {type(data).__name__}")
    unknown = sorted(set(map(str, data)) - _TOP_KEYS)
    if unknown:
        raise ClassesFileError(f"{source}: unknown keys {unknown}; a classes file has {sorted(_TOP_KEYS)}")
    entries = data.get("classes")
    if not isinstance(entries, list) or not entries:
        raise ClassesFileError(f"{source}: 'classes' must be a non-empty list of class names or "
                               "{name, color} entries, in index order")
    names: list[str] = []
    colors: list[tuple[int, int, int] | None] = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            names.append(entry)
            colors.append(None)
            continue
        if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
            raise ClassesFileError(f"{source}: class {i}: expected a name or a mapping with 'name' (and 'color'), "
                                   f"got {entry!r}")
        extra = sorted(set(map(str, entry)) - _CLASS_KEYS)
        if extra:
            raise ClassesFileError(f"{source}: class {i} ({entry['name']!r}): unknown keys {extra}; a class has "
                                   f"{sorted(_CLASS_KEYS)}")
        names.append(entry["name"])
        colors.append(_color(entry["color"], source, f"class {i} ({entry['name']!r})")
                      if entry.get("color") is not None else None)
    with_color = [c is not None for c in colors]
    if any(with_color) and not all(with_color):
        missing = [names[i] for i, has in enumerate(with_color) if not has]
        raise ClassesFileError(f"{source}: some classes have a colour and some do not (without: {missing[:10]}); "
                               "give every class a colour, or none")
    ignore_index = data.get("ignore_index", DEFAULT_IGNORE_INDEX)
    ignore_colors = data.get("ignore_colors") or []
    if not isinstance(ignore_colors, list):
        raise ClassesFileError(f"{source}: 'ignore_colors' must be a list of [r, g, b], got {ignore_colors!r}")
    return _checked(names, tuple(colors) if all(with_color) else None, ignore_index,
                    tuple(_color(c, source, "ignore_colors") for c in ignore_colors), source)


def _checked(names: list[str], colors: tuple | None, ignore_index: Any, ignore_colors: tuple,
             source: Path) -> MaskClasses:
    names = [n.strip() for n in names]
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ClassesFileError(f"{source}: class {empty[0]} has an empty name")
    check_unique_names(names, str(source))
    if len(names) > 255:
        raise ClassesFileError(f"{source}: {len(names)} classes; masks hold 8-bit class indices, at most 255 classes")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not 0 <= ignore_index <= 255:
        raise ClassesFileError(f"{source}: ignore_index must be an integer 0..255, got {ignore_index!r}")
    if ignore_index < len(names):
        raise ClassesFileError(f"{source}: ignore_index {ignore_index} is the index of class {names[ignore_index]!r} "
                               f"(classes are 0..{len(names) - 1}); choose a value of {len(names)} or more, e.g. 255")
    if colors is not None:
        seen: dict[tuple[int, int, int], str] = {}
        for name, color in zip(names, colors, strict=True):
            if color in seen:
                raise ClassesFileError(f"{source}: classes {seen[color]!r} and {name!r} have the same colour "
                                       f"{list(color)}; colour masks could not tell them apart")
            seen[color] = name
        shared = [list(c) for c in ignore_colors if c in seen]
        if shared:
            raise ClassesFileError(f"{source}: ignore_colors {shared} are also class colours")
    return MaskClasses(tuple(names), colors, int(ignore_index), ignore_colors, source)


def read_classes_file(path: str | Path) -> MaskClasses:
    """Read a classes file (format in the module docstring).

    Raises:
        ClassesFileError: unreadable or malformed file, unknown keys, colours that are not ``[r, g, b]``
            0..255, some classes with a colour and some without, two classes with one colour, an
            ignore value that is a class index or outside 0..255, more than 255 classes.
        mbv3_dense.checkpoints.classes.ClassInfoError: a class name that occurs twice.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ClassesFileError(f"{path}: cannot read the classes file ({err})") from err
    suffix = path.suffix.lower()
    if suffix == ".txt":
        names = [line.strip() for line in text.splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise ClassesFileError(f"{path}: names no class (one class name per line, in index order)")
        return _checked(names, None, DEFAULT_IGNORE_INDEX, (), path)
    try:
        if suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif suffix == ".json":
            data = json.loads(text)
        else:
            raise ClassesFileError(f"{path}: unknown classes file type {suffix!r}; use .yaml, .yml, .json or .txt")
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ClassesFileError(f"{path}: not valid {suffix[1:].upper()}: {err}") from err
    return _parse_structured(data, path)


def distinct_palette(num_classes: int) -> np.ndarray:
    """``[num_classes, 3]`` uint8 RGB, all different: Pascal VOC's colour map (class ``i`` gets VOC's colour ``i``;
    class 0 is black, as VOC's background), for classes files without colours. At most 256 classes."""
    if not 0 <= num_classes <= 256:
        raise ValueError(f"distinct_palette: 0..256 classes, got {num_classes}")
    index = np.arange(num_classes)
    palette = np.zeros((num_classes, 3), dtype=np.int64)
    # The index's bits spread over the three channels from the most significant bit down: 0 -> black,
    # 1 -> (128, 0, 0), 2 -> (0, 128, 0), 3 -> (128, 128, 0), ...
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)
