"""``lraspp_mobilenet_v3_large`` / ``lraspp_mobilenet_v3_small``: LR-ASPP as the paper (or torchvision) builds it."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from torch import nn

from mbv3_dense.backbone import Arch, MobileNetV3
from mbv3_dense.layers import default_norm_layer
from segmentation.model import (
    LRASPP,
    PAPER_POOL_KERNEL,
    PAPER_POOL_STRIDE,
    VARIANT_TAPS,
    LRASPPHead,
    Variant,
)


def _build(arch: Arch, *, num_classes: int, variant: Variant, reduced_tail: bool | None, output_stride: int,
           head_channels: int, width_mult: float, weights: str | Path | None,
           weights_backbone: str | Path | None, class_names: Sequence[str] | None,
           keep_class_rows: bool) -> LRASPP:
    if variant not in VARIANT_TAPS:
        raise ValueError(f"variant must be 'paper' or 'torchvision', got {variant!r}")
    if reduced_tail is None:
        reduced_tail = variant == "paper"
    low, high = VARIANT_TAPS[variant]
    backbone = MobileNetV3(arch=arch, width_mult=width_mult, reduced_tail=reduced_tail,
                           output_stride=output_stride, out_features=(low, high))
    if weights_backbone is not None and weights is None:
        from mbv3_dense.checkpoints.weights import load_backbone_weights

        load_backbone_weights(backbone, weights_backbone)
    if variant == "paper":
        pool: dict = {"pool_kernel": PAPER_POOL_KERNEL, "pool_stride": PAPER_POOL_STRIDE,
                      "norm_layer": default_norm_layer}
    else:  # torchvision's head: global pooling, nn.BatchNorm2d defaults (eps 1e-5, momentum 0.1)
        pool = {"pool_kernel": None, "pool_stride": None, "norm_layer": partial(nn.BatchNorm2d)}
    head = LRASPPHead(low_channels=backbone.feature_info[low].channels,
                      high_channels=backbone.feature_info[high].channels,
                      num_classes=num_classes, head_channels=head_channels, **pool)
    model = LRASPP(backbone=backbone, head=head, low_feature=low, high_feature=high, class_names=class_names)
    if weights is not None:
        from segmentation.weights import load_lraspp_weights

        load_lraspp_weights(model, weights, keep_class_rows=keep_class_rows)
    return model


def lraspp_mobilenet_v3_large(*, num_classes: int = 19, variant: Variant = "paper",
                              reduced_tail: bool | None = None, output_stride: int = 16,
                              head_channels: int = 128, width_mult: float = 1.0,
                              weights: str | None = None, weights_backbone: str | None = None,
                              class_names: list[str] | None = None, keep_class_rows: bool = True) -> LRASPP:
    """LR-ASPP on MobileNetV3-Large.

    Args:
        num_classes: output classes (19 Cityscapes trainIds; 21 for torchvision's checkpoints).
        variant: ``"paper"`` (Fig. 10 decoder) or ``"torchvision"`` (global pooling).
        reduced_tail: halve the last stage (the paper's RF2); default on for ``paper``, off for
            ``torchvision``.
        output_stride: 16 (the paper, Table 7) or 8; the last stage is dilated.
        head_channels: width of the decoder branches (128, Table 7 "head filters").
        width_mult: backbone width multiplier.
        weights: an LR-ASPP checkpoint (torchvision's ``lraspp_mobilenet_v3_large`` state dict or
            one of our Lightning ``.ckpt``). One with other classes loads too: everything but the two
            classifiers as it is, those afresh except the rows of classes named alike in ``class_names``
            and the checkpoint (torchvision's files: the 21 Pascal VOC classes; :mod:`mbv3_dense.checkpoints.transfer`).
        weights_backbone: an ImageNet classifier checkpoint (any layout :mod:`mbv3_dense.checkpoints.weights`
            reads); its head is dropped. Ignored when ``weights`` is given.
        class_names: the name of each class, in output order (Cityscapes: the 19 trainId names).
        keep_class_rows: with ``weights`` of other classes, the pretrained rows of the classes named alike
            are kept (False: the whole class layer starts fresh).
    """
    return _build("large", **locals())  # the arguments above, by name


def lraspp_mobilenet_v3_small(*, num_classes: int = 19, variant: Variant = "paper",
                              reduced_tail: bool | None = None, output_stride: int = 16,
                              head_channels: int = 128, width_mult: float = 1.0,
                              weights: str | None = None, weights_backbone: str | None = None,
                              class_names: list[str] | None = None, keep_class_rows: bool = True) -> LRASPP:
    """LR-ASPP on MobileNetV3-Small; arguments as :func:`lraspp_mobilenet_v3_large`."""
    return _build("small", **locals())  # the arguments above, by name
