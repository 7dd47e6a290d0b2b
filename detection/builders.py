"""``ssdlite_mobilenet_v3_large`` / ``ssdlite_mobilenet_v3_small``: the model as the paper and torchvision build it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from detection.anchors import DefaultBoxes
from detection.model import EXTRA_CHANNELS, ScoreActivation, SSDLite, normal_init, ssd_norm_layer
from mbv3_dense.backbone import Arch, MobileNetV3
from mbv3_dense.checkpoints.classes import BACKGROUND
from mbv3_dense.checkpoints.weights import load_backbone_weights


def _build(arch: Arch, *, num_classes: int, reduced_tail: bool, width_mult: float, weights: str | Path | None,
           weights_backbone: str | Path | None, score_activation: ScoreActivation, score_thresh: float,
           topk_candidates: int, nms_thresh: float, detections_per_img: int,
           class_names: Sequence[str] | None, keep_class_rows: bool) -> SSDLite:
    backbone = MobileNetV3(arch=arch, width_mult=width_mult, reduced_tail=reduced_tail, norm_layer=ssd_norm_layer,
                           out_features=("c4_expand", "c5"))
    if weights_backbone is not None and weights is None:
        load_backbone_weights(backbone, weights_backbone)
    else:
        normal_init(backbone)  # torchvision's from-scratch initialisation of the backbone
    # Extras scale with the width, never below 16 channels (torchvision's get_depth).
    extras = tuple(max(16, int(c * width_mult)) for c in EXTRA_CHANNELS)
    model = SSDLite(backbone=backbone, num_classes=num_classes, extra_channels=extras,
                    default_boxes=DefaultBoxes(aspect_ratios=((2, 3),) * 6, min_scale=0.2, max_scale=0.95),
                    score_activation=score_activation, score_thresh=score_thresh,
                    topk_candidates=topk_candidates, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                    class_names=_with_background(class_names, num_classes))
    if weights is not None:
        from detection.weights import load_ssdlite_weights

        load_ssdlite_weights(model, weights, keep_class_rows=keep_class_rows)
    return model


def _with_background(names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    """Label names with background at 0: the objects' names alone (``num_classes - 1``) get it prepended."""
    if names is not None and not isinstance(names, str) and len(names) == num_classes - 1:
        return [BACKGROUND, *names]
    return None if names is None else list(names)


def ssdlite_mobilenet_v3_large(
    *,
    num_classes: int = 91,
    reduced_tail: bool = True,
    width_mult: float = 1.0,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    score_activation: ScoreActivation = "softmax",
    score_thresh: float = 0.001,
    topk_candidates: int = 300,
    nms_thresh: float = 0.55,
    detections_per_img: int = 300,
    class_names: list[str] | None = None,
    keep_class_rows: bool = True,
) -> SSDLite:
    """SSDLite320 on MobileNetV3-Large (3.44M params, 0.58 GMAdds with 91 classes and the reduced tail).

    Args:
        num_classes: classes including background (91: torchvision/COCO-id layout; 81: contiguous).
        reduced_tail: halve the last stage (the paper's detection variant, Table 6).
        width_mult: backbone and extra-layer width multiplier.
        weights: an SSDLite checkpoint: ours (``.ckpt`` or state dict) or torchvision's state dict. One with
            other classes loads too: everything but the class predictors as it is, those afresh except the
            background row and the rows of classes named alike in ``class_names`` and the checkpoint
            (torchvision's COCO names for its 91-class files; logged, :mod:`mbv3_dense.checkpoints.transfer`).
        weights_backbone: an ImageNet classifier checkpoint (any layout the classifier reads; head dropped).
            Its tail must match ``reduced_tail``. Ignored when ``weights`` is given.
        score_activation: ``"softmax"`` for cross-entropy training, ``"sigmoid"`` for focal loss.
        score_thresh: postprocess score threshold.
        topk_candidates: boxes kept per class before NMS.
        nms_thresh: NMS IoU threshold.
        detections_per_img: detections kept per image.
        class_names: the name of each label, background first (or the ``num_classes - 1`` object names).
        keep_class_rows: with ``weights`` of other classes, the pretrained rows of the classes named alike
            are kept, and the background's (False: the whole class layer starts fresh).
    """
    return _build("large", **locals())  # the arguments above, by name


def ssdlite_mobilenet_v3_small(
    *,
    num_classes: int = 91,
    reduced_tail: bool = True,
    width_mult: float = 1.0,
    weights: str | Path | None = None,
    weights_backbone: str | Path | None = None,
    score_activation: ScoreActivation = "softmax",
    score_thresh: float = 0.001,
    topk_candidates: int = 300,
    nms_thresh: float = 0.55,
    detections_per_img: int = 300,
    class_names: list[str] | None = None,
    keep_class_rows: bool = True,
) -> SSDLite:
    """SSDLite320 on MobileNetV3-Small; arguments as :func:`ssdlite_mobilenet_v3_large`."""
    return _build("small", **locals())  # the arguments above, by name
