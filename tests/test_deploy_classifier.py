"""Deployment of the classifier: BN folding, ONNX export parity, ONNX Runtime sessions, int8, make_backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from parity_utils import assert_input_dependent, calibrate_and_perturb
from torch import nn

from mbv3_dense import mobilenet_v3_small
from mbv3_dense.deploy import (
    ChannelsLast,
    OnnxModel,
    compare_outputs,
    count_batchnorms,
    create_session,
    export_onnx,
    fold_batchnorm,
    interleaved_latency,
    make_backend,
    quantize_int8,
    to_channels_last,
)

SIZE = 64


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=10, width_mult=0.5)
    return calibrate_and_perturb(model, torch.randn(8, 3, SIZE, SIZE))


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, SIZE, SIZE, generator=gen), torch.randn(1, 3, SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module")
def onnx_file(classifier, inputs, tmp_path_factory):
    return export_onnx(classifier, inputs[0], tmp_path_factory.mktemp("onnx") / "classifier.onnx")


@torch.no_grad()
def test_fold_batchnorm_equals_unfused(classifier, inputs):
    x, y = inputs
    reference = classifier(x)
    assert_input_dependent(reference, classifier(y))
    folded = fold_batchnorm(classifier)
    assert count_batchnorms(folded) == 0
    assert count_batchnorms(classifier) > 0, "the input model must not be modified"
    torch.testing.assert_close(folded(x), reference, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_channels_last_equals_contiguous(classifier, inputs):
    x = inputs[0]
    model = ChannelsLast(to_channels_last(fold_batchnorm(classifier))).eval()
    torch.testing.assert_close(model(x), classifier(x), rtol=1e-4, atol=1e-5)


def test_fold_leaves_training_batchnorm_alone_outside_sequential():
    class Odd(nn.Module):  # conv and BN registered in order but not applied in that order
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            return self.conv(self.bn(x))

    assert count_batchnorms(fold_batchnorm(Odd())) == 1


@torch.no_grad()
def test_onnx_export_matches_pytorch(classifier, inputs, onnx_file):
    x, y = inputs
    onnx_model = OnnxModel(onnx_file, threads=1)
    for inp in (x, y):
        report = compare_outputs(classifier(inp), onnx_model(inp), tolerance=1e-4)
        assert report.ok, str(report)
    # the batch axis is dynamic
    batch = torch.cat([x, y])
    torch.testing.assert_close(onnx_model(batch), classifier(batch), rtol=1e-4, atol=1e-4)


def test_export_keeps_dict_structure_and_model_mode(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            f = self.bn(self.conv(x))
            return {"boxes": f[:, :2].flatten(2), "logits": f.mean((2, 3))}

    model = TwoHeads().train()
    x = torch.randn(1, 3, 8, 8)
    path = export_onnx(model, x, tmp_path / "two.onnx")
    assert model.training, "export must restore the model's mode"
    out = OnnxModel(path)(x)
    assert list(out) == ["boxes", "logits"]
    with torch.no_grad():
        ref = model.eval()(x)
    assert compare_outputs(ref, out, tolerance=1e-5).ok


def test_session_has_spinning_off_and_thread_count(onnx_file):
    session = create_session(onnx_file, threads=1)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_missing_onnx_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxModel(tmp_path / "nope.onnx")


def test_int8_quantization_runs_and_mostly_agrees(classifier, onnx_file, tmp_path):
    gen = torch.Generator().manual_seed(2)
    calibration = [torch.randn(1, 3, SIZE, SIZE, generator=gen) for _ in range(4)]
    q_path = quantize_int8(onnx_file, tmp_path / "classifier.int8.onnx", calibration)
    import onnx

    ops = {node.op_type for node in onnx.load(str(q_path)).graph.node}
    assert "QuantizeLinear" in ops
    q = OnnxModel(q_path, threads=1)
    x = calibration[0]
    with torch.no_grad():
        ref = classifier(x)
    out = q(x)
    assert out.shape == ref.shape and np.isfinite(out.numpy()).all()
    # int8 is approximate (and worst on random, perturbed weights): the logits still follow the float ones
    corr = torch.corrcoef(torch.stack([ref.flatten(), out.flatten()]))[0, 1].item()
    assert corr > 0.5, corr


@torch.no_grad()
def test_make_backend_torch_and_onnxruntime_agree(classifier, inputs):
    x, y = inputs
    torch_backend = make_backend("torch", classifier, x)
    ort_backend = make_backend("onnxruntime", classifier, x, threads=1)
    for inp in (x, y):
        torch.testing.assert_close(torch_backend(inp), classifier(inp), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ort_backend(inp), classifier(inp), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        make_backend("tensorrt", classifier, x)


def test_interleaved_latency_reports_every_call():
    counts = {"a": 0, "b": 0}

    def call(name):
        def run():
            counts[name] += 1
        return run

    result = interleaved_latency({"a": call("a"), "b": call("b")}, warmup=2, runs=5)
    assert counts == {"a": 7, "b": 7}
    assert set(result) == {"a", "b"} and all(r.runs == 5 and r.median_ms >= 0 for r in result.values())
