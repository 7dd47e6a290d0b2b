"""SSDLite checkpoints: torchvision's ``ssdlite320_mobilenet_v3_large`` layout and our own ``.ckpt``.

torchvision splits the backbone at SSDLite's C4 tap: ``backbone.features.0`` holds the layers up to
and including the expansion conv of the first stride-32 bottleneck (index ``c4``), and
``backbone.features.1`` the rest (its ``0`` is that bottleneck's remaining layers). Extras are
``backbone.extra.{i}``, heads ``head.{classification,regression}_head.module_list.{i}``. Ours keeps
torchvision's classifier layout (``backbone.features.{i}``), ``extra.{i}``, ``cls_head.{i}``,
``box_head.{i}``. Every load is strict but for the class predictors of a checkpoint with other classes
(:mod:`mbv3_dense.checkpoints.transfer`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from mbv3_dense.checkpoints.transfer import load_checkpoint_state, read_task_checkpoint
from mbv3_dense.checkpoints.weights import StateDict, layout_error, lightning_model_state

log = logging.getLogger(__name__)


def from_torchvision_ssdlite(state: Mapping[str, Tensor], c4_index: int) -> StateDict:
    """torchvision ``SSD`` (SSDLite MobileNetV3) keys -> ours; unknown keys pass through unchanged
    (the strict load reports them).

    Args:
        state: torchvision's state dict.
        c4_index: index in ``backbone.features`` of the bottleneck whose expansion is C4.
    """
    out: StateDict = {}
    for key, value in state.items():
        new = key
        if m := re.fullmatch(r"backbone\.features\.0\.(\d+)\.(.+)", key):
            i, rest = int(m.group(1)), m.group(2)
            new = f"backbone.features.{i}.{rest}" if i < c4_index else (
                f"backbone.features.{c4_index}.block.0.{rest}" if i == c4_index else key)
        elif m := re.fullmatch(r"backbone\.features\.1\.0\.(\d+)\.(.+)", key):
            new = f"backbone.features.{c4_index}.block.{m.group(1)}.{m.group(2)}"
        elif m := re.fullmatch(r"backbone\.features\.1\.(\d+)\.(.+)", key):
            new = f"backbone.features.{c4_index + int(m.group(1))}.{m.group(2)}"
        elif key.startswith("backbone.extra."):
            new = key[len("backbone."):]
        elif key.startswith("head.classification_head.module_list."):
            new = "cls_head." + key[len("head.classification_head.module_list."):]
        elif key.startswith("head.regression_head.module_list."):
            new = "box_head." + key[len("head.regression_head.module_list."):]
        out[new] = value
    return out


def to_ssdlite_layout(state: Mapping[str, Tensor], container: str, c4_index: int, source: str) -> StateDict:
    """Any supported SSDLite checkpoint (ours, Lightning ``.ckpt``, torchvision) -> our layout."""
    if container == "lightning":
        state = lightning_model_state(state)
    if "backbone.features.0.0.0.weight" in state:
        log.info("%s: read as a torchvision SSDLite checkpoint", source)
        return from_torchvision_ssdlite(state, c4_index)
    if "backbone.features.0.0.weight" in state and any(k.startswith("cls_head.") for k in state):
        return dict(state)
    raise layout_error(source, "an SSDLite", "torchvision's (backbone.features.0.0.0.*, head.*) or this project's "
                       "(backbone.features.*, cls_head.*)", state,
                       classifier_hint="; an ImageNet classifier goes to the detector as weights_backbone, not weights")


def load_ssdlite_weights(model: nn.Module, path: str | Path, *, keep_class_rows: bool = True) -> None:
    """Load an SSDLite checkpoint into ``model`` (an :class:`~detection.model.SSDLite`).

    Strict, except that a checkpoint with other classes loads into new class predictors that keep the
    background row and the rows of classes named alike (:func:`mbv3_dense.checkpoints.transfer.load_checkpoint_state`).
    """
    checkpoint, state, container = read_task_checkpoint(path, "detect")
    c4_index = model.backbone.feature_info["c4_expand"].index
    load_checkpoint_state(model, to_ssdlite_layout(state, container, c4_index, str(path)), str(path),
                          task="detect", checkpoint=checkpoint, always_kept=(0,), keep_class_rows=keep_class_rows)


def count_classes(state: Mapping[str, Tensor], container: str, probe: nn.Module, source: str) -> int | None:
    """The class count (background included) of an SSDLite state dict (any layout :func:`load_ssdlite_weights`
    reads), or None. ``probe``: an SSDLite of the same architecture (where its C4 tap is)."""
    state = to_ssdlite_layout(state, container, probe.backbone.feature_info["c4_expand"].index, source)
    cls, box = state.get("cls_head.0.1.weight"), state.get("box_head.0.1.weight")
    # The first map's head predicts B boxes x C classes and B boxes x 4 coordinates.
    return None if cls is None or box is None else int(cls.shape[0]) * 4 // int(box.shape[0])
