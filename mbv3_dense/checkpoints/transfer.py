"""Loading a checkpoint into a network whose classes differ: pretrained weights for your own classes.

Only a network's *class layers* have shapes that depend on the class count: the classifier's last
Linear, SSDLite's class predictors (one per feature map), LR-ASPP's two 1x1 classifiers. Each network
names them (``class_layers()``). :func:`load_checkpoint_state` loads every other tensor strictly and,
when the checkpoint has another class count or other class names, initialises the class layers afresh
except the rows of the classes that both name alike (:func:`mbv3_dense.checkpoints.classes.match_classes`), which
keep their pretrained values: a COCO detector fine-tuned to "person, car, dog" starts out finding them.
Any other mismatch is an error naming the keys; nothing is partly loaded in silence. What was loaded,
re-initialised and kept is logged, and returned as a :class:`TransferReport`.

Row layout: the first dimension of a class layer's tensors holds ``boxes x num_classes`` rows, box-major
(``boxes`` is 1 except for SSDLite's predictors, which give B boxes per location), so row ``b * C + c``
belongs to class ``c``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from mbv3_dense.checkpoints.classes import known_class_names, match_classes, normalize_name
from mbv3_dense.checkpoints.model_record import read_model_record
from mbv3_dense.checkpoints.weights import (
    StateDict,
    WeightsError,
    backbone_arch,
    extract_state_dict,
    load_state_dict_strict,
    read_checkpoint,
)

log = logging.getLogger(__name__)


@dataclass
class TransferReport:
    """What :func:`load_checkpoint_state` did.

    Attributes:
        source: the checkpoint.
        loaded: keys taken from the checkpoint unchanged.
        reinitialised: class-layer keys initialised afresh (with the kept rows copied in); empty when the
            checkpoint's classes are the network's.
        kept: ``(checkpoint index, network index, name)`` of the class rows carried over.
        checkpoint_classes: the checkpoint's class count.
        checkpoint_names: the checkpoint's class names where known (its record, or torchvision's list).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    kept: list[tuple[int, int, str]] = field(default_factory=list)
    checkpoint_classes: int | None = None
    checkpoint_names: list[str] | None = None


def check_task(checkpoint: Any, task: str, source: str) -> None:
    """Refuse a checkpoint whose model record names another task (a detector given as classifier weights)."""
    try:
        record = read_model_record(checkpoint, source)
    except ValueError as err:
        raise WeightsError(str(err)) from err
    if record is not None and record["task"] != task:
        raise WeightsError(f"{source}: holds a {record['task']!r} network ({record['builder']}), not a {task!r} one; "
                           "a classifier checkpoint goes to a detector or segmenter as weights_backbone")


def read_task_checkpoint(path: str | Path, task: str) -> tuple[Any, StateDict, str]:
    """A weights file for a ``task`` network: the object read, its state dict and container
    (:func:`~mbv3_dense.checkpoints.weights.extract_state_dict`); another task's checkpoint is refused
    (:func:`check_task`)."""
    checkpoint = read_checkpoint(path)
    check_task(checkpoint, task, str(path))
    state, container = extract_state_dict(checkpoint, path)
    return checkpoint, state, container


def checkpoint_class_names(checkpoint: Any, task: str, num_classes: int) -> tuple[list[str] | None, str]:
    """The class names of a checkpoint with ``num_classes`` outputs and where they come from: the model
    record of our own ``.ckpt`` files, else torchvision's public list for that task and count, else None."""
    try:
        record = read_model_record(checkpoint)
    except ValueError:
        record = None
    if record is not None:
        names = (record.get("classes") or {}).get("names") or record["init_args"].get("class_names")
        if names is not None and len(names) == num_classes:
            return [str(n) for n in names], "its model record"
        return None, "its model record (no class names)"
    known = known_class_names(task, num_classes)
    return known, f"torchvision's {task} list of {num_classes} classes" if known else "unknown"


def class_layer_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the network's class layers (``model.class_layers()``: module names)."""
    own = model.state_dict()
    keys = [f"{layer}.{name}" for layer in model.class_layers() for name in ("weight", "bias")]
    return [k for k in keys if k in own]


def _rows(tensor: Tensor, num_classes: int) -> Tensor:
    """``[B * C, ...]`` -> ``[B, C, ...]`` (a view)."""
    return tensor.view(tensor.shape[0] // num_classes, num_classes, *tensor.shape[1:])


def load_checkpoint_state(model: nn.Module, state: Mapping[str, Tensor], source: str, *, task: str,
                          checkpoint: Any, always_kept: Sequence[int] = (),
                          keep_class_rows: bool = True) -> TransferReport:
    """Load ``state`` (already in the network's key layout) into ``model``.

    With the same classes as the network (count, and names where both are known) the load is strict.
    Otherwise the class layers are re-initialised (the network's own fresh initialisation) and the rows of
    classes named alike are copied from the checkpoint; every other tensor must fit exactly.

    Args:
        model: the network; it has ``num_classes``, ``class_layers()`` and (optionally) ``class_names``.
        state: the checkpoint's tensors in the network's layout.
        source: names the checkpoint in messages.
        task: ``classify``, ``detect`` or ``segment`` (which public class list applies).
        checkpoint: the loaded file (for its model record and class names).
        always_kept: class indices that mean the same in every checkpoint of the task (SSD's background 0).
        keep_class_rows: copy the rows of classes named alike (and ``always_kept``) into the new class layers;
            False: they start entirely fresh.

    Returns:
        What was loaded, re-initialised and kept. The network's ``class_names`` are set to the
        checkpoint's when it had none and the classes are the same.

    Raises:
        WeightsError: any tensor other than the class layers' does not fit (listed), or the class layers
            do not hold a whole number of classes.
    """
    own = model.state_dict()
    arch, held = getattr(getattr(model, "backbone", None), "arch", None), backbone_arch(state)
    if arch is not None and held is not None and arch != held:
        raise WeightsError(f"{source}: holds a MobileNetV3-{held.capitalize()} network, and this one is "
                           f"MobileNetV3-{arch.capitalize()} (choose the {held} builder, or --arch {held})")
    head = class_layer_keys(model)
    new_count = int(model.num_classes)
    report = TransferReport(source)
    old_count = _class_count(state, own, head, new_count)
    if old_count is None:  # not a head of whole classes: the strict load names what does not fit
        load_state_dict_strict(model, state, source)
        report.loaded = list(own)
        return report
    report.checkpoint_classes = old_count
    old_names, names_from = checkpoint_class_names(checkpoint, task, old_count)
    report.checkpoint_names = old_names
    new_names = getattr(model, "class_names", None)
    same_names = old_names is None or new_names is None or \
        [normalize_name(n) for n in old_names] == [normalize_name(n) for n in new_names]
    if old_count == new_count and same_names:
        load_state_dict_strict(model, state, source)
        report.loaded = list(own)
        if new_names is None and old_names is not None and hasattr(model, "class_names"):
            model.class_names = tuple(old_names)
        return report

    # Another head: the class layers start from the network's own initialisation, with the rows of the
    # classes named alike copied in; every other tensor must fit exactly.
    pairs = [(i, i) for i in always_kept if i < min(old_count, new_count)] if keep_class_rows else []
    if keep_class_rows and old_names is not None and new_names is not None:
        pairs += [p for p in match_classes(old_names, new_names) if p[1] not in {d for _, d in pairs}]
    merged = dict(state)
    for key in head:
        composed = own[key].clone()
        rows, old = _rows(composed, new_count), _rows(state[key], old_count)
        for src, dst in pairs:
            rows[:, dst] = old[:, src]
        merged[key] = composed
    load_state_dict_strict(model, merged, source)
    shown = list(new_names) if new_names is not None else [str(i) for i in range(new_count)]
    report.loaded = [k for k in own if k not in head]
    report.reinitialised = head
    report.kept = [(s, d, shown[d]) for s, d in pairs]
    _log_transfer(report, new_count, names_from, old_names, new_names)
    return report


def _class_count(state: Mapping[str, Tensor], own: Mapping[str, Tensor], head: list[str], new_count: int) -> int | None:
    """The class count of the checkpoint's class layers, or None when they are missing, have other trailing
    shapes (another architecture) or do not hold a whole, common number of classes."""
    counts = set()
    for key in head:
        if key not in state or state[key].shape[1:] != own[key].shape[1:]:
            return None
        boxes = own[key].shape[0] // new_count
        if state[key].shape[0] % boxes:
            return None
        counts.add(state[key].shape[0] // boxes)
    return counts.pop() if len(counts) == 1 else None


def _log_transfer(report: TransferReport, new_count: int, names_from: str, old_names: list[str] | None,
                  new_names: Sequence[str] | None) -> None:
    why = (f"the checkpoint has {report.checkpoint_classes} classes and the network {new_count}"
           if report.checkpoint_classes != new_count else "the checkpoint's class names differ from the network's")
    log.info("%s: loaded %d tensors; class layers re-initialised (%s), because %s", report.source,
             len(report.loaded), ", ".join(report.reinitialised), why)
    if old_names is None or new_names is None:
        missing = "the checkpoint's" if old_names is None else "the network's (pass class_names)"
        log.info("%s: no class rows matched by name: %s class names are unknown (checkpoint names: %s)",
                 report.source, missing, names_from)
    kept = ", ".join(f"{name} ({src} -> {dst})" for src, dst, name in report.kept)
    fresh = sorted(set(range(new_count)) - {d for _, d, _ in report.kept})
    fresh_names = ", ".join((new_names or [str(i) for i in range(new_count)])[i] for i in fresh[:20])
    log.info("%s: class rows kept from the checkpoint (%d): %s; starting fresh (%d): %s%s", report.source,
             len(report.kept), kept or "none", len(fresh), fresh_names or "none", " ..." if len(fresh) > 20 else "")
