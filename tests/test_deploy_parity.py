"""The fp32 export check (mbv3_dense.deploy.parity) and the dynamic-size rewrites (mbv3_dense.deploy.dynamic).

Unit tests of the rules on hand-made outputs, the clamped pool's fixed-window replacement against the
original in eager mode, and one batch of seeded classifiers exported to XNNPACK, every one of which
must pass the check: a rule that fails on correct exports now and then is a defect.
"""

from __future__ import annotations

import pytest
import torch
from parity_utils import calibrate_and_perturb

from mbv3_dense.deploy.dynamic import (
    DynamicSizeError,
    FixedWindowAvgPool2d,
    SizeRange,
    fixed_pool_windows,
    parse_size_range,
)
from mbv3_dense.deploy.parity import (
    FP32_TOLERANCE,
    check_inputs,
    check_program,
    decision_check,
    detections_check,
    output_check,
)


def test_output_check_scales_the_tolerance_by_the_output():
    reference = torch.tensor([[200.0, -3.0, 1.0]])
    assert output_check("logits", reference, reference + 0.1).ok  # 5e-4 of max|reference|
    assert not output_check("logits", reference, reference + 0.3).ok
    small = torch.tensor([[0.2, 0.1]])
    assert output_check("logits", small, small + 0.9e-3).ok and not output_check("logits", small, small + 2e-3).ok
    assert not output_check("logits", small, small[:, :1]).ok  # another shape
    assert FP32_TOLERANCE == 1e-3


def test_decision_check_excuses_near_ties_only():
    reference = torch.tensor([[5.0, 4.99995, 0.0], [3.0, 1.0, 0.0]])
    flipped_tie = torch.tensor([[4.99990, 5.0, 0.0], [3.0, 1.0, 0.0]])  # error 1e-4: margin 5e-5 is a near tie
    check = decision_check(reference, flipped_tie)
    assert check.ok and "1 near ties left out" in check.text
    flipped_decided = torch.tensor([[5.0, 4.99995, 0.0], [0.9, 1.0, 0.0]])
    assert not decision_check(reference, flipped_decided).ok
    pixels = torch.zeros(1, 3, 2, 2)
    pixels[0, 1] = 1.0
    moved = pixels.clone()
    moved[0, 2, 0, 0] = 2.0
    assert not decision_check(pixels, moved, what="pixels").ok


def _detections(rows: list[tuple[int, float, list[float]]]) -> dict[str, torch.Tensor]:
    return {"labels": torch.tensor([r[0] for r in rows]), "scores": torch.tensor([r[1] for r in rows]),
            "boxes": torch.tensor([r[2] for r in rows]).reshape(-1, 4)}


def test_detections_compare_as_sets_with_cuts_excused():
    ref = _detections([(1, 0.9, [0, 0, 10, 10]), (2, 0.5, [5, 5, 20, 20]), (1, 0.0010004, [1, 1, 3, 3])])
    reordered = _detections([(2, 0.5, [5, 5, 20, 20.0004]), (1, 0.9, [0, 0, 10, 10])])  # the last one fell under
    assert detections_check(ref, reordered, score_tolerance=1e-5, box_tolerance=1e-3, score_floor=0.001).ok
    other_box = _detections([(1, 0.9, [0, 0, 10, 10]), (2, 0.5, [5, 5, 30, 30]), (1, 0.0010004, [1, 1, 3, 3])])
    assert not detections_check(ref, other_box, score_tolerance=1e-5, box_tolerance=1e-3, score_floor=0.001).ok
    lost = _detections([(1, 0.9, [0, 0, 10, 10]), (1, 0.0010004, [1, 1, 3, 3])])
    assert not detections_check(ref, lost, score_tolerance=1e-5, box_tolerance=1e-3, score_floor=0.001).ok


def test_size_range_parsing_names_the_problem():
    assert parse_size_range("64:512") == SizeRange(64, 512)
    for text, message in [("64-512", "expected MIN:MAX"), ("512:64", "MIN <= MAX"), ("1:8", "2 <= MIN"),
                          ("96:96", "a fixed size")]:
        with pytest.raises(DynamicSizeError, match=message):
            parse_size_range(text)


@pytest.mark.parametrize(("size", "window"), [((20, 30), (None, None)), ((60, 70), (49, 49)), ((60, 30), (49, None)),
                                              ((30, 80), (None, 49))])
def test_fixed_window_pool_computes_the_clamped_pool(size, window):
    from segmentation.model import ClampedAvgPool2d

    x = torch.randn(2, 4, *size, generator=torch.Generator().manual_seed(0))
    clamped = ClampedAvgPool2d((49, 49), (16, 20))
    torch.testing.assert_close(FixedWindowAvgPool2d(window, (16, 20))(x), clamped(x), rtol=1e-5, atol=1e-6)


def test_fixed_pool_windows_follow_the_range_or_refuse_it():
    import segmentation

    model = segmentation.lraspp_mobilenet_v3_small(num_classes=3).eval()
    example = torch.randn(1, 3, 96, 96)
    fixed = fixed_pool_windows(model, example, SizeRange(64, 512))  # stride-16 maps of 4..32: global pooling
    assert isinstance(fixed.head.scale[0], FixedWindowAvgPool2d) and fixed.head.scale[0].window == (None, None)
    assert fixed is not model and type(model.head.scale[0]).__name__ == "ClampedAvgPool2d"
    large = fixed_pool_windows(model, example, SizeRange(1100, 1400))  # maps of 69..88: the 49 window, 2+ outputs
    assert large.head.scale[0].window == (49, 49)
    with pytest.raises(DynamicSizeError, match=r"pools a window of 49 at stride 16 on the height: its output is 1 at "
                                               r"800 px and more from 1025 px"):
        fixed_pool_windows(model, example, SizeRange(800, 1400))
    for size in [(1100, 1400), (1400, 1100)]:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(large(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(DynamicSizeError, match=r"head.scale.0 pools a window of 49 on the height .* 32 at 512 px and "
                                               r"64 at 1024 px"):
        fixed_pool_windows(model, example, SizeRange(512, 1024))
    tv = segmentation.lraspp_mobilenet_v3_small(num_classes=3, variant="torchvision").eval()
    assert fixed_pool_windows(tv, example, SizeRange(512, 1024)) is tv  # global pooling takes any size


@pytest.mark.parametrize("seed", range(4))
def test_check_passes_every_seeded_classifier_exported_to_xnnpack(seed, tmp_path):
    """As the issue's 13 models, smaller: BN statistics from a forward pass, then perturbed, per seed."""
    pytest.importorskip("executorch")
    import torchvision

    from mbv3_dense.deploy import ExecuTorchModel, export_executorch

    torch.manual_seed(seed)
    model = calibrate_and_perturb(torchvision.models.mobilenet_v3_small(num_classes=10), torch.randn(8, 3, 64, 64),
                                  seed=seed)
    model.normalize = lambda x: (x - 0.45) / 0.225
    inputs = check_inputs("classify", model, (64, 64), seed=seed)
    result = export_executorch(model, inputs[0], tmp_path / "m.pte", task="classify")
    runtime = ExecuTorchModel(result.path, threads=1)
    for checks in check_program("classify", model, runtime, inputs):
        assert all(c.ok for c in checks), [str(c) for c in checks]
    assert (model(inputs[0]) - model(inputs[1])).abs().max() > 1e-3  # the check compared outputs that move
