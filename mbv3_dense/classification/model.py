"""The ImageNet classifier: backbone, global pool, Linear -> hard-swish -> dropout -> Linear."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mbv3_dense.backbone import HEAD_CHANNELS, Arch, MobileNetV3
from mbv3_dense.classes import network_class_names
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.layers import Normalize, init_weights, make_divisible

__all__ = ["MobileNetV3Classifier", "mobilenet_v3_large", "mobilenet_v3_small"]


class MobileNetV3Classifier(nn.Module):
    """MobileNetV3 image classifier, numerically the same as torchvision's ``MobileNetV3``.

    Input: float ``[N, 3, H, W]`` normalised with ImageNet mean/std by :attr:`normalize` (a
    :class:`~mbv3_dense.layers.Normalize` of :data:`~mbv3_dense.constants.IMAGENET_MEAN` /
    ``IMAGENET_STD``). Output: logits ``[N, num_classes]``.

    Args:
        backbone: a :class:`MobileNetV3` whose ``out_features`` is ``("c5",)``.
        num_classes: number of classes.
        dropout: dropout before the last Linear.
        hidden_channels: width of the hidden Linear (1280 Large / 1024 Small, scaled as the
            backbone, halved with the reduced tail as in torchvision).
        class_names: the name of each output (``class_names[i]`` for logit ``i``), kept as
            :attr:`class_names` and recorded in checkpoints; ``None``: unknown.
    """

    def __init__(self, *, backbone: MobileNetV3, num_classes: int = 1000, dropout: float = 0.2,
                 hidden_channels: int, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if backbone.out_features != ("c5",):
            raise ValueError(f"the classifier reads the 'c5' tap only, got {backbone.out_features}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.class_names = network_class_names(class_names, num_classes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(backbone.out_channels, hidden_channels),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True),
            nn.Linear(hidden_channels, num_classes),
        )
        init_weights(self.classifier)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)["c5"]
        return self.classifier(torch.flatten(self.avgpool(features), 1))

    def class_layers(self) -> tuple[str, ...]:
        """The layers whose outputs are the classes (re-initialised for another class list)."""
        return ("classifier.3",)


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
            (logged; :mod:`mbv3_dense.transfer`).
        class_names: the name of each class, in output order (an image folder's class folders).
        keep_class_rows: with ``weights`` of other classes, the pretrained rows of the classes named alike
            are kept (False: the whole class layer starts fresh).
    """
    return _build("large", num_classes=num_classes, width_mult=width_mult, reduced_tail=reduced_tail,
                  dropout=dropout, weights=weights, class_names=class_names,
                  keep_class_rows=keep_class_rows)


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
    """MobileNetV3-Small classifier (2.54M params, 0.057 GMAdds at 224 with 1000 classes).

    Args:
        num_classes: outputs.
        weights: path to a checkpoint: torchvision, mmpretrain, timm or this project's ``.ckpt``. A checkpoint
            with other classes loads too: everything but the last Linear as it is, that layer afresh
            except the rows of the classes named alike in ``class_names`` and the checkpoint's names
            (logged; :mod:`mbv3_dense.transfer`).
        class_names: the name of each class, in output order (an image folder's class folders).
        keep_class_rows: with ``weights`` of other classes, the pretrained rows of the classes named alike
            are kept (False: the whole class layer starts fresh).
    """
    return _build("small", num_classes=num_classes, width_mult=width_mult, reduced_tail=reduced_tail,
                  dropout=dropout, weights=weights, class_names=class_names,
                  keep_class_rows=keep_class_rows)
