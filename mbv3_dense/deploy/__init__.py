"""Deployment: eager rewrites (BN folding, channels-last), ONNX Runtime, ExecuTorch with XNNPACK, and int8.

``make_backend("torch" | "onnxruntime" | "executorch", model, example)`` gives a callable ``backend(x)`` with the
model's output structure; evaluation scripts use it for ``--backend``. :mod:`~mbv3_dense.deploy.parity` checks an
fp32 program against eager, :mod:`~mbv3_dense.deploy.dynamic` exports programs taking a range of sizes,
:mod:`~mbv3_dense.deploy.gate` scores eager, fp32 and int8 on held-out data and writes the export report.
"""

from mbv3_dense.deploy.backend import BACKENDS, detect, make_backend
from mbv3_dense.deploy.dynamic import DynamicSizeError, SizeRange, parse_size_range
from mbv3_dense.deploy.executorch_export import Delegation, ExecuTorchExport, export_executorch, quantize_pt2e_int8
from mbv3_dense.deploy.executorch_runtime import ExecuTorchFileError, ExecuTorchInputError, ExecuTorchModel
from mbv3_dense.deploy.fuse import ChannelsLast, count_batchnorms, fold_batchnorm, to_channels_last
from mbv3_dense.deploy.onnx_export import ParityReport, compare_outputs, export_onnx
from mbv3_dense.deploy.quantize import CalibrationReader, quantize_int8
from mbv3_dense.deploy.runtime import OnnxModel, create_session
from mbv3_dense.deploy.timing import Latency, interleaved_latency, measure_latency

__all__ = [
    "BACKENDS",
    "CalibrationReader",
    "ChannelsLast",
    "Delegation",
    "DynamicSizeError",
    "ExecuTorchExport",
    "ExecuTorchFileError",
    "ExecuTorchInputError",
    "ExecuTorchModel",
    "OnnxModel",
    "ParityReport",
    "compare_outputs",
    "count_batchnorms",
    "create_session",
    "detect",
    "export_executorch",
    "export_onnx",
    "fold_batchnorm",
    "interleaved_latency",
    "Latency",
    "measure_latency",
    "make_backend",
    "parse_size_range",
    "quantize_int8",
    "quantize_pt2e_int8",
    "SizeRange",
    "to_channels_last",
]
