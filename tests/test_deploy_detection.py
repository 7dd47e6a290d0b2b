"""SSDLite through ONNX Runtime: the exported network plus the PyTorch postprocess gives the same detections."""

from __future__ import annotations

import pytest
import torch
from parity_utils import assert_same_detections, calibrate_and_perturb

import detection
from mbv3_dense.deploy import OnnxModel, export_onnx, make_backend


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    model = detection.ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5)
    # Fewer candidates keep the test fast; the selection code is the same.
    model.score_thresh, model.topk_candidates, model.detections_per_img = 0.05, 50, 50
    return calibrate_and_perturb(model, torch.rand(4, 3, 320, 320))


@torch.no_grad()
def test_onnxruntime_detections_equal_pytorch(detector, tmp_path):
    gen = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 120, 160, generator=gen), torch.rand(3, 90, 200, generator=gen)]
    example = detector.preprocess(images[:1])
    onnx_model = OnnxModel(export_onnx(detector, example, tmp_path / "ssdlite.onnx"), threads=1)
    expected = detector.predict(images)
    got = detector.postprocess(onnx_model(detector.preprocess(images)), [tuple(i.shape[-2:]) for i in images])
    assert sum(len(e["boxes"]) for e in expected) > 0, "the reference must detect something"
    for e, g in zip(expected, got, strict=True):  # as sets: the order of near-tied scores is the CPU's choice
        assert_same_detections(g, e, box_atol=1e-3, score_atol=1e-5)


@torch.no_grad()
def test_make_backend_returns_raw_outputs_of_the_same_structure(detector):
    x = torch.rand(1, 3, 320, 320)
    backend = make_backend("onnxruntime", detector, x, threads=1)
    raw, ref = backend(x), detector(x)
    assert list(raw) == list(ref)
    for key in ref:
        torch.testing.assert_close(raw[key], ref[key], rtol=1e-4, atol=1e-4)
