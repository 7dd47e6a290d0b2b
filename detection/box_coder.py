"""Box encoding relative to default boxes (Faster R-CNN parametrisation, SSD weights 10, 10, 5, 5).

``encode(boxes, anchors)`` gives ``(wx * dx / wa, wy * dy / ha, ww * log(w / wa), wh * log(h / ha))``
with ``dx, dy`` the centre offsets; ``decode`` inverts it, clamping the log-size terms at
``log(1000 / 16)`` as torchvision does. Boxes are XYXY in pixels.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class BoxCoder:
    """Args: weights: ``(wx, wy, ww, wh)``; clip: upper bound of the decoded log-size terms."""

    def __init__(self, weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 clip: float = math.log(1000.0 / 16)) -> None:
        self.weights = tuple(float(w) for w in weights)
        self.clip = clip

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        """Args: boxes, anchors: ``[..., 4]`` XYXY, broadcastable. Returns: ``[..., 4]`` codes."""
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        bw = boxes[..., 2] - boxes[..., 0]
        bh = boxes[..., 3] - boxes[..., 1]
        bx = boxes[..., 0] + 0.5 * bw
        by = boxes[..., 1] + 0.5 * bh
        return torch.stack((wx * (bx - ax) / aw, wy * (by - ay) / ah,
                            ww * torch.log(bw / aw), wh * torch.log(bh / ah)), dim=-1)

    def decode(self, codes: Tensor, anchors: Tensor) -> Tensor:
        """Args: codes: ``[..., 4]``; anchors: ``[..., 4]`` XYXY, broadcastable. Returns: XYXY ``[..., 4]``."""
        anchors = anchors.to(codes.dtype)
        wx, wy, ww, wh = self.weights
        aw = anchors[..., 2] - anchors[..., 0]
        ah = anchors[..., 3] - anchors[..., 1]
        ax = anchors[..., 0] + 0.5 * aw
        ay = anchors[..., 1] + 0.5 * ah
        cx = codes[..., 0] / wx * aw + ax
        cy = codes[..., 1] / wy * ah + ay
        w = torch.exp(torch.clamp(codes[..., 2] / ww, max=self.clip)) * aw
        h = torch.exp(torch.clamp(codes[..., 3] / wh, max=self.clip)) * ah
        return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
