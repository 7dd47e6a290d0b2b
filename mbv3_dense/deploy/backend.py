"""One function that turns a PyTorch model into the callable an evaluation script runs."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mbv3_dense.deploy.fuse import ChannelsLast, fold_batchnorm, to_channels_last
from mbv3_dense.deploy.onnx_export import compare_outputs, export_onnx
from mbv3_dense.deploy.quantize import quantize_int8
from mbv3_dense.deploy.runtime import OnnxModel

log = logging.getLogger(__name__)

BackendKind = Literal["torch", "onnxruntime"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")


class TorchBackend:
    """``backend(x)``: the (rewritten) model called under ``torch.inference_mode``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()

    def __call__(self, x: Tensor) -> object:
        with torch.inference_mode():
            return self.model(x)


def make_backend(
    kind: BackendKind,
    model: nn.Module,
    example: Tensor,
    *,
    threads: int | None = None,
    fold: bool = True,
    channels_last: bool = False,
    onnx_path: str | Path | None = None,
    int8_calibration: Iterable[Tensor | np.ndarray] | None = None,
) -> Callable[[Tensor], object]:
    """A callable ``backend(x)`` computing ``model(x)`` (eval mode, no autograd) on the chosen runtime.

    The output has the model's structure (tensor, tuple or dict of tensors), so the code around it
    (postprocess, metrics) does not change with the backend.

    Args:
        kind: ``"torch"`` (eager, optionally rewritten) or ``"onnxruntime"`` (exported, CPU).
        model: the network; it is not modified.
        example: an input of the shape that will be used (``[1, 3, H, W]``): the ONNX graph is traced
            on it, and its spatial size is fixed there.
        threads: ONNX Runtime intra-op threads (``None``: ``torch.get_num_threads()``).
        fold: torch only: fold batch norms into convs (:func:`fold_batchnorm`). ONNX Runtime folds
            them itself.
        channels_last: torch only: run in NHWC memory format.
        onnx_path: onnxruntime only: keep the exported file there (default: a temporary file,
            deleted once the session has loaded it).
        int8_calibration: onnxruntime only: a few preprocessed inputs; when given, the model is
            statically quantized to int8 (:func:`quantize_int8`) after export.
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}")
    model = model.eval()
    if kind == "torch":
        net = fold_batchnorm(model) if fold else model
        if channels_last:
            net = ChannelsLast(to_channels_last(net))
        return TorchBackend(net)
    tmp = None if onnx_path is not None else Path(tempfile.mkdtemp(prefix="mbv3_onnx_"))
    try:
        path = Path(onnx_path) if onnx_path is not None else tmp / "model.onnx"
        export_onnx(model, example, path)
        if int8_calibration is not None:
            path = quantize_int8(path, path.with_name(path.stem + ".int8.onnx"), int8_calibration)
        backend = OnnxModel(path, threads=threads)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    with torch.inference_mode():
        report = compare_outputs(model(example), backend(example), tolerance=float("inf"))
    log.info("ONNX Runtime backend (%s) vs PyTorch on the example: %s", path.name,
             ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_error.items()))
    return backend
