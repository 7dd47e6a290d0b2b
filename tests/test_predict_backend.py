"""``lightning predict`` on a deployed form of the network (``--model.init_args.predict_backend``).

Through the real entry point on the generated folder of ``test_predict_cli``: the written detections of
each backend equal eager PyTorch's for the same images and weights (as sets, within float tolerance, so
any thread count and tie order passes), and the log names the backend. A bad backend name is an error.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from parity_utils import assert_same_detections, calibrate_and_perturb
from test_predict_cli import GOOD, check_common, images, predict, reference_image, save_ckpt  # noqa: F401 - fixture

from detection import ssdlite_mobilenet_v3_small
from detection.module import DetectionModule

DETECT_ARGS = ("--model.model.init_args.num_classes", "5", "--model.model.init_args.width_mult", "0.5",
               "--model.model.init_args.detections_per_img", "50", "--data.num_classes", "5",
               "--data.val_batch_size", "2", "--writer.pictures", "false")


@pytest.fixture(scope="module")
def detector(tmp_path_factory) -> tuple:
    torch.manual_seed(0)
    net = ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5, detections_per_img=50)
    with torch.no_grad():
        calibrate_and_perturb(net, net.normalize(torch.rand(4, 3, 320, 320)), seed=2)
    ckpt = save_ckpt(DetectionModule(model=net), tmp_path_factory.mktemp("ckpt") / "det.ckpt")
    return net.eval(), ckpt


# ExecuTorch: the export (torch.export, XNNPACK lowering) takes most of a minute on 2 busy cores.
@pytest.mark.parametrize("backend", ["folded", "onnxruntime", pytest.param("executorch", marks=pytest.mark.slow)])
def test_detect_backend_equals_eager(backend: str, detector: tuple, images: Path,  # noqa: F811 - fixture
                                     tmp_path: Path):
    if backend == "executorch" and importlib.util.find_spec("executorch") is None:
        pytest.skip("executorch is not installed")
    net, ckpt = detector
    proc = predict("ssdlite_mobilenet_v3_small_coco.yaml", ckpt, images, tmp_path, *DETECT_ARGS,
                   "--model.init_args.predict_backend", backend)
    out = tmp_path / "run/predictions"
    check_common(proc, out, images)
    assert f"predict backend: {backend} (" in proc.stderr
    assert f"predict backend {backend} prepared for {'any' if backend == 'folded' else '320x320'} inputs" \
        in proc.stderr  # once: every image is resized to the network's 320x320
    assert proc.stderr.count(f"predict backend {backend} prepared") == 1
    for name, rel in GOOD.items():
        dets = json.loads((out / "detections" / f"{name}.json").read_text())["detections"]
        with torch.no_grad():
            ref = net.predict([reference_image(images, rel).float() / 255])[0]
        got = {"boxes": torch.tensor([d["box_xyxy"] for d in dets]).reshape(-1, 4),
               "scores": torch.tensor([d["score"] for d in dets]), "labels": torch.tensor([d["label"] for d in dets])}
        assert len(dets) > 0
        # Folding and the exported runtimes sum in another order: scores to 1e-4, boxes to 1e-2 px.
        assert_same_detections(got, ref, box_atol=1e-2, score_atol=1e-4)


def test_bad_backend_name_is_an_error(detector: tuple, images: Path, tmp_path: Path):  # noqa: F811 - fixture
    with pytest.raises(ValueError, match="predict_backend must be one of torch, folded, onnxruntime, executorch, "
                                         "got 'tensorrt'"):
        DetectionModule(model=ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5), predict_backend="tensorrt")
    proc = predict("ssdlite_mobilenet_v3_small_coco.yaml", detector[1], images, tmp_path, *DETECT_ARGS,
                   "--model.init_args.predict_backend", "tensorrt")
    assert proc.returncode != 0
    assert "predict_backend" in proc.stderr and "tensorrt" in proc.stderr
    assert not (tmp_path / "run/predictions/summary.json").exists()


def test_classify_and_segment_steps_on_each_backend():
    """The classifier (ONNX Runtime: one export for the crop size) and the segmenter (folded: one copy for
    every image size; ONNX Runtime: one export per size) give eager's outputs from ``predict_step``."""
    from mbv3_dense import mobilenet_v3_small
    from mbv3_dense.classification.module import ClassificationModule
    from mbv3_dense.data.predict import PredictBatch
    from segmentation import lraspp_mobilenet_v3_small
    from segmentation.module import SegmentationModule

    torch.manual_seed(0)
    classifier = mobilenet_v3_small(num_classes=7, width_mult=0.5)
    segmenter = lraspp_mobilenet_v3_small(num_classes=5, width_mult=0.5)
    with torch.no_grad():
        calibrate_and_perturb(classifier, torch.randn(4, 3, 64, 64), seed=1)
        calibrate_and_perturb(segmenter, torch.randn(2, 3, 64, 96), seed=3)
    crops = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    pictures = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8) for h, w in ((64, 96), (80, 64), (64, 96))]
    with torch.inference_mode():
        eager = ClassificationModule(model=classifier).eval().predict_step(PredictBatch([], crops, [], [], []), 0)
        onnx = ClassificationModule(model=classifier, predict_backend="onnxruntime").eval()
        got = onnx.predict_step(PredictBatch([], crops, [], [], []), 0)
        assert len(onnx._predict_nets) == 1
        for a, b in zip(eager, got, strict=True):
            torch.testing.assert_close(b.probabilities, a.probabilities, atol=2e-5, rtol=0)
        reference = SegmentationModule(model=segmenter).eval().predict_step(PredictBatch(pictures, None, [], [], []), 0)
        logits = [segmenter.eval()(segmenter.normalize(img.float()[None] / 255)) for img in pictures]
        for backend, nets in (("folded", 1), ("onnxruntime", 2)):
            module = SegmentationModule(model=segmenter, predict_backend=backend).eval()
            masks = module.predict_step(PredictBatch(pictures, None, [], [], []), 0)
            assert len(module._predict_nets) == nets  # folded: any size; exported: one per distinct size
            for mask, ref, lg in zip(masks, reference, logits, strict=True):
                top2 = lg[0].topk(2, dim=0).values
                tie = (top2[0] - top2[1]) < 1e-3  # the sums' order differs: near-ties may go either way
                assert torch.equal(mask[~tie], ref[~tie]), backend
