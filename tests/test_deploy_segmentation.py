"""LR-ASPP through ONNX Runtime: the whole model exports and matches PyTorch, in both variants."""

from __future__ import annotations

import pytest
import torch
from parity_utils import assert_input_dependent, calibrate_and_perturb

import segmentation
from mbv3_dense.deploy import OnnxModel, compare_outputs, export_onnx


@pytest.mark.parametrize("variant", ["paper", "torchvision"])
@torch.no_grad()
def test_lraspp_onnx_matches_pytorch(variant, tmp_path):
    torch.manual_seed(0)
    # 256x512 keeps the paper variant's 49x49 pooling window inside the stride-16 map (16x32 ->
    # windows clamp to the map) while staying small.
    h, w = 128, 256
    model = segmentation.lraspp_mobilenet_v3_small(num_classes=4, variant=variant)
    model = calibrate_and_perturb(model, torch.randn(2, 3, h, w))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(1, 3, h, w, generator=gen), torch.randn(1, 3, h, w, generator=gen)
    assert_input_dependent(model(x), model(y))
    onnx_model = OnnxModel(export_onnx(model, x, tmp_path / f"lraspp_{variant}.onnx"), threads=1)
    for inp in (x, y):
        ref = model(inp)
        report = compare_outputs(ref, onnx_model(inp), tolerance=1e-4 * max(1.0, ref.abs().max().item()))
        assert report.ok, str(report)
