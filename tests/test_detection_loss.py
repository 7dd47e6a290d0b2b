"""Box coder, matcher and SSD loss."""

from __future__ import annotations

import torch

from detection.box_coder import BoxCoder
from detection.loss import SSDLoss, match_default_boxes


def test_box_coder_round_trip():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 200
    anchors = torch.cat((xy, xy + 10 + torch.rand(50, 2, generator=gen) * 100), 1)
    xy = torch.rand(50, 2, generator=gen) * 200
    boxes = torch.cat((xy, xy + 5 + torch.rand(50, 2, generator=gen) * 100), 1)
    coder = BoxCoder()
    codes = coder.encode(boxes, anchors)
    torch.testing.assert_close(coder.decode(codes, anchors), boxes, atol=1e-3, rtol=0)
    torch.testing.assert_close(coder.encode(anchors, anchors), torch.zeros(50, 4))


def test_matcher_threshold_and_forced_best_match():
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 20, 20], [100, 100, 110, 110], [50, 50, 60, 60.0]])
    gts = torch.tensor([[0, 0, 19, 19], [200, 200, 260, 260.0]])  # the second overlaps nothing
    m = match_default_boxes(gts, anchors, 0.5)
    assert m[1] == 0  # IoU 0.9
    assert m[2] == -1 and m[3] == -1  # IoU 0
    # The far box has IoU 0 with everything but is still forced onto its best (argmax) default box,
    # here anchor 0, whose own IoU with the first box (0.28) is below the threshold.
    assert (m == 1).sum() == 1
    m = match_default_boxes(gts[:1], anchors, 0.5)
    assert m.tolist() == [-1, 0, -1, -1]
    assert match_default_boxes(torch.zeros(0, 4), anchors).eq(-1).all()


def _outputs(a: int, c: int, n: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"box_regression": torch.randn(n, a, 4, generator=gen, requires_grad=True),
            "cls_logits": torch.randn(n, a, c, generator=gen, requires_grad=True)}


def _anchors(n: int = 20) -> torch.Tensor:
    xy = torch.stack(torch.meshgrid(torch.arange(n) * 16.0, torch.arange(n) * 16.0, indexing="xy"), -1).reshape(-1, 2)
    return torch.cat((xy, xy + 32), 1)


def test_empty_image_gives_zero_box_loss():
    anchors = _anchors()
    for classification in ("hard_negative_mining", "focal"):
        out = _outputs(len(anchors), 4)
        losses = SSDLoss(classification=classification)(
            out, anchors, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
        assert losses["box_loss"].item() == 0.0
        assert torch.isfinite(losses["loss"])
        losses["loss"].backward()
        assert torch.isfinite(out["cls_logits"].grad).all()


def test_crowded_image_and_hard_negative_ratio():
    anchors = _anchors()
    gen = torch.Generator().manual_seed(1)
    xy = torch.rand(60, 2, generator=gen) * 250
    boxes = torch.cat((xy, xy + 20 + torch.rand(60, 2, generator=gen) * 40), 1)
    target = {"boxes": boxes, "labels": torch.randint(1, 4, (60,), generator=gen)}
    loss = SSDLoss()
    out = _outputs(len(anchors), 4, n=2)
    losses = loss(out, anchors, [target, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert losses["num_positives"] >= len(match_default_boxes(boxes, anchors).unique()) - 1
    assert torch.isfinite(losses["loss"]) and losses["box_loss"] > 0 and losses["cls_loss"] > 0
    labels, _ = loss.targets(anchors, [target])
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3}
    assert (labels > 0).sum() == losses["num_positives"]
