"""Self-describing checkpoints: which builder made the network, with which arguments.

``lightning fit`` stores, in every ``.ckpt`` it writes, the network's entry of the config under
:data:`RECORD_KEY`, with what its classes are (:mod:`mbv3_dense.checkpoints.classes`)::

    {"task": "detect", "builder": "detection.ssdlite_mobilenet_v3_small",
     "init_args": {"num_classes": 5, "width_mult": 1.0, "class_names": [...], ...},
     "classes": {"names": ["__background__", "person", ...], "category_ids": [0, 1, 3, 18, 44]}}

so evaluation, export and prediction rebuild the same network from the file alone
(:func:`build_from_record`) instead of asking for ``--arch``/``--num-classes``/``--variant``.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

RECORD_KEY = "mbv3_dense_model"
TASKS = ("classify", "detect", "segment")
# Builder arguments that point at files of the machine that trained (pretrained weights): the
# checkpoint's own weights replace them when rebuilding.
_FILE_ARGUMENTS = ("weights", "weights_backbone")


def task_list(text: str) -> list[str]:
    """The scripts' ``--tasks`` (an argparse ``type``): a comma-separated subset of :data:`TASKS`, in order."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown}; choose from {', '.join(TASKS)}")
    return tasks


class ModelRecord(Callback):
    """Writes ``{"task", "builder", "init_args"}`` of the network into every checkpoint.

    Args:
        task: ``"classify"``, ``"detect"`` or ``"segment"``.
        builder: import path of the class or function that builds the network.
        init_args: its keyword arguments (plain values: numbers, strings, lists).
    """

    def __init__(self, task: str, builder: str, init_args: Mapping[str, Any]) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.record = {"task": task, "builder": builder, "init_args": dict(init_args)}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        classes = getattr(pl_module, "class_info", None)
        checkpoint[RECORD_KEY] = {**self.record, **({"classes": classes} if classes else {})}


def read_model_record(checkpoint: Mapping[str, Any], source: str | Path = "<checkpoint>") -> dict[str, Any] | None:
    """The record of a loaded checkpoint, or None when it has none (a foreign or older file).

    Raises:
        ValueError: the record is there but malformed (the message names ``source``).
    """
    record = checkpoint.get(RECORD_KEY) if isinstance(checkpoint, Mapping) else None
    if record is None:
        return None
    if (not isinstance(record, Mapping) or record.get("task") not in TASKS
            or not isinstance(record.get("builder"), str) or not isinstance(record.get("init_args"), Mapping)):
        raise ValueError(f"{source}: malformed {RECORD_KEY!r} entry (expected task, builder, init_args): {record!r}")
    return dict(record)


def import_object(path: str) -> Any:
    """The object a dotted path names (``package.module.Name``): a config's ``class_path``, a record's builder.

    Raises:
        ImportError / AttributeError / ValueError: no such module, no such name in it, or no module part.
    """
    module_name, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def build_from_record(record: Mapping[str, Any], source: str | Path = "<checkpoint>") -> nn.Module:
    """A fresh network (random weights) built as the record says; pretrained-weight paths are dropped."""
    try:
        builder = import_object(record["builder"])
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{source}: cannot import the network builder {record['builder']!r}: {err}") from err
    kwargs = {k: v for k, v in record["init_args"].items() if k not in _FILE_ARGUMENTS}
    try:
        return builder(**kwargs)
    except TypeError as err:
        raise ValueError(f"{source}: {record['builder']} does not take the recorded arguments {kwargs}: {err}") from err
