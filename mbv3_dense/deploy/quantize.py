"""int8 quantization: ONNX Runtime static quantization calibrated on a few preprocessed inputs, and the
PT2E quantizer for XNNPACK (:func:`xnnpack_quantizer`) that post-training and quantization-aware int8 share."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from torch import Tensor

_METHODS = ("minmax", "percentile", "entropy")
_FORMATS = ("qdq", "qoperator")


class CalibrationReader:
    """An ORT ``CalibrationDataReader`` over model inputs (float ``[N, 3, H, W]``, preprocessed as the model expects).

    The inputs are materialised once, so the reader can be rewound (:meth:`rewind`).
    """

    def __init__(self, inputs: Iterable[Tensor | np.ndarray], *, input_name: str = "input") -> None:
        self.input_name = input_name
        inputs = list(inputs)
        if any(not (x.is_floating_point() if isinstance(x, Tensor) else np.issubdtype(x.dtype, np.floating))
               for x in inputs):
            raise ValueError("calibration inputs must be the network's float input (uint8 images as the data "
                             "loaders give them: convert and normalise with the model's normalize first)")
        self.inputs = [np.ascontiguousarray(x.detach().cpu().numpy() if isinstance(x, Tensor) else x,
                                            dtype=np.float32) for x in inputs]
        if not self.inputs:
            raise ValueError("calibration needs at least one input")
        self._position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._position >= len(self.inputs):
            return None
        self._position += 1
        return {self.input_name: self.inputs[self._position - 1]}

    def rewind(self) -> None:
        self._position = 0

    def __len__(self) -> int:
        return len(self.inputs)


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Iterable[Tensor | np.ndarray],
    *,
    method: str = "minmax",
    quant_format: str = "qdq",
    per_channel: bool = True,
) -> Path:
    """Write a statically quantized (int8 weights, uint8 activations) copy of an exported model.

    Args:
        fp32_path: the float model from :func:`mbv3_dense.deploy.export_onnx`.
        out_path: where the int8 model goes.
        calibration: a few inputs (batch 1 each) drawn from the data the model will see.
        method: activation range estimate: ``"minmax"``, ``"percentile"`` or ``"entropy"``.
        quant_format: ``"qdq"`` (QuantizeLinear/DequantizeLinear pairs, fused by ORT) or
            ``"qoperator"`` (QLinearConv etc. written directly).
        per_channel: one weight scale per output channel (needed for depthwise convs to keep accuracy).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if quant_format not in _FORMATS:
        raise ValueError(f"quant_format must be one of {_FORMATS}, got {quant_format!r}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    calib_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                    "entropy": CalibrationMethod.Entropy}[method]
    fmt = QuantFormat.QDQ if quant_format == "qdq" else QuantFormat.QOperator
    reader = CalibrationReader(calibration)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference and graph cleanup first, as ORT's quantization docs recommend.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), reader, quant_format=fmt, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=calib_method)
    _copy_metadata(fp32_path, out_path)
    return out_path


def _copy_metadata(source: Path, target: Path) -> None:
    import onnx

    src, dst = onnx.load(str(source)), onnx.load(str(target))
    known = {p.key for p in dst.metadata_props}
    for prop in src.metadata_props:
        if prop.key not in known:
            entry = dst.metadata_props.add()
            entry.key, entry.value = prop.key, prop.value
    onnx.save(dst, str(target))


def xnnpack_quantizer(*, per_channel: bool = True, qat: bool = False):
    """ExecuTorch's ``XNNPACKQuantizer`` for the whole graph: symmetric int8 weights (one scale per output
    channel, or one per tensor), int8 activations with static ranges.

    ``qat=True`` gives the quantization-aware variant (fake-quantize modules with moving-average
    observers, for ``prepare_qat_pt2e``); ``False`` the post-training one (min/max observers, for
    ``prepare_pt2e``).
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=qat))
