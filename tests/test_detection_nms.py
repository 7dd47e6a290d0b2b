"""The prefix NMS used by SSDLite's postprocess keeps exactly what torchvision's batched_nms keeps."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from detection.model import batched_nms_best


def distinct_scores(n: int, gen: torch.Generator) -> torch.Tensor:
    """Scores in (0, 1] without exact ties: which of two tied boxes a sort puts first is not specified
    (it differs between CPUs and thread counts), and both implementations would be right."""
    return (torch.randperm(n, generator=gen).float() + 1) / n


@pytest.mark.parametrize("n, classes, max_keep", [(50, 3, 300), (3000, 5, 300), (20000, 90, 300), (20000, 2, 50)])
def test_batched_nms_best_equals_batched_nms(n, classes, max_keep):
    gen = torch.Generator().manual_seed(n + classes)
    xy = torch.rand(n, 2, generator=gen) * 300
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=gen) * 80 + 1], dim=1)
    scores = distinct_scores(n, gen)
    labels = torch.randint(1, classes + 1, (n,), generator=gen)
    expected = batched_nms(boxes, scores, labels, 0.55)[:max_keep]
    assert torch.equal(batched_nms_best(boxes, scores, labels, 0.55, max_keep), expected)


def test_batched_nms_best_when_few_survive():
    # Heavily overlapping boxes of one class: the prefix must grow until all candidates are seen.
    n = 5000
    gen = torch.Generator().manual_seed(7)
    boxes = torch.tensor([[10.0, 10.0, 50.0, 50.0]]).repeat(n, 1) + torch.rand(n, 1, generator=gen) * 0.5
    scores = distinct_scores(n, gen)
    labels = torch.ones(n, dtype=torch.long)
    expected = batched_nms(boxes, scores, labels, 0.5)[:300]
    assert torch.equal(batched_nms_best(boxes, scores, labels, 0.5, 300), expected)
    assert expected.numel() < 300
