"""SSDLite (MobileNetV2 paper section 6.2; MobileNetV3 paper section 6.3) on a MobileNetV3 backbone.

Feature maps: C4 (the expansion output of the first stride-32 bottleneck, stride 16), C5 (the last
1x1 conv, stride 32), then four extra blocks (1x1 -> depthwise 3x3 stride 2 -> 1x1, ReLU6), each
with a depthwise-separable classification and box head. Numerically the same as torchvision's
``ssdlite320_mobilenet_v3_large`` given the same weights (:mod:`detection.weights` converts them).

Contracts:

- ``normalize(x)``: maps [0, 1] images to the network's input range ([-1, 1] by default: a
  :class:`~mbv3_dense.layers.Normalize` of ``image_mean`` and ``image_std``, as every network's).
- ``forward(x)``: ``x`` float ``[N, 3, H, W]``, normalised and resized to ``image_size``. Returns raw
  outputs ``{"box_regression": [N, A, 4], "cls_logits": [N, A, C]}`` for the ``A`` default boxes of
  :meth:`SSDLite.default_boxes`; class 0 is background.
- ``preprocess(images)``: list of [0, 1] images of any sizes -> ``forward``'s input (normalised, then
  resized bilinearly, in torchvision's order so that results agree to the last bit).
- ``predict(images)``: list of float ``[3, H_i, W_i]`` images in [0, 1], any sizes; returns per image
  ``{"boxes": [K, 4] XYXY in that image's pixels, "scores": [K], "labels": [K] int64}``. Labels are
  the model's class indices (1..C-1), not COCO category ids: :mod:`detection.data` converts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from detection.anchors import DefaultBoxes
from detection.box_coder import BoxCoder
from mbv3_dense.backbone import MobileNetV3
from mbv3_dense.checkpoints.classes import network_class_names
from mbv3_dense.layers import ConvNormAct, Normalize, NormLayer


def batched_nms_best(boxes: Tensor | Callable[[Tensor], Tensor], scores: Tensor, labels: Tensor,
                     iou_threshold: float, max_keep: int, *, first_chunk: int = 1200) -> Tensor:
    """The first ``max_keep`` indices of ``batched_nms(boxes, scores, labels, iou_threshold)``, cheaply.

    Whether a box survives class-wise NMS depends only on the higher-scoring boxes of its class, so
    NMS over the best-scoring ``k`` candidates yields exactly the leading survivors of NMS over all
    of them. ``k`` starts at ``first_chunk`` and grows (by the survival rate seen so far) until
    ``max_keep`` boxes survive or every candidate is in. With untrained weights (tens of thousands of
    candidates) this replaces torchvision's per-class loop, which it uses above 4000 boxes on the
    CPU, by one or two NMS calls.

    ``boxes``: ``[n, 4]``, or a function from candidate indices to their boxes (so that only the
    boxes NMS looks at are computed).

    Returns: indices into ``scores`` (the candidates), by decreasing score.
    """
    total = scores.numel()

    def boxes_of(candidates: Tensor) -> Tensor:
        return boxes(candidates) if callable(boxes) else boxes[candidates]

    if total <= first_chunk:
        every = boxes(torch.arange(total, device=scores.device)) if callable(boxes) else boxes
        return batched_nms(every, scores, labels, iou_threshold)[:max_keep]
    order = scores.argsort(descending=True, stable=True)
    k = max(first_chunk, 4 * max_keep)
    while True:
        k = min(k, total)
        candidates = order[:k]
        kept = batched_nms(boxes_of(candidates), scores[candidates], labels[candidates], iou_threshold)
        if kept.numel() >= max_keep or k == total:
            return candidates[kept[:max_keep]]
        # Enough candidates for max_keep survivors at the rate seen so far, with a margin (at most 4x).
        k = int(k * min(4.0, max(1.25, 1.25 * max_keep / max(kept.numel(), 1))))

# torchvision's SSDLite norm layer (backbone, extras and heads): TF's BN decay 0.97, eps 1e-3.
ssd_norm_layer: NormLayer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)
# Section 6.3: extra feature layers after C5 (output channels; each halves the resolution).
EXTRA_CHANNELS: tuple[int, ...] = (512, 256, 256, 128)
ScoreActivation = Literal["softmax", "sigmoid"]


def relu6_layer(inplace: bool = True) -> nn.Module:
    return nn.ReLU6(inplace=inplace)


def normal_init(module: nn.Module, std: float = 0.03) -> None:
    """Convs ~ N(0, std), biases 0: torchvision's SSDLite initialisation (from-scratch training)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class ExtraBlock(nn.Sequential):
    """1x1 to ``out // 2`` -> depthwise 3x3 stride 2 -> 1x1 to ``out``, each with BN and ReLU6."""

    def __init__(self, in_channels: int, out_channels: int, *, norm_layer: NormLayer) -> None:
        mid = out_channels // 2
        super().__init__(
            ConvNormAct(in_channels, mid, norm_layer=norm_layer, activation=relu6_layer),
            ConvNormAct(mid, mid, kernel_size=3, stride=2, groups=mid, norm_layer=norm_layer,
                        activation=relu6_layer),
            ConvNormAct(mid, out_channels, norm_layer=norm_layer, activation=relu6_layer),
        )
        self.out_channels = out_channels


class PredictionBlock(nn.Sequential):
    """Depthwise 3x3 (BN, ReLU6) -> 1x1 conv with bias to ``boxes * columns`` channels."""

    def __init__(self, in_channels: int, out_channels: int, *, norm_layer: NormLayer) -> None:
        super().__init__(
            ConvNormAct(in_channels, in_channels, kernel_size=3, groups=in_channels, norm_layer=norm_layer,
                        activation=relu6_layer),
            nn.Conv2d(in_channels, out_channels, 1),
        )


def _flatten_predictions(outputs: list[Tensor], columns: int) -> Tensor:
    """``[N, B*K, H, W]`` per map -> ``[N, sum(H*W*B), K]`` (location-major, then box)."""
    flat = []
    for out in outputs:
        n, _, h, w = out.shape
        flat.append(out.view(n, -1, columns, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, columns))
    return torch.cat(flat, dim=1)


class SSDLite(nn.Module):
    """SSDLite detector: backbone taps C4/C5 + extra blocks + depthwise-separable heads.

    Args:
        backbone: a :class:`MobileNetV3` whose ``out_features`` are ``("c4_expand", "c5")``.
        num_classes: classes including background (91: torchvision's COCO layout, where the label
            is the COCO category id; 81: contiguous COCO labels).
        extra_channels: output channels of the extra blocks.
        default_boxes: the default box generator (one set of ratios per feature map).
        image_size: ``(height, width)`` of the network input; ``predict`` resizes to it.
        image_mean: per-channel mean of the [0, 1] input (0.5: inputs are mapped to [-1, 1]).
        image_std: per-channel std.
        norm_layer: norm of the extra blocks and heads.
        score_activation: ``"softmax"`` (cross-entropy training) or ``"sigmoid"`` (focal loss).
        score_thresh: detections scoring at most this are dropped.
        topk_candidates: best boxes kept per class before NMS.
        nms_thresh: IoU threshold of the per-class NMS.
        detections_per_img: detections kept per image after NMS.
        box_coder: the box parametrisation.
        class_names: the name of each label (index 0 is ``"__background__"``), kept as :attr:`class_names`
            and recorded in checkpoints; ``None``: unknown.
    """

    def __init__(
        self,
        *,
        backbone: MobileNetV3,
        num_classes: int,
        extra_channels: tuple[int, ...] = EXTRA_CHANNELS,
        default_boxes: DefaultBoxes | None = None,
        image_size: tuple[int, int] = (320, 320),
        image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
        image_std: tuple[float, float, float] = (0.5, 0.5, 0.5),
        norm_layer: NormLayer = ssd_norm_layer,
        score_activation: ScoreActivation = "softmax",
        score_thresh: float = 0.001,
        topk_candidates: int = 300,
        nms_thresh: float = 0.55,
        detections_per_img: int = 300,
        box_coder: BoxCoder | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if tuple(backbone.out_features) != ("c4_expand", "c5"):
            raise ValueError(f"SSDLite reads the 'c4_expand' and 'c5' taps, got {backbone.out_features}")
        if score_activation not in ("softmax", "sigmoid"):
            raise ValueError(f"score_activation must be 'softmax' or 'sigmoid', got {score_activation!r}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.class_names = network_class_names(class_names, num_classes)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.score_activation = score_activation
        self.score_thresh = score_thresh
        self.topk_candidates = topk_candidates
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.box_coder = box_coder or BoxCoder()
        self.default_box_generator = default_boxes or DefaultBoxes()

        c4, c5 = backbone.feature_info["c4_expand"], backbone.feature_info["c5"]
        channels = [c4.channels, c5.channels]
        self.feature_strides = [c4.stride, c5.stride]
        extra: list[nn.Module] = []
        for out in extra_channels:
            extra.append(ExtraBlock(channels[-1], out, norm_layer=norm_layer))
            channels.append(out)
            self.feature_strides.append(self.feature_strides[-1] * 2)
        self.extra = nn.ModuleList(extra)
        boxes = self.default_box_generator.num_boxes_per_location()
        if len(boxes) != len(channels):
            raise ValueError(f"{len(channels)} feature maps but default boxes for {len(boxes)}")
        self.cls_head = nn.ModuleList(
            PredictionBlock(c, b * num_classes, norm_layer=norm_layer) for c, b in zip(channels, boxes, strict=True)
        )
        self.box_head = nn.ModuleList(
            PredictionBlock(c, b * 4, norm_layer=norm_layer) for c, b in zip(channels, boxes, strict=True)
        )
        self.feature_channels = channels
        normal_init(self.extra)
        normal_init(self.cls_head)
        normal_init(self.box_head)
        self.normalize = Normalize(image_mean, image_std)

    def class_layers(self) -> list[str]:
        """The layers whose outputs are per class: each map's class predictor (``B x num_classes`` channels,
        box-major). Re-initialised for another class list (:mod:`mbv3_dense.checkpoints.transfer`)."""
        return [f"cls_head.{i}.1" for i in range(len(self.cls_head))]

    # ------------------------------------------------------------------ raw network
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: ``[N, 3, H, W]`` normalised (:attr:`normalize`).

        Returns: ``box_regression [N, A, 4]`` (box codes), ``cls_logits [N, A, C]``.
        """
        taps = self.backbone(x)
        features = [taps["c4_expand"], taps["c5"]]
        for block in self.extra:
            features.append(block(features[-1]))
        return {
            "box_regression": _flatten_predictions([h(f) for h, f in zip(self.box_head, features, strict=True)], 4),
            "cls_logits": _flatten_predictions([h(f) for h, f in zip(self.cls_head, features, strict=True)],
                                               self.num_classes),
        }

    def grid_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Feature-map sizes for an input size: every stride-2 conv (padding 1) rounds up."""
        sizes = []
        for stride in self.feature_strides:
            h, w = height, width
            s = stride
            while s > 1:
                h, w, s = (h + 1) // 2, (w + 1) // 2, s // 2
            sizes.append((h, w))
        return sizes

    def default_boxes(self, height: int | None = None, width: int | None = None,
                      device: torch.device | None = None) -> Tensor:
        """Default boxes ``[A, 4]`` XYXY in input pixels for an input of ``height x width``
        (``image_size`` by default), in the order of the raw outputs."""
        height = height or self.image_size[0]
        width = width or self.image_size[1]
        boxes = self.default_box_generator(self.grid_sizes(height, width), (height, width))
        return boxes.to(device or self.normalize.mean.device)

    # ------------------------------------------------------------------ inference
    def preprocess(self, images: list[Tensor]) -> Tensor:
        """Normalise each ``[3, H, W]`` image in [0, 1], resize it to ``image_size`` (bilinear) and stack."""
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
                raise ValueError(f"image {i}: expected a float [3, H, W] tensor, got {img.dtype} {tuple(img.shape)}")
        mean, std = self.normalize.mean, self.normalize.std
        # (img - mean) / std as Normalize computes it, dividing in place (same values, one buffer fewer).
        resized = [F.interpolate(torch.sub(img, mean).div_(std)[None], size=self.image_size, mode="bilinear",
                                 align_corners=False) for img in images]
        return resized[0] if len(resized) == 1 else torch.cat(resized)

    def scores(self, cls_logits: Tensor) -> Tensor:
        """Per-class scores ``[N, A, C]`` from logits (softmax, or sigmoid for focal-loss training)."""
        if self.score_activation == "softmax":
            return F.softmax(cls_logits, dim=-1)
        return torch.sigmoid(cls_logits)

    def postprocess(self, outputs: dict[str, Tensor], original_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Raw outputs -> detections in each image's original pixels.

        Per class: score > ``score_thresh``, best ``topk_candidates``; then class-wise NMS
        (``torchvision.ops.batched_nms``) and the best ``detections_per_img``, as torchvision's SSD.
        Selection is vectorised over images and classes; only NMS runs image by image.

        Args:
            outputs: ``forward``'s output for inputs of ``image_size``.
            original_sizes: ``(height, width)`` of every image before resizing.
        """
        in_h, in_w = self.image_size
        codes, logits = outputs["box_regression"], outputs["cls_logits"]
        anchors = self.default_boxes(in_h, in_w, codes.device)
        scores = self.scores(logits)[..., 1:]  # background dropped: [N, A, C-1]
        k = min(self.topk_candidates, scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)  # [N, k, C-1], sorted per class
        # Class-major order (all of class 1, then class 2, ...), as torchvision concatenates them.
        top_scores, top_idx = top_scores.transpose(1, 2), top_idx.transpose(1, 2)  # [N, C-1, k]
        results = []
        for i, (orig_h, orig_w) in enumerate(original_sizes):
            s, idx = top_scores[i].reshape(-1), top_idx[i].reshape(-1)
            keep = (s > self.score_thresh).nonzero().squeeze(1)
            if keep.numel() < s.numel():
                s, idx = s[keep], idx[keep]
            else:
                keep = torch.arange(s.numel(), device=s.device)
            lab = keep.div(k, rounding_mode="floor") + 1

            # Only the anchors NMS looks at are decoded (decoding is element-wise: the same values).
            def boxes_of(j: Tensor, codes_i: Tensor = codes[i], idx: Tensor = idx) -> Tensor:
                a = idx[j]
                return clip_boxes_to_image(self.box_coder.decode(codes_i[a], anchors[a]), (in_h, in_w))

            kept = batched_nms_best(boxes_of, s, lab, self.nms_thresh, self.detections_per_img)
            b = boxes_of(kept)
            ratio_h = torch.tensor(orig_h, dtype=torch.float32) / torch.tensor(in_h, dtype=torch.float32)
            ratio_w = torch.tensor(orig_w, dtype=torch.float32) / torch.tensor(in_w, dtype=torch.float32)
            scale = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(b.device, b.dtype)
            results.append({"boxes": b * scale, "scores": s[kept], "labels": lab[kept]})
        return results

    @torch.no_grad()
    def predict(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Detect objects in float ``[3, H, W]`` images in [0, 1] of any sizes (call ``eval()`` first).

        Returns per image ``{"boxes": [K, 4] XYXY in its pixels, "scores": [K], "labels": [K]}``.
        """
        if not images:
            return []
        sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
        return self.postprocess(self(self.preprocess(images)), sizes)
