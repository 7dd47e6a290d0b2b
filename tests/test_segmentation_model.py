"""LR-ASPP model: torchvision parity, the paper's MAdds, pool clamping, weights loading."""

from __future__ import annotations

import pytest
import torch
from parity_utils import assert_input_dependent, calibrate_and_perturb
from torchvision.models import mobilenet_v3_large as tv_mobilenet_v3_large
from torchvision.models.segmentation import lraspp_mobilenet_v3_large as tv_lraspp

from mbv3_dense.checkpoints.weights import WeightsError, load_state_dict_strict
from mbv3_dense.complexity import count_madds, count_params
from segmentation import lraspp_mobilenet_v3_large, lraspp_mobilenet_v3_small
from segmentation.model import ClampedAvgPool2d
from segmentation.weights import from_torchvision_lraspp


def test_torchvision_parity():
    torch.manual_seed(0)
    ref = tv_lraspp(weights=None, weights_backbone=None, num_classes=21)
    x = torch.randn(2, 3, 97, 161)  # odd sizes: the upsampling paths must agree too
    calibrate_and_perturb(ref, x)
    ours = lraspp_mobilenet_v3_large(num_classes=21, variant="torchvision")
    load_state_dict_strict(ours, from_torchvision_lraspp(ref.state_dict()), "torchvision lraspp")
    ours.eval()
    with torch.no_grad():
        expected = ref(x)["out"]
        got = ours(x)
    assert isinstance(got, torch.Tensor) and got.shape == (2, 21, 97, 161)
    assert_input_dependent(expected[0], expected[1])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert count_params(ours) == 3221538  # torchvision's num_params


@pytest.mark.parametrize(("factory", "paper_madds", "paper_params"), [
    (lraspp_mobilenet_v3_large, 9.74e9, 1.51e6),
    (lraspp_mobilenet_v3_small, 2.90e9, 0.47e6),
])
def test_paper_madds_at_1024x2048(factory, paper_madds, paper_params):
    model = factory()  # paper variant, reduced tail, OS16, 128 filters, 19 classes
    madds = count_madds(model, torch.zeros(1, 3, 1024, 2048))
    assert abs(madds / paper_madds - 1) < 0.05, f"{madds / 1e9:.3f}G vs Table 7's {paper_madds / 1e9}G"
    # Params are not a target (Table 7's count is lower than any faithful reading): record them.
    assert 0.9 * paper_params < count_params(model) < 1.2 * paper_params


def test_paper_pool_at_full_resolution_and_clamped_on_small_inputs():
    pool = ClampedAvgPool2d((49, 49), (16, 20))
    assert pool(torch.randn(1, 8, 64, 128)).shape == (1, 8, 1, 4)  # 1024x2048 at stride 16
    small = torch.randn(1, 8, 5, 9)  # smaller than the window: global pooling
    torch.testing.assert_close(pool(small), small.mean((2, 3), keepdim=True))
    assert pool(torch.randn(1, 8, 49, 49)).shape == (1, 8, 1, 1)  # 769x769 crops


def test_paper_head_uses_the_coarse_gate():
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_small().eval()
    x = torch.randn(1, 3, 1024, 96)  # 64x6 at stride 16: pooled to 2x1, upsampled back
    with torch.no_grad():
        out = model(x)
    assert out.shape == (1, 19, 1024, 96) and torch.isfinite(out).all()


def test_checkpoint_round_trip_and_clear_errors(tmp_path):
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_small().eval()
    lightning_like = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                      "pytorch-lightning_version": "2.6"}
    path = tmp_path / "seg.ckpt"
    torch.save(lightning_like, path)
    loaded = lraspp_mobilenet_v3_small(weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(WeightsError, match="head.cbr.0.weight"):  # another class count is a new head; not this
        lraspp_mobilenet_v3_small(head_channels=64, weights=str(path))


def test_weights_backbone_from_a_torchvision_classifier(tmp_path):
    classifier = tv_mobilenet_v3_large()
    path = tmp_path / "mnv3.pth"
    torch.save(classifier.state_dict(), path)
    model = lraspp_mobilenet_v3_large(variant="torchvision", weights_backbone=str(path))
    torch.testing.assert_close(model.backbone.features[5].block[0][0].weight,
                               classifier.features[5].block[0][0].weight)
