"""What the evaluation, export and prediction scripts share: the network from ``--weights``, and the
head of an evaluation summary.

A ``.ckpt`` written by ``lightning fit`` carries its network's builder and arguments
(:mod:`mbv3_dense.checkpoints.model_record`), so ``--weights run.ckpt`` is all a script needs. Files without
that record (torchvision's, mmpretrain's and timm's checkpoints, our plain state dicts, ``.ckpt``
files from before the record) are built from ``--arch``, ``--num-classes``, ``--width-mult``,
``--reduced-tail``, ``--variant`` (segment) and ``--score-activation`` (detect); the class count,
when not given, is read from the weights. Given together with a record, those arguments must agree
with it: a script never evaluates another network than the one the file describes.

The weights are then loaded by the task's own loader (strict, ``torch.load(weights_only=True)``,
every layout it reads, the averaged weights of a ``.ckpt`` that kept them). Builders and loaders
are named by import path, as in the configs, so this module imports neither task package.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from mbv3_dense.checkpoints.model_record import RECORD_KEY, TASKS, build_from_record, import_object, read_model_record
from mbv3_dense.checkpoints.weights import WeightsError, extract_state_dict, read_checkpoint
from mbv3_dense.errors import InputError

if TYPE_CHECKING:
    from mbv3_dense.training.latency import Latency

ARCHS = ("large", "small")
# Each task's builders (``{arch}`` filled in), for files without a model record, and its weight loader.
BUILDERS = {
    "classify": "mbv3_dense.mobilenet_v3_{arch}",
    "detect": "detection.ssdlite_mobilenet_v3_{arch}",
    "segment": "segmentation.lraspp_mobilenet_v3_{arch}",
}
LOADERS = {
    "classify": "mbv3_dense.classification.weights.load_classifier_weights",
    "detect": "detection.weights.load_ssdlite_weights",
    "segment": "segmentation.weights.load_lraspp_weights",
}
# Each task's count of the classes in a state dict of any layout its loader reads, for files without a record.
CLASS_COUNTERS = {
    "classify": "mbv3_dense.classification.weights.count_classes",
    "detect": "detection.weights.count_classes",
    "segment": "segmentation.weights.count_classes",
}
# The command-line option of each network argument, for the messages.
OPTIONS = {"arch": "--arch", "num_classes": "--num-classes", "width_mult": "--width-mult",
           "reduced_tail": "--reduced-tail", "variant": "--variant", "score_activation": "--score-activation"}
# Arguments that only one task's builders take.
TASK_ONLY = {"variant": "segment", "score_activation": "detect"}


class ResolveError(InputError, ValueError):
    """The weights and the arguments do not describe one network (the message names the file)."""


class Resolved(NamedTuple):
    """A network with its weights loaded (CPU, train mode), its task, how it was built, and what its
    outputs mean (the record's class info, else the network's ``class_names``, e.g. torchvision's COCO
    names for its 91-class file; None when unknown)."""

    model: nn.Module
    description: str
    task: str
    classes: dict[str, Any] | None = None


def _call(builder: str, init_args: Mapping[str, Any]) -> str:
    """``builder(arg=value, ...)`` for messages: the arguments that are set, weight files left out."""
    shown = ", ".join(f"{k}={v!r}" for k, v in init_args.items()
                      if v is not None and k not in ("weights", "weights_backbone"))
    return f"{builder}({shown})"


def _recorded_values(model: nn.Module, record: Mapping[str, Any]) -> dict[str, Any]:
    """The values of the network arguments for the network a record built."""
    try:
        signature = inspect.signature(import_object(record["builder"]))
        arguments = {name: p.default for name, p in signature.parameters.items() if p.default is not p.empty}
    except (TypeError, ValueError):
        arguments = {}
    arguments.update(record["init_args"])
    backbone = getattr(model, "backbone", None)
    return {"arch": getattr(backbone, "arch", None), "num_classes": getattr(model, "num_classes", None),
            "width_mult": getattr(backbone, "width_mult", None),
            "reduced_tail": getattr(backbone, "reduced_tail", None), "variant": arguments.get("variant"),
            "score_activation": getattr(model, "score_activation", None)}


def _build(record: Mapping[str, Any], source: str) -> nn.Module:
    try:
        return build_from_record(record, source)
    except ValueError as err:
        raise ResolveError(str(err)) from err


def resolve_model(task: str | None, weights: str | Path | None, *, arch: str | None = None,
                  num_classes: int | None = None, width_mult: float | None = None,
                  reduced_tail: bool | None = None, variant: str | None = None,
                  score_activation: str | None = None) -> Resolved:
    """Build the network that ``weights`` hold, and load them.

    Args:
        task: ``"classify"``, ``"detect"`` or ``"segment"``; None takes the record's (a file without
            a record then needs it).
        weights: a checkpoint path, or None for random weights (built from the arguments).
        arch, num_classes, width_mult, reduced_tail, variant, score_activation: the network's
            arguments; None means "not given". With a record they are checked against it; without
            one they build the network (arch ``large`` and the builder's defaults when not given;
            the class count is read from the weights when not given).

    Raises:
        ResolveError: the record names another task, an argument disagrees with the record, or a
            file without a record comes without ``task``.
        WeightsError: the file is unreadable or its tensors do not fit the network (listed).
    """
    if task is not None and task not in TASKS:
        raise ResolveError(f"task must be one of {TASKS}, got {task!r}")
    given = {"arch": arch, "num_classes": num_classes, "width_mult": width_mult, "reduced_tail": reduced_tail,
             "variant": variant, "score_activation": score_activation}
    given = {k: v for k, v in given.items() if v is not None}
    source = str(weights) if weights is not None else ""
    checkpoint = read_checkpoint(weights) if weights is not None else None
    record = read_model_record(checkpoint, source) if checkpoint is not None else None

    if record is not None:
        if task is not None and record["task"] != task:
            raise ResolveError(f"{source}: the checkpoint holds a {record['task']!r} model (its {RECORD_KEY!r} "
                               f"record: {record['builder']}), not a {task!r} model as asked")
        task = record["task"]
        model = _build(record, source)
        recorded = _recorded_values(model, record)
        differing = [f"{OPTIONS[k]} {v} (the record: {recorded[k]})" for k, v in given.items()
                     if recorded[k] is not None and v != recorded[k]]
        if differing:
            raise ResolveError(f"{source}: the arguments disagree with the checkpoint's model record "
                               f"({_call(record['builder'], record['init_args'])}): {'; '.join(differing)}. "
                               "Leave them out: the file describes its network.")
        description = f"{_call(record['builder'], record['init_args'])}, as recorded in {source}"
    else:
        if task is None:
            raise ResolveError(f"{source}: no model record ({RECORD_KEY!r}) in the file: give the task (--task)"
                               if source else "without weights the task must be given")
        init_args = {k: v for k, v in given.items() if k != "arch" and TASK_ONLY.get(k, task) == task}
        builder = BUILDERS[task].format(arch=given.get("arch", "large"))
        if checkpoint is not None and "num_classes" not in init_args:
            state, container = extract_state_dict(checkpoint, source)
            probe = _build({"task": task, "builder": builder, "init_args": init_args}, source)
            found = import_object(CLASS_COUNTERS[task])(state, container, probe, source)
            if found is not None:
                init_args["num_classes"] = found
        model = _build({"task": task, "builder": builder, "init_args": init_args}, source)
        built = _call(builder, init_args)
        if checkpoint is None:
            description = f"{built} with random weights"
        else:
            description = f"{built} (no model record in {source}: built from the arguments)"

    if weights is not None:
        try:
            import_object(LOADERS[task])(model, weights)
        except WeightsError as err:
            if record is not None:
                raise
            raise WeightsError(f"{err}\n  {source} has no model record, so the network was built from the "
                               f"arguments: {built}; check "
                               f"{', '.join(OPTIONS[k] for k in OPTIONS if TASK_ONLY.get(k, task) == task)}") from err
    classes = (record or {}).get("classes")
    if classes is None and getattr(model, "class_names", None) is not None:
        classes = {"names": list(model.class_names)}
    return Resolved(model, description, task, classes)


# ---------------------------------------------------------------------------------------------- command line
def _true_or_false(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered == "true"


def add_model_arguments(parser: argparse.ArgumentParser, task: str | None) -> None:
    """The network options of a script of ``task`` (None: a script of every task).

    ``--weights`` is the script's own (required or not); these are for files without a model record.
    """
    group = parser.add_argument_group(
        "network (files without a model record)",
        "A .ckpt written by `lightning fit` describes its network: give none of these, or only values "
        "that agree with it. Files without that record (torchvision's, mmpretrain's, plain state dicts, "
        "older .ckpt) are built from them.")
    group.add_argument("--arch", choices=ARCHS, default=None, help="default large")
    group.add_argument("--num-classes", type=int, default=None, help="default: read from the weights")
    group.add_argument("--width-mult", type=float, default=None, help="default 1.0")
    group.add_argument("--reduced-tail", type=_true_or_false, default=None, metavar="true|false",
                       help="halved last stage; default: the builder's (classify off, detect on, segment paper on)")
    if task in (None, "segment"):
        group.add_argument("--variant", choices=("paper", "torchvision"), default=None,
                           help="segment: LR-ASPP decoder (default paper)")
    if task in (None, "detect"):
        group.add_argument("--score-activation", choices=("softmax", "sigmoid"), default=None,
                           help="detect: sigmoid for models trained with the focal loss (default softmax)")
    # A script of one task has no option of the other tasks' builders: None ("not given").
    parser.set_defaults(**{k: None for k, only in TASK_ONLY.items() if task not in (None, only)})


def model_from_arguments(task: str | None, args: argparse.Namespace) -> Resolved:
    """:func:`resolve_model` with the options of :func:`add_model_arguments` and ``args.weights``.

    A script's way in: when the weights cannot be read or do not match the arguments, prints
    ``error: <what is wrong, naming the file>`` on standard error and exits with status 2.
    """
    try:
        return resolve_model(task, args.weights, arch=args.arch, num_classes=args.num_classes,
                             width_mult=args.width_mult, reduced_tail=args.reduced_tail, variant=args.variant,
                             score_activation=args.score_activation)
    except (ResolveError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


# ---------------------------------------------------------------------------------------------- summary
def evaluation_summary(task: str, metric_name: str, metric: float, latency: Latency, *,
                       latency_input: tuple[int, int] | list[int], backend: str, int8: bool,
                       pte: str | Path | None, weights: str | Path, model: str) -> dict[str, Any]:
    """The keys every evaluation script's summary (``--json``) starts with.

    Args:
        task: the script's task.
        metric_name: the headline metric's name (``top1``, ``mAP``, ``mIoU``).
        metric: its value.
        latency: the measured latency (median and p90, its device and thread count).
        latency_input: ``(height, width)`` of the timed input.
        backend: ``torch``, ``onnxruntime`` or ``executorch``.
        int8: whether the timed network was quantized.
        pte: the ``.pte`` file run, if any.
        weights: the checkpoint evaluated.
        model: how the network was built (:attr:`Resolved.description`).
    """
    return {"task": task, "metric_name": metric_name, "metric": float(metric),
            "latency_ms": latency.median_ms, "latency_p90_ms": latency.p90_ms,
            "latency_input": [int(latency_input[0]), int(latency_input[1])],
            "device": latency.device, "threads": latency.threads, "backend": backend, "int8": bool(int8),
            "pte": str(pte) if pte else None, "weights": str(weights), "model": model}


def write_summary(path: str | Path, summary: Mapping[str, Any]) -> None:
    """Write an evaluation summary (``--json``) as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
