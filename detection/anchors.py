"""SSD default boxes (Liu et al., 2016, section 2.2 "Choosing scales and aspect ratios").

Computed as torchvision's ``DefaultBoxGenerator`` does, so that its SSDLite weights decode to the
same boxes: scales ``s_k = min + (max - min) * k / (m - 1)`` for the ``m`` maps plus a final 1.0,
per location the boxes ``(s_k, s_k)``, ``(s'_k, s'_k)`` with ``s'_k = sqrt(s_k s_{k+1})``, then
``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose for every ratio ``r``; widths and heights are
clipped to [0, 1] (relative to the input), centres at ``(j + 0.5) / f_k``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class DefaultBoxes(nn.Module):
    """Default boxes for a fixed set of feature maps.

    Args:
        aspect_ratios: per feature map, the ratios ``r`` besides 1 (each adds two boxes).
        min_scale: scale of the first map, relative to the input side.
        max_scale: scale of the last map.
        clip: clip the relative widths/heights to [0, 1] before converting to corners.
    """

    def __init__(self, *, aspect_ratios: tuple[tuple[float, ...], ...] = ((2, 3),) * 6, min_scale: float = 0.2,
                 max_scale: float = 0.95, clip: bool = True) -> None:
        super().__init__()
        m = len(aspect_ratios)
        if m < 2:
            raise ValueError("need at least two feature maps")
        self.aspect_ratios = tuple(tuple(r) for r in aspect_ratios)
        self.scales = [min_scale + (max_scale - min_scale) * k / (m - 1.0) for k in range(m)] + [1.0]
        self.clip = clip
        self._cache: dict[tuple, Tensor] = {}

    def num_boxes_per_location(self) -> list[int]:
        """Boxes per feature-map location: 2 + 2 per ratio."""
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def _wh(self, k: int) -> Tensor:
        s, s_next = self.scales[k], self.scales[k + 1]
        pairs = [[s, s], [math.sqrt(s * s_next)] * 2]
        for r in self.aspect_ratios[k]:
            w, h = s * math.sqrt(r), s / math.sqrt(r)
            pairs += [[w, h], [h, w]]
        wh = torch.as_tensor(pairs, dtype=torch.float32)
        return wh.clamp(0, 1) if self.clip else wh

    def forward(self, grid_sizes: list[tuple[int, int]], image_size: tuple[int, int]) -> Tensor:
        """Default boxes ``[A, 4]`` XYXY in input pixels, ordered map by map, then row-major
        location, then box within location (the order of the heads' outputs).

        Args:
            grid_sizes: ``(height, width)`` of every feature map.
            image_size: ``(height, width)`` of the network input.
        """
        key = (tuple(tuple(int(v) for v in g) for g in grid_sizes), tuple(int(v) for v in image_size))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        if len(grid_sizes) != len(self.aspect_ratios):
            raise ValueError(f"{len(grid_sizes)} feature maps for {len(self.aspect_ratios)} sets of ratios")
        boxes = []
        for k, (fh, fw) in enumerate(key[0]):
            cx = (torch.arange(fw) + 0.5) / fw
            cy = (torch.arange(fh) + 0.5) / fh
            cy, cx = torch.meshgrid(cy.float(), cx.float(), indexing="ij")
            wh = self._wh(k)
            centres = torch.stack((cx.reshape(-1), cy.reshape(-1)), dim=-1).repeat_interleave(len(wh), dim=0)
            boxes.append(torch.cat((centres, wh.repeat(fh * fw, 1)), dim=1))
        cxcywh = torch.cat(boxes)
        scale = torch.tensor([image_size[1], image_size[0]], dtype=torch.float32)
        corners = torch.cat(((cxcywh[:, :2] - 0.5 * cxcywh[:, 2:]) * scale,
                             (cxcywh[:, :2] + 0.5 * cxcywh[:, 2:]) * scale), dim=1)
        self._cache[key] = corners
        return corners
