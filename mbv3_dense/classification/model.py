"""The ImageNet classifier: backbone, global pool, Linear -> hard-swish -> dropout -> Linear."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mbv3_dense.backbone import MobileNetV3
from mbv3_dense.checkpoints.classes import network_class_names
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.layers import Normalize, init_weights

__all__ = ["MobileNetV3Classifier"]


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
