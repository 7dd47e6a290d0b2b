"""ImageNet classifier checkpoints: every layout :mod:`mbv3_dense.checkpoints.weights` reads (torchvision, mmpretrain,
timm, our ``.ckpt``), loaded into a :class:`~mbv3_dense.classification.model.MobileNetV3Classifier`."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from mbv3_dense.checkpoints.transfer import load_checkpoint_state, read_task_checkpoint
from mbv3_dense.checkpoints.weights import to_classifier_layout
from mbv3_dense.layers import set_bn_eps

log = logging.getLogger(__name__)


def load_classifier_weights(model: nn.Module, path: str | Path, *, keep_class_rows: bool = True) -> str:
    """Load a classifier checkpoint of any supported layout into ``model``.

    Strict, except that a checkpoint with other classes (count or names) loads into a network with a new
    last Linear (:func:`mbv3_dense.checkpoints.transfer.load_checkpoint_state`: rows of classes named alike kept,
    logged). Returns the detected layout. timm checkpoints switch every BN to timm's eps (1e-5).
    """
    checkpoint, state, container = read_task_checkpoint(path, "classify")
    state, layout = to_classifier_layout(state, container, model.backbone.features, str(path))
    load_checkpoint_state(model, state, str(path), task="classify", checkpoint=checkpoint,
                          keep_class_rows=keep_class_rows)
    if layout == "timm":
        count = set_bn_eps(model, 1e-5)
        log.info("%s: timm checkpoint: BatchNorm eps set to 1e-5 on %d layers (timm's value)", path, count)
    return layout


def count_classes(state: Mapping[str, Tensor], container: str, probe: nn.Module, source: str) -> int | None:
    """The class count of a classifier state dict (any layout :func:`load_classifier_weights` reads), or None.

    Args:
        state / container: as :func:`~mbv3_dense.checkpoints.weights.extract_state_dict` returns them.
        probe: a classifier of the same architecture (its backbone tells mmpretrain's and timm's layouts apart).
        source: the file, for messages.
    """
    state, _ = to_classifier_layout(state, container, probe.backbone.features, source)
    weight = state.get("classifier.3.weight")
    return None if weight is None else int(weight.shape[0])
