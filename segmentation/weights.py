"""LR-ASPP checkpoints: torchvision's ``lraspp_mobilenet_v3_large`` and our Lightning ``.ckpt``.

torchvision keys are ``backbone.{i}...`` (its ``features`` under an ``IntermediateLayerGetter``)
and ``classifier.{cbr,scale,low_classifier,high_classifier}...``; ours are
``backbone.features.{i}...`` and ``head.*``. The module layouts match, so conversion is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from mbv3_dense.checkpoints.transfer import load_checkpoint_state, read_task_checkpoint
from mbv3_dense.checkpoints.weights import StateDict, layout_error, lightning_model_state


def from_torchvision_lraspp(state: Mapping[str, Tensor]) -> StateDict:
    """torchvision ``LRASPP`` state dict -> ours (unknown keys are kept, for the strict load to report)."""
    out: StateDict = {}
    for key, value in state.items():
        if re.match(r"backbone\.\d+\.", key):
            out["backbone.features." + key[len("backbone."):]] = value
        elif key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = value
        else:
            out[key] = value
    return out


def to_lraspp_layout(state: Mapping[str, Tensor], container: str, source: str) -> StateDict:
    """Any supported LR-ASPP checkpoint -> our key layout."""
    if container == "lightning":
        state = lightning_model_state(state)
    if "backbone.0.0.weight" in state and "classifier.low_classifier.weight" in state:
        return from_torchvision_lraspp(state)
    if "backbone.features.0.0.weight" in state and "head.low_classifier.weight" in state:
        return dict(state)
    raise layout_error(source, "an LR-ASPP", "torchvision's (backbone.0.*, classifier.*) or this project's "
                       "(backbone.features.*, head.*)", state,
                       classifier_hint="; an ImageNet classifier goes to LR-ASPP as weights_backbone, not weights")


def load_lraspp_weights(model: nn.Module, path: str | Path, *, keep_class_rows: bool = True) -> None:
    """Load a torchvision LR-ASPP state dict or one of our ``.ckpt`` files into ``model``.

    Strict, except that a checkpoint with other classes loads into new classifiers that keep the rows of
    classes named alike (:func:`mbv3_dense.checkpoints.transfer.load_checkpoint_state`; torchvision's files predict the
    21 Pascal VOC classes).

    Raises:
        WeightsError: unreadable file, unknown layout, or keys/shapes that do not fit (listed).
    """
    checkpoint, state, container = read_task_checkpoint(path, "segment")
    load_checkpoint_state(model, to_lraspp_layout(state, container, str(path)), str(path), task="segment",
                          checkpoint=checkpoint, keep_class_rows=keep_class_rows)


def count_classes(state: Mapping[str, Tensor], container: str, probe: nn.Module, source: str) -> int | None:
    """The class count of an LR-ASPP state dict (any layout :func:`load_lraspp_weights` reads), or None.
    ``probe`` (a network of the same architecture) is not needed: the arguments are those of every task's."""
    weight = to_lraspp_layout(state, container, source).get("head.low_classifier.weight")
    return None if weight is None else int(weight.shape[0])
