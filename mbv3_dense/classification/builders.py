"""``mobilenet_v3_large`` / ``mobilenet_v3_small``: the ImageNet classifier as the paper and torchvision build it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from mbv3_dense.backbone import HEAD_CHANNELS, Arch, MobileNetV3
from mbv3_dense.classification.model import MobileNetV3Classifier
from mbv3_dense.layers import make_divisible


def _build(
    arch: Arch,
    *,
    num_classes: int,
    width_mult: float,
    reduced_tail: bool,
    dropout: float,
    weights: str | Path | None,
    class_names: Sequence[str] | None,
    keep_class_rows: bool,
) -> MobileNetV3Classifier:
    backbone = MobileNetV3(arch=arch, width_mult=width_mult, reduced_tail=reduced_tail)
    hidden = make_divisible(HEAD_CHANNELS[arch] // (2 if reduced_tail else 1) * width_mult, 8)
    model = MobileNetV3Classifier(backbone=backbone, num_classes=num_classes, dropout=dropout,
                                  hidden_channels=hidden, class_names=class_names)
    if weights is not None:
        from mbv3_dense.classification.weights import load_classifier_weights

        load_classifier_weights(model, weights, keep_class_rows=keep_class_rows)
    return model


def mobilenet_v3_large(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dropout: float = 0.2,
    weights: str | Path | None = None,
    class_names: list[str] | None = None,
    keep_class_rows: bool = True,
) -> MobileNetV3Classifier:
    """MobileNetV3-Large classifier (5.48M params, 0.217 GMAdds at 224 with 1000 classes).

    Args:
        num_classes: outputs.
        weights: path to a checkpoint: torchvision, mmpretrain, timm or this project's ``.ckpt``. A checkpoint
            with other classes loads too: everything but the last Linear as it is, that layer afresh
            except the rows of the classes named alike in ``class_names`` and the checkpoint's names
            (logged; :mod:`mbv3_dense.checkpoints.transfer`).
        class_names: the name of each class, in output order (an image folder's class folders).
        keep_class_rows: with ``weights`` of other classes, the pretrained rows of the classes named alike
            are kept (False: the whole class layer starts fresh).
    """
    return _build("large", **locals())  # the arguments above, by name


def mobilenet_v3_small(
    *,
    num_classes: int = 1000,
    width_mult: float = 1.0,
    reduced_tail: bool = False,
    dropout: float = 0.2,
    weights: str | Path | None = None,
    class_names: list[str] | None = None,
    keep_class_rows: bool = True,
) -> MobileNetV3Classifier:
    """MobileNetV3-Small classifier (2.54M params, 0.057 GMAdds at 224 with 1000 classes); arguments as
    :func:`mobilenet_v3_large`."""
    return _build("small", **locals())  # the arguments above, by name
