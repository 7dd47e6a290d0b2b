"""Cityscapes label ids, in one place: labelId <-> trainId tables and the colour palette.

Everything comes from ``cityscapesscripts.helpers.labels`` (the official table). Id spaces:

- **labelId** (0..33): what ``*_gtFine_labelIds.png`` files hold and what the official evaluator reads.
- **trainId** (0..18, 255 = ignore): what the network predicts and the loss/metric use.

:func:`cityscapes_class_info` is the same table as the *class info* that travels with the weights
(:mod:`mbv3_dense.checkpoints.classes`): trainId names, the labelId of each trainId, the palette, ignore 255.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as _LABELS

from mbv3_dense.checkpoints.classes import ClassInfo, check_class_info

log = logging.getLogger(__name__)

IGNORE_INDEX = 255
NUM_CLASSES = 19

_TRAIN = sorted((lab for lab in _LABELS if 0 <= lab.trainId < IGNORE_INDEX), key=lambda lab: lab.trainId)
#: Names of the 19 train classes, indexed by trainId.
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN)
#: labelId of each trainId (``TRAIN_TO_LABEL_ID[trainId]``).
TRAIN_TO_LABEL_ID = np.array([lab.id for lab in _TRAIN], dtype=np.uint8)
#: RGB colour of each trainId (the Cityscapes palette).
PALETTE = np.array([lab.color for lab in _TRAIN], dtype=np.uint8)
#: labelIds defined by the table (0..33; the licence plate's -1 is not a pixel value).
KNOWN_LABEL_IDS = frozenset(lab.id for lab in _LABELS if lab.id >= 0)

# Lookup table over every uint8 value: labelId -> trainId; unknown values -> 255.
_LABEL_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lab in _LABELS:
    if _lab.id >= 0:
        _LABEL_TO_TRAIN[_lab.id] = _lab.trainId if 0 <= _lab.trainId < IGNORE_INDEX else IGNORE_INDEX
assert len(CLASS_NAMES) == NUM_CLASSES


def cityscapes_class_info() -> ClassInfo:
    """The class info of the 19 trainIds: ``names`` (trainId order), ``label_ids`` (:data:`TRAIN_TO_LABEL_ID`,
    what ``*_gtFine_labelIds.png`` files hold), ``colors`` (:data:`PALETTE`) and ``ignore_index`` 255.
    A new dict on every call (callers may change theirs)."""
    return check_class_info({"names": list(CLASS_NAMES), "label_ids": TRAIN_TO_LABEL_ID.tolist(),
                             "colors": PALETTE.tolist(), "ignore_index": IGNORE_INDEX}, "Cityscapes", NUM_CLASSES)


def is_cityscapes_class_info(info: ClassInfo) -> bool:
    """Whether ``info`` describes the 19 Cityscapes trainIds (same names and labelIds, in trainId order)."""
    return (list(info.get("names", ())) == list(CLASS_NAMES)
            and list(info.get("label_ids", ())) == TRAIN_TO_LABEL_ID.tolist())


def label_ids_to_train_ids(label_ids: np.ndarray, source: str | Path = "<array>") -> np.ndarray:
    """Map an ``[H, W]`` array of labelIds to trainIds (uint8; 255 for ignored and unknown ids).

    Ids that are not in the Cityscapes table (e.g. 34..254, or values of a 16-bit image) become
    255 with a warning naming ``source`` and the offending values.
    """
    ids = np.asarray(label_ids)
    # The ids present: for uint8 a histogram, several times faster than np.unique on a frame.
    values = np.flatnonzero(np.bincount(ids.ravel(), minlength=256)) if ids.dtype == np.uint8 else np.unique(ids)
    unknown = [int(v) for v in values if int(v) not in KNOWN_LABEL_IDS]
    if unknown:
        log.warning("%s: label ids %s are not Cityscapes labelIds; mapped to %d (ignore)",
                    source, unknown[:10], IGNORE_INDEX)
    if ids.dtype != np.uint8:
        out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
        inside = (ids >= 0) & (ids < 256)
        out[inside] = _LABEL_TO_TRAIN[ids[inside]]
        return out
    return _LABEL_TO_TRAIN[ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map an ``[H, W]`` array of predicted trainIds (0..18) to labelIds (uint8), for the evaluator."""
    train_ids = np.asarray(train_ids)
    if train_ids.size and (train_ids.min() < 0 or train_ids.max() >= NUM_CLASSES):
        raise ValueError(f"trainIds must lie in 0..{NUM_CLASSES - 1}, got {train_ids.min()}..{train_ids.max()}")
    return TRAIN_TO_LABEL_ID[train_ids]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """``[H, W]`` trainIds -> ``[H, W, 3]`` uint8 RGB with the Cityscapes palette (255 -> black)."""
    out = np.zeros((*train_ids.shape, 3), dtype=np.uint8)
    valid = train_ids < NUM_CLASSES
    out[valid] = PALETTE[train_ids[valid]]
    return out
