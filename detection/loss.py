"""SSD training targets and loss (Liu et al., 2016, section 2.2), as torchvision trains SSDLite.

Matching: each default box takes the ground truth it overlaps most if that IoU is >= 0.5; each
ground truth is also forced onto its best default box (so no object goes unmatched). Loss:
smooth-L1 on the box codes of the matched boxes, plus cross-entropy over the matched boxes and
the hardest negatives (3 per positive, per image), both divided by the number of matched boxes
in the batch. Alternatively a sigmoid focal loss over all boxes (the TF object detection recipe).
An image without ground truth contributes no box loss and no positives (never NaN).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou, sigmoid_focal_loss

from detection.box_coder import BoxCoder

Classification = Literal["hard_negative_mining", "focal"]


def match_default_boxes(gt_boxes: Tensor, anchors: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Index of the ground truth matched to every default box, -1 for background.

    Args:
        gt_boxes: ``[G, 4]`` XYXY.
        anchors: ``[A, 4]`` XYXY, same pixel space.
        iou_threshold: a default box is positive when its best IoU is at least this.

    Returns: ``[A]`` int64 in ``[-1, G)``. Every ground truth owns at least its best default box
    (if two share one, the later ground truth keeps it).
    """
    matches = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
    if gt_boxes.numel() == 0:
        return matches
    iou = box_iou(gt_boxes, anchors)  # [G, A]
    best_iou, best_gt = iou.max(dim=0)
    matches = torch.where(best_iou >= iou_threshold, best_gt, matches)
    matches[iou.argmax(dim=1)] = torch.arange(gt_boxes.shape[0], device=anchors.device)
    return matches


class SSDLoss:
    """SSD multibox loss.

    Args:
        iou_threshold: matcher threshold.
        classification: ``"hard_negative_mining"`` (softmax cross-entropy, torchvision) or
            ``"focal"`` (sigmoid focal loss over the foreground classes; pair with a model whose
            ``score_activation`` is ``"sigmoid"``).
        neg_pos_ratio: negatives kept per positive in hard negative mining.
        focal_alpha: focal loss alpha (weight of the positives).
        focal_gamma: focal loss gamma.
        box_coder: the box parametrisation (weights 10, 10, 5, 5).
    """

    def __init__(self, *, iou_threshold: float = 0.5, classification: Classification = "hard_negative_mining",
                 neg_pos_ratio: float = 3.0, focal_alpha: float = 0.75, focal_gamma: float = 2.0,
                 box_coder: BoxCoder | None = None) -> None:
        if classification not in ("hard_negative_mining", "focal"):
            raise ValueError(f"classification must be 'hard_negative_mining' or 'focal', got {classification!r}")
        self.iou_threshold = iou_threshold
        self.classification = classification
        self.neg_pos_ratio = neg_pos_ratio
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_coder = box_coder or BoxCoder()

    def targets(self, anchors: Tensor, targets: list[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
        """Per default box: class ``[N, A]`` (0 = background) and matched ground-truth box ``[N, A, 4]``."""
        labels, boxes = [], []
        for t in targets:
            matches = match_default_boxes(t["boxes"], anchors, self.iou_threshold)
            positive = matches >= 0
            idx = matches.clamp(min=0)
            if t["boxes"].numel():
                labels.append(torch.where(positive, t["labels"][idx], 0))
                boxes.append(t["boxes"][idx])
            else:
                labels.append(torch.zeros_like(matches))
                boxes.append(anchors.clone())
        return torch.stack(labels), torch.stack(boxes)

    def __call__(self, outputs: dict[str, Tensor], anchors: Tensor,
                 targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """Args:
            outputs: the model's raw ``box_regression [N, A, 4]`` and ``cls_logits [N, A, C]``.
            anchors: default boxes ``[A, 4]`` XYXY in input pixels.
            targets: per image ``boxes [G, 4]`` XYXY in input pixels and ``labels [G]`` (1..C-1).

        Returns: ``{"loss", "box_loss", "cls_loss"}`` (fp32 scalars) and ``num_positives``.
        """
        # In fp32 whatever the network ran in: under bf16/fp16 autocast the exponentials of the focal loss
        # and the sums over thousands of default boxes lose the small terms.
        with torch.autocast(outputs["cls_logits"].device.type, enabled=False):
            return self._loss(outputs["box_regression"].float(), outputs["cls_logits"].float(), anchors.float(),
                              targets)

    def _loss(self, codes: Tensor, logits: Tensor, anchors: Tensor,
              targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        cls_target, box_target = self.targets(anchors, [{**t, "boxes": t["boxes"].float()} for t in targets])
        positive = cls_target > 0
        num_pos = positive.sum()
        normaliser = num_pos.clamp(min=1).to(codes.dtype)
        target_codes = self.box_coder.encode(box_target[positive], anchors.expand_as(box_target)[positive])
        box_loss = F.smooth_l1_loss(codes[positive], target_codes, reduction="sum") / normaliser
        if self.classification == "focal":
            onehot = F.one_hot(cls_target, logits.shape[-1]).to(logits.dtype)[..., 1:]
            cls_loss = sigmoid_focal_loss(logits[..., 1:], onehot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                          reduction="sum") / normaliser
        else:
            ce = F.cross_entropy(logits.flatten(0, 1), cls_target.flatten(), reduction="none").view_as(cls_target)
            # Hard negative mining: per image, the neg_pos_ratio * positives highest-loss negatives.
            negative_loss = ce.detach().masked_fill(positive, -float("inf"))
            rank = negative_loss.argsort(dim=1, descending=True).argsort(dim=1)
            num_neg = self.neg_pos_ratio * positive.sum(dim=1, keepdim=True)
            negative = rank < num_neg
            cls_loss = (ce[positive].sum() + ce[negative].sum()) / normaliser
        return {"loss": box_loss + cls_loss, "box_loss": box_loss, "cls_loss": cls_loss, "num_positives": num_pos}
