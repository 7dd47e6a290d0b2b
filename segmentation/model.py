"""LR-ASPP (Lite Reduced Atrous Spatial Pyramid Pooling), paper section 6.3 and Fig. 10.

Two decoders share one module layout (named as torchvision's ``LRASPPHead`` so its checkpoints
map by prefix: ``cbr``, ``scale``, ``low_classifier``, ``high_classifier``):

- ``"paper"``: the SE-like branch pools the stride-16 features with a 49x49 window at stride
  (16, 20), as the paper's Fig. 10 (TF DeepLab's ``image_pooling_crop_size`` / stride), VALID
  padding. At 1024x2048 the stride-16 map is 64x128 and the pooled map 1x4; it goes through a
  1x1 conv and a sigmoid and is upsampled bilinearly back to 64x128. Where the feature map is
  smaller than the window (crops, small images) the window shrinks to the map (global pooling).
- ``"torchvision"``: global average pooling, torchvision's ``lraspp_mobilenet_v3_large``.

Which taps are read is part of the variant (see :data:`VARIANT_TAPS` and docs/segmentation.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from mbv3_dense.backbone import MobileNetV3
from mbv3_dense.checkpoints.classes import network_class_names
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.layers import Normalize, NormLayer, default_norm_layer

Variant = Literal["paper", "torchvision"]

# (low tap at stride 8, high tap at stride 16) per variant.
# torchvision reads the first stride-8 block (features[4] for Large) and the last 1x1 conv.
# The paper's high tap is the last 1x1 conv too (TF DeepLab's final endpoint, layer_17 / layer_13
# of mobilenet_v3_{large,small}_seg); its low tap is at the end of the stride-8 stage
# (TF: layer_7 / layer_4 "depthwise_output"; the closest tap here is the stage's output).
# With these taps the MAdds at 1024x2048 are 9.92G (Large, +1.8% vs Table 7's 9.74G) and 2.83G
# (Small, -2.3% vs 2.90G); reading the stride-16 block output instead of c5 gives 6.56G / 1.61G.
VARIANT_TAPS: dict[str, tuple[str, str]] = {
    "paper": ("stride8", "c5"),
    "torchvision": ("stride8_entry", "c5"),
}

# Paper Fig. 10: "49x49 avg-pool, stride (16, 20)".
PAPER_POOL_KERNEL = (49, 49)
PAPER_POOL_STRIDE = (16, 20)


class ClampedAvgPool2d(nn.Module):
    """Average pooling with a fixed window and stride whose window shrinks to the input's size.

    ``kernel_size=None`` is global average pooling (output ``1x1``). No padding (TF "VALID").
    """

    def __init__(self, kernel_size: tuple[int, int] | None, stride: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.kernel_size = None if kernel_size is None else tuple(kernel_size)
        self.stride = self.kernel_size if stride is None else tuple(stride)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel_size is None:
            return F.adaptive_avg_pool2d(x, 1)
        h, w = int(x.shape[-2]), int(x.shape[-1])  # plain ints: ONNX export fixes the window
        kernel = (min(self.kernel_size[0], h), min(self.kernel_size[1], w))
        return F.avg_pool2d(x, kernel, stride=self.stride)

    def extra_repr(self) -> str:
        return "global" if self.kernel_size is None else f"kernel_size={self.kernel_size}, stride={self.stride}"


class LRASPPHead(nn.Module):
    """The LR-ASPP decoder.

    ``forward(low, high)`` takes the stride-8 features ``[N, C_low, H/8, W/8]`` and the stride-16
    features ``[N, C_high, H/16, W/16]`` and returns logits ``[N, num_classes, H/8, W/8]``:
    ``low_classifier(low) + high_classifier(up(cbr(high) * up(sigmoid(conv(pool(high))))))``.

    Args:
        low_channels: channels of the stride-8 features.
        high_channels: channels of the stride-16 features.
        num_classes: output classes.
        head_channels: width of the ``cbr`` and ``scale`` branches (128 in the paper).
        pool_kernel: the SE-like branch's pooling window; ``None`` is global pooling.
        pool_stride: its stride (ignored for global pooling).
        norm_layer: the norm of the ``cbr`` branch.
    """

    def __init__(self, *, low_channels: int, high_channels: int, num_classes: int, head_channels: int = 128,
                 pool_kernel: tuple[int, int] | None = PAPER_POOL_KERNEL,
                 pool_stride: tuple[int, int] | None = PAPER_POOL_STRIDE,
                 norm_layer: NormLayer = default_norm_layer) -> None:
        super().__init__()
        self.cbr = nn.Sequential(
            nn.Conv2d(high_channels, head_channels, 1, bias=False),
            norm_layer(head_channels),
            nn.ReLU(inplace=True),
        )
        self.scale = nn.Sequential(
            ClampedAvgPool2d(pool_kernel, pool_stride),
            nn.Conv2d(high_channels, head_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(head_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        x = self.cbr(high)
        s = self.scale(high)
        if s.shape[-2:] != (1, 1):  # a 1x1 gate broadcasts; a coarse map is upsampled back (Fig. 10)
            s = F.interpolate(s, size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = F.interpolate(x * s, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(nn.Module):
    """MobileNetV3 backbone + LR-ASPP decoder.

    Input: float ``[N, 3, H, W]`` normalised with ImageNet mean/std by :attr:`normalize` (a
    :class:`~mbv3_dense.layers.Normalize` of :data:`~mbv3_dense.constants.IMAGENET_MEAN` / ``IMAGENET_STD``).
    Output: logits ``[N, num_classes, H, W]`` over Cityscapes trainIds (0..18) at input size, bilinearly upsampled.

    Args:
        backbone: a :class:`MobileNetV3` whose ``out_features`` are ``(low_feature, high_feature)``.
        head: the decoder.
        low_feature: name of the stride-8 tap.
        high_feature: name of the stride-16 tap.
        class_names: the name of each class (output channel), kept as :attr:`class_names` and recorded
            in checkpoints; ``None``: unknown.
    """

    def __init__(self, *, backbone: MobileNetV3, head: LRASPPHead, low_feature: str, high_feature: str,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if set(backbone.out_features) != {low_feature, high_feature}:
            raise ValueError(f"backbone must return ({low_feature!r}, {high_feature!r}), "
                             f"it returns {backbone.out_features}")
        self.backbone = backbone
        self.head = head
        self.low_feature = low_feature
        self.high_feature = high_feature
        self.num_classes = head.low_classifier.out_channels
        self.class_names = network_class_names(class_names, self.num_classes)
        self.normalize = Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        out = self.head(features[self.low_feature], features[self.high_feature])
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def class_layers(self) -> tuple[str, ...]:
        """The layers whose outputs are the classes (re-initialised for another class list)."""
        return ("head.low_classifier", "head.high_classifier")
