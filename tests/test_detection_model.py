"""SSDLite model: torchvision parity (same weights -> same detections), size, postprocess contract."""

from __future__ import annotations

import pytest
import torch
from parity_utils import assert_input_dependent, assert_same_detections, calibrate_and_perturb
from torch import nn
from torchvision.models.detection import ssdlite320_mobilenet_v3_large

from detection import ssdlite_mobilenet_v3_large, ssdlite_mobilenet_v3_small
from detection.weights import from_torchvision_ssdlite
from mbv3_dense.checkpoints.weights import WeightsError
from mbv3_dense.complexity import count_madds, count_params


class _TorchvisionRaw(nn.Module):
    """torchvision's SSD backbone + head (its train-mode forward wants targets)."""

    def __init__(self, ssd: nn.Module) -> None:
        super().__init__()
        self.ssd = ssd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ssd.head(list(self.ssd.backbone(x).values()))["cls_logits"]


@pytest.fixture(scope="module")
def torchvision_pair(tmp_path_factory):
    torch.manual_seed(0)
    tv = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=91)
    calibrate_and_perturb(_TorchvisionRaw(tv), torch.rand(2, 3, 320, 320) * 2 - 1, seed=1)
    tv.eval()
    path = tmp_path_factory.mktemp("tv") / "ssdlite_tv.pth"
    torch.save(tv.state_dict(), path)
    ours = ssdlite_mobilenet_v3_large(num_classes=91, weights=path).eval()
    return tv, ours


def test_parity_with_torchvision(torchvision_pair):
    tv, ours = torchvision_pair
    gen = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 300, 400, generator=gen), torch.rand(3, 480, 256, generator=gen)]
    with torch.no_grad():
        ref = tv(images)
    got = ours.predict(images)
    raw = [_TorchvisionRaw(tv)(tv.transform([img])[0].tensors) for img in images]
    assert_input_dependent(raw[0], raw[1])
    for r, g in zip(ref, got, strict=True):
        assert len(r["boxes"]) > 0
        assert_same_detections(g, r)  # as sets: which of two exactly tied detections comes first is CPU-dependent


def test_size_matches_torchvision(torchvision_pair):
    tv, ours = torchvision_pair
    assert count_params(ours) == count_params(tv) == 3_440_060
    madds = count_madds(ours, torch.rand(1, 3, 320, 320))
    assert abs(madds / 1e9 - 0.583) < 0.002


def test_torchvision_key_conversion_splits_at_c4(torchvision_pair):
    tv, ours = torchvision_pair
    c4 = ours.backbone.feature_info["c4_expand"].index
    converted = from_torchvision_ssdlite(tv.state_dict(), c4)
    torch.testing.assert_close(converted[f"backbone.features.{c4}.block.0.0.weight"],
                               tv.state_dict()[f"backbone.features.0.{c4}.0.weight"])
    torch.testing.assert_close(converted[f"backbone.features.{c4}.block.1.0.weight"],
                               tv.state_dict()["backbone.features.1.0.1.0.weight"])
    torch.testing.assert_close(converted[f"backbone.features.{c4 + 1}.block.0.0.weight"],
                               tv.state_dict()["backbone.features.1.1.block.0.0.weight"])
    assert set(converted) == set(ours.state_dict())


def test_wrong_checkpoint_is_refused(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match="not an SSDLite checkpoint"):
        ssdlite_mobilenet_v3_small(num_classes=5, weights=path)


def test_small_forward_shapes_and_predict_contract():
    torch.manual_seed(0)
    model = ssdlite_mobilenet_v3_small(num_classes=5, detections_per_img=7, topk_candidates=20).eval()
    out = model(model.normalize(torch.rand(2, 3, 320, 320)))
    anchors = model.default_boxes()
    assert out["box_regression"].shape == (2, anchors.shape[0], 4)
    assert out["cls_logits"].shape == (2, anchors.shape[0], 5)
    assert anchors.shape[0] == 6 * (20 * 20 + 10 * 10 + 5 * 5 + 3 * 3 + 2 * 2 + 1)
    dets = model.predict([torch.rand(3, 100, 150), torch.rand(3, 64, 64)])
    for det, (h, w) in zip(dets, [(100, 150), (64, 64)], strict=True):
        assert len(det["boxes"]) <= 7
        assert det["boxes"][:, 0::2].max() <= w and det["boxes"][:, 1::2].max() <= h and det["boxes"].min() >= 0
        assert ((det["labels"] >= 1) & (det["labels"] <= 4)).all()
        assert (det["scores"] > model.score_thresh).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])
    assert model.predict([]) == []


def test_postprocess_limits_and_threshold():
    model = ssdlite_mobilenet_v3_small(num_classes=3, topk_candidates=2, nms_thresh=0.5, detections_per_img=3)
    a = model.default_boxes().shape[0]
    logits = torch.full((1, a, 3), -10.0)
    logits[0, :, 0] = 10.0  # background everywhere ...
    logits[0, [0, 500, 1000, 1500], 1] = 20.0  # ... except 4 class-1 boxes
    logits[0, [2000], 2] = 20.0
    out = {"box_regression": torch.zeros(1, a, 4), "cls_logits": logits}
    det = model.postprocess(out, [(320, 320)])[0]
    assert (det["labels"] == 1).sum() == 2  # top-k per class before NMS
    assert (det["labels"] == 2).sum() == 1
    model.score_thresh = 0.99
    det = model.postprocess({"box_regression": torch.zeros(1, a, 4), "cls_logits": torch.zeros(1, a, 3)},
                            [(320, 320)])[0]
    assert len(det["boxes"]) == 0 and det["boxes"].shape == (0, 4)


def test_lightning_checkpoint_loads(tmp_path):
    from detection.module import DetectionModule

    torch.manual_seed(0)
    module = DetectionModule(model=ssdlite_mobilenet_v3_small(num_classes=5))
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": "2.6.6"}, path)
    loaded = ssdlite_mobilenet_v3_small(num_classes=5, weights=path)
    for k, v in module.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
