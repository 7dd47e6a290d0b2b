"""Class names that travel with the weights, and matching them between a checkpoint and a new dataset.

A network's outputs are indexed by class; what each index *means* is data, recorded beside the weights
so that predictions made from a checkpoint alone can name what they found. The record is a plain dict
(safe for ``torch.load(weights_only=True)``), the *class info*::

    {"names": ["__background__", "person", "car"],  # one per network output index
     "category_ids": [0, 1, 3],                      # detection: COCO category id of each label
     "label_ids": [7, 8, 11],                        # segmentation: the value label files hold per class
     "colors": [[128, 64, 128], ...],                # segmentation: RGB per class (overlays, colour masks)
     "ignore_index": 255}                            # segmentation: the mask value the loss ignores

Only ``names`` is required. Data modules expose it as ``class_info``; ``lightning fit`` writes it into
every checkpoint's model record (:mod:`mbv3_dense.checkpoints.model_record`), and the networks keep their
``class_names``.

Foreign checkpoints carry no names, but the class lists of torchvision's published weights are public
facts (ImageNet's 1000 classes, COCO's 91-slot category-id layout, Pascal VOC's 21 classes for its
segmentation models): :func:`known_class_names` gives them by task and class count.

:func:`match_classes` pairs the classes of a checkpoint with those of a new dataset by name, so that a
head with another class count keeps the pretrained rows of the classes both know.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from mbv3_dense.errors import InputError

BACKGROUND = "__background__"
# torchvision's placeholder for COCO category ids that are not used (12, 26, 29, ...): never matched.
_PLACEHOLDERS = frozenset({"n/a", ""})

ClassInfo = dict[str, Any]


class ClassInfoError(InputError, ValueError):
    """A class list or class info that cannot be used (duplicated names, lengths that disagree); names the source."""


def normalize_name(name: str) -> str:
    """The form names are compared in: lower case, ``_`` and ``-`` as spaces, runs of spaces collapsed
    (``"Traffic_Light"`` and ``"traffic light"`` are the same class)."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]", " ", str(name))).strip().lower()


def check_unique_names(names: Sequence[str], source: str) -> None:
    """Raise :class:`ClassInfoError` naming ``source`` and the names that occur more than once
    (compared as :func:`normalize_name` does; torchvision's ``N/A`` placeholders are allowed to repeat)."""
    counts = Counter(normalize_name(n) for n in names)
    repeated = sorted(n for n, c in counts.items() if c > 1 and n not in _PLACEHOLDERS)
    if repeated:
        shown = ", ".join(repr(n) for n in repeated[:10])
        raise ClassInfoError(f"{source}: class names occur more than once: {shown} (each class needs its own name)")


def check_class_info(info: Mapping[str, Any], source: str, num_classes: int | None = None) -> ClassInfo:
    """Validate a class info dict (see the module docstring) and return it as plain lists.

    Raises:
        ClassInfoError: no ``names``, repeated names, per-class lists of another length than ``names``,
            or (when given) ``num_classes`` not equal to the number of names.
    """
    names = info.get("names")
    if not isinstance(names, Sequence) or isinstance(names, str) or not names:
        raise ClassInfoError(f"{source}: class info without a list of names: {dict(info)!r}")
    names = [str(n) for n in names]
    check_unique_names(names, source)
    if num_classes is not None and len(names) != num_classes:
        raise ClassInfoError(f"{source}: {len(names)} class names for a network of {num_classes} classes")
    out: ClassInfo = {"names": names}
    for key in ("category_ids", "label_ids", "colors"):
        if info.get(key) is None:
            continue
        values = list(info[key])
        if len(values) != len(names):
            raise ClassInfoError(f"{source}: {len(values)} {key} for {len(names)} class names")
        out[key] = [[int(c) for c in v] for v in values] if key == "colors" else [int(v) for v in values]
    if info.get("ignore_index") is not None:
        out["ignore_index"] = int(info["ignore_index"])
    return out


def known_class_names(task: str, num_classes: int) -> list[str] | None:
    """The class names of torchvision's published weights of ``task`` with ``num_classes`` outputs, or None.

    ``classify`` 1000: ImageNet-1k (also timm's and mmpretrain's order); ``detect`` 91: COCO with label =
    category id (``__background__`` at 0, ``N/A`` at unused ids); ``segment`` 21: Pascal VOC (what
    torchvision's ``lraspp_mobilenet_v3_large`` predicts).
    """
    from torchvision.models import _meta

    known = {("classify", 1000): _meta._IMAGENET_CATEGORIES, ("detect", 91): _meta._COCO_CATEGORIES,
             ("segment", 21): _meta._VOC_CATEGORIES}.get((task, num_classes))
    return list(known) if known is not None else None


def match_classes(old: Sequence[str], new: Sequence[str]) -> list[tuple[int, int]]:
    """``(old_index, new_index)`` pairs of the classes that ``old`` and ``new`` name alike, in ``new``'s order.

    Names are compared by :func:`normalize_name`; placeholders (``N/A``) and names that occur more than
    once in ``old`` are never matched.
    """
    counts = Counter(normalize_name(n) for n in old)
    where = {normalize_name(n): i for i, n in enumerate(old)
             if counts[normalize_name(n)] == 1 and normalize_name(n) not in _PLACEHOLDERS}
    return [(where[key], j) for j, name in enumerate(new) if (key := normalize_name(name)) in where]


def network_class_names(names: Sequence[str] | None, num_classes: int,
                        source: str = "class_names") -> tuple[str, ...] | None:
    """A network's ``class_names`` argument checked against its class count: a tuple, or None when not given.

    Raises:
        ClassInfoError: another count of names than ``num_classes``, or a name that occurs twice.
    """
    if names is None:
        return None
    if isinstance(names, str):
        raise ClassInfoError(f"{source}: expected a list of class names, got the string {names!r}")
    names = tuple(str(n) for n in names)
    if len(names) != num_classes:
        raise ClassInfoError(f"{source}: {len(names)} class names for a network of {num_classes} classes: {names[:10]}")
    check_unique_names(names, source)
    return names
