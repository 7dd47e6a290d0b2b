"""One function that turns a PyTorch model into the callable an evaluation script runs."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from mbv3_dense.deploy.dynamic import SizeRange, fit_size
from mbv3_dense.deploy.executorch_export import export_executorch
from mbv3_dense.deploy.executorch_runtime import ExecuTorchFileError, ExecuTorchModel
from mbv3_dense.deploy.fuse import ChannelsLast, fold_batchnorm, to_channels_last
from mbv3_dense.deploy.onnx_export import compare_outputs, export_onnx
from mbv3_dense.deploy.quantize import quantize_int8
from mbv3_dense.deploy.runtime import OnnxModel

log = logging.getLogger(__name__)

BackendKind = Literal["torch", "onnxruntime", "executorch"]
BACKENDS: tuple[str, ...] = ("torch", "onnxruntime", "executorch")


def detect(model: nn.Module, net: Callable[[Tensor], object], images: list[Tensor]) -> list[dict[str, Tensor]]:
    """A detector's detections of float ``[3, H, W]`` images in [0, 1] (any sizes), its network run by ``net``:
    the one turn of network outputs into detections that ``DetectionModule.predict_step``, ``scripts/predict.py``,
    the evaluation scripts and the export gate share.

    ``net`` is the model itself or a backend of its network; a program that takes images (its preprocess
    inside, :attr:`ExecuTorchModel.takes_image`) gets them one at a time at their own size, any other gets
    ``model.preprocess(images)``. Decoding and NMS are ``model.postprocess``.
    """
    if not images:
        return []
    sizes = [(int(img.shape[-2]), int(img.shape[-1])) for img in images]
    if getattr(net, "takes_image", False):
        outs = [net(img[None]) for img in images]
        raw = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    else:
        raw = net(model.preprocess(images))
    return model.postprocess(raw, sizes)


class ShapeBackends:
    """``backends(x)``: ``model(x)`` on an exported runtime built on first use for the inputs met.

    One program serves every size in a dynamic range (``dynamic_size``, or a ``pte_file`` exported with one);
    otherwise one program is built per input shape. ``calibration`` (preprocessed inputs, any sizes) quantizes
    each program to int8, resized to the size it is built for. Used where the input size varies (segmentation
    at full resolution).
    """

    def __init__(self, kind: BackendKind, model: nn.Module, *, threads: int | None = None,
                 calibration: list[Tensor] | None = None, pte_file: str | Path | None = None,
                 task: str | None = None, dynamic_size: SizeRange | None = None) -> None:
        self.kind, self.model, self.threads, self.calibration = kind, model, threads, calibration
        self.pte_file, self.task, self.dynamic_size = pte_file, task, dynamic_size
        self.programs: dict[object, Callable[[Tensor], object]] = {}

    def first(self) -> Callable[[Tensor], object] | None:
        """The first program built (``None`` before any call)."""
        return next(iter(self.programs.values()), None)

    def __call__(self, x: Tensor) -> object:
        shared = self.first()
        if getattr(shared, "dynamic_size", None) is not None and shared.accepts(*x.shape[-2:]):
            return shared(x)
        if self.dynamic_size is not None and not self.programs:
            calib = None if self.calibration is None else [fit_size(c, self.dynamic_size) for c in self.calibration]
            self.programs["dynamic"] = make_backend(self.kind, self.model, fit_size(x, self.dynamic_size),
                                                    threads=self.threads, int8_calibration=calib, task=self.task,
                                                    dynamic_size=self.dynamic_size)
            return self(x)
        if tuple(x.shape) not in self.programs:
            size = tuple(x.shape[-2:])
            calib = None if self.calibration is None else [
                torch.nn.functional.interpolate(c, size=size, mode="bilinear", align_corners=False)
                if tuple(c.shape[-2:]) != size else c for c in self.calibration]
            self.programs[tuple(x.shape)] = make_backend(self.kind, self.model, x, threads=self.threads,
                                                         int8_calibration=calib, pte_file=self.pte_file,
                                                         task=self.task)
        return self.programs[tuple(x.shape)](x)


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
    pte_path: str | Path | None = None,
    pte_file: str | Path | None = None,
    task: str | None = None,
    dynamic_size: SizeRange | None = None,
) -> Callable[[Tensor], object]:
    """A callable ``backend(x)`` computing ``model(x)`` (eval mode, no autograd) on the chosen runtime.

    The output has the model's structure (tensor, tuple or dict of tensors), so the code around it
    (postprocess, metrics) does not change with the backend.

    Args:
        kind: ``"torch"`` (eager, optionally rewritten), ``"onnxruntime"`` (exported, CPU) or
            ``"executorch"`` (exported to a ``.pte`` lowered to XNNPACK, CPU, batch 1 per call).
        model: the network; it is not modified.
        example: an input of the shape that will be used (``[1, 3, H, W]``): the ONNX graph is traced
            on it, and its spatial size is fixed there.
        threads: ONNX Runtime intra-op threads or XNNPACK threads (``None``: ``torch.get_num_threads()``).
        fold: torch only: fold batch norms into convs (:func:`fold_batchnorm`). ONNX Runtime folds
            them itself.
        channels_last: torch only: run in NHWC memory format.
        onnx_path: onnxruntime only: keep the exported file there (default: a temporary file,
            deleted once the session has loaded it).
        int8_calibration: onnxruntime and executorch: a few preprocessed inputs; when given, the
            model is statically quantized to int8 (ORT: :func:`quantize_int8` after export;
            ExecuTorch: PT2E with the XNNPACK quantizer before lowering).
        pte_path: executorch only: keep the exported ``.pte`` there (default: a temporary file).
        pte_file: executorch only: run this already exported ``.pte`` instead of exporting ``model``;
            it must have been exported for ``task`` at ``example``'s size
            (:class:`ExecuTorchFileError` otherwise, naming the file).
        task: executorch only: stored in the exported file, or checked against ``pte_file``.
        dynamic_size: executorch only: export with height and width symbolic in this range
            (:mod:`mbv3_dense.deploy.dynamic`); ``example``'s size must be in it. A detector's program then
            takes images in [0, 1] at their own size (its preprocess inside), so ``example`` and
            ``int8_calibration`` are such images; run it through :func:`detect`.
    """
    if kind not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {kind!r}")
    model = model.eval()
    if kind == "torch":
        net = fold_batchnorm(model) if fold else model
        if channels_last:
            net = ChannelsLast(to_channels_last(net))
        return TorchBackend(net)
    if kind == "executorch":
        return _executorch_backend(model, example, threads=threads, int8_calibration=int8_calibration,
                                   pte_path=pte_path, pte_file=pte_file, task=task, dynamic_size=dynamic_size)
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


def _executorch_backend(model: nn.Module, example: Tensor, *, threads: int | None,
                        int8_calibration: Iterable[Tensor | np.ndarray] | None, pte_path: str | Path | None,
                        pte_file: str | Path | None, task: str | None,
                        dynamic_size: SizeRange | None = None) -> ExecuTorchModel:
    size = (int(example.shape[-2]), int(example.shape[-1]))
    preprocess = dynamic_size is not None and task == "detect"
    example = example.detach().cpu()
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    model = model if on_cpu else copy.deepcopy(model).cpu()  # the caller's model stays where it is
    if pte_file is not None:
        backend = ExecuTorchModel(pte_file, task=task, threads=threads)
        if not backend.takes_image and not backend.accepts(*size):  # a detector's images are checked per call
            raise ExecuTorchFileError(f"{backend.path}: exported for input size {backend.size_text()}, "
                                      f"not {size[0]}x{size[1]}")
    else:
        tmp = None if pte_path is not None else Path(tempfile.mkdtemp(prefix="mbv3_pte_"))
        try:
            path = Path(pte_path) if pte_path is not None else tmp / "model.pte"
            calibration = None
            if int8_calibration is not None:
                calibration = [torch.as_tensor(x, dtype=torch.float32) for x in int8_calibration]
            export_executorch(model, example[:1], path, task=task, int8_calibration=calibration,
                              dynamic_size=dynamic_size, preprocess=preprocess)
            backend = ExecuTorchModel(path, task=task, input_size=size, threads=threads)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    if backend.takes_image:
        log.info("ExecuTorch backend (%s): takes images at their own size (%s)", backend.path.name, backend.size_text())
        return backend
    with torch.inference_mode():
        report = compare_outputs(model(example[:1]), backend(example[:1]), tolerance=float("inf"))
    log.info("ExecuTorch backend (%s, %s) vs PyTorch on the example: %s", backend.path.name,
             "int8" if backend.int8 else "fp32", ", ".join(f"{k} {v:.2e}" for k, v in report.max_abs_error.items()))
    return backend

