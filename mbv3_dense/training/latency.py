"""Inference latency, measured the same way everywhere, and the callback that logs it next to the metric."""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from collections.abc import Callable, Iterator
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.deploy.timing import Latency, measure_latency
from mbv3_dense.training.task import InferenceHooks

log = logging.getLogger(__name__)


@contextlib.contextmanager
def preserved_state(module: nn.Module) -> Iterator[None]:
    """Leave every random generator and every submodule's train/eval flag as they were.

    Timing must not change training: the global torch (CPU, and the module's CUDA device), numpy and
    Python generators are restored on exit, so a run with the callback draws the same numbers as a
    run without it, and so does a resumed run; so are the ``training`` flags, one by one (a frozen
    or averaged copy may be in eval mode while the rest trains).
    """
    flags = [(m, m.training) for m in module.modules()]
    devices = []
    with contextlib.suppress(StopIteration):
        device = next(module.parameters()).device
        if device.type == "cuda":
            devices = [device.index if device.index is not None else torch.cuda.current_device()]
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
        for m, training in flags:
            m.training = training


Backend = Literal["torch", "onnxruntime", "executorch"]


class LatencyCallback(L.Callback):
    """Log inference latency (eval mode, batch 1) beside the metric, on the training device or a deployment runtime.

    ``backend="torch"`` times the module where it trains and logs ``latency_ms`` / ``latency_p90_ms``.
    ``backend="onnxruntime"`` or ``"executorch"`` exports a CPU copy of the current weights (the network
    validation uses: the weight average when kept) inside the callback, ONNX or a ``.pte`` lowered to
    XNNPACK, optionally int8, and times it on the CPU with ``threads`` threads; it logs
    ``latency_{backend}[_int8]_ms`` and ``..._p90_ms`` (e.g. ``latency_executorch_int8_ms``), so one run
    can log both the training-device and the deployment latency with two callbacks. Params and MAdds
    (``params_M``, ``madds_G``) are logged by every instance.

    The LightningModule decides what one inference is: it may define ``inference_step(x)`` (for
    example detection, which counts decoding and NMS; exported, the network is its ``preprocess`` ->
    runtime -> ``postprocess``); otherwise ``pl_module(x)`` is timed. The input is
    ``pl_module.example_input(height, width)`` when defined, else a random ``[1, 3, height, width]``
    tensor. Measuring changes nothing of the run: random generators (torch, numpy, Python), the
    modules' train/eval flags and device are restored (:func:`preserved_state`), the exported copy
    is separate.

    Args:
        input_size: ``(height, width)`` of the timed input.
        warmup: untimed calls first.
        runs: timed calls; the median and 90th percentile are logged.
        every_n_validations: measure on the n-th, 2n-th, ... validation only (exporting and timing
            cost time: an ExecuTorch export takes ~20-60 s on a CPU, int8 about twice that). The count
            is kept in checkpoints, so a resumed run measures where the uninterrupted one would.
            Exported backends measure on global rank 0 only.
        backend: ``"torch"``, ``"onnxruntime"`` or ``"executorch"``.
        int8: onnxruntime/executorch: quantize (calibrated on ``calibration_inputs`` example inputs;
            calibration quality does not change the timing).
        threads: onnxruntime/executorch threads (``None``: ``torch.get_num_threads()``).
        calibration_inputs: how many example inputs calibrate int8.
    """

    def __init__(self, *, input_size: tuple[int, int] = (224, 224), warmup: int = 3, runs: int = 10,
                 every_n_validations: int = 1, backend: Backend = "torch", int8: bool = False,
                 threads: int | None = None, calibration_inputs: int = 4) -> None:
        if backend not in ("torch", "onnxruntime", "executorch"):
            raise ValueError(f"backend must be torch, onnxruntime or executorch, got {backend!r}")
        if int8 and backend == "torch":
            raise ValueError("int8 needs backend onnxruntime or executorch")
        self.input_size = tuple(input_size)
        self.warmup = warmup
        self.runs = runs
        self.every_n_validations = max(1, every_n_validations)
        self.backend = backend
        self.int8 = int8
        self.threads = threads
        self.calibration_inputs = max(1, calibration_inputs)
        self._validations = 0
        self._logged_size = False
        self.last: Latency | None = None
        self.params: int | None = None
        self.madds: int | None = None

    @property
    def key(self) -> str:
        """The logged name of the median (``latency_ms`` for torch, e.g. ``latency_executorch_int8_ms``)."""
        if self.backend == "torch":
            return "latency_ms"
        return f"latency_{self.backend}{'_int8' if self.int8 else ''}_ms"

    @property
    def state_key(self) -> str:
        # Several instances (e.g. torch and executorch) each keep their own count in a checkpoint.
        return f"LatencyCallback[{self.key} {self.input_size[0]}x{self.input_size[1]} every {self.every_n_validations}]"

    def state_dict(self) -> dict[str, int]:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._validations = int(state_dict.get("validations", 0))

    def _example(self, pl_module: L.LightningModule) -> Tensor:
        h, w = self.input_size
        if isinstance(pl_module, InferenceHooks):
            return pl_module.example_input(h, w).to(pl_module.device)
        return torch.rand(1, 3, h, w, device=pl_module.device)

    def _fn(self, pl_module: L.LightningModule) -> Callable[[Tensor], object]:
        return pl_module.inference_step if isinstance(pl_module, InferenceHooks) else pl_module

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if self._validations % self.every_n_validations:
            return
        if self.backend != "torch" and trainer.global_rank != 0:
            return  # one CPU export per measurement, not one per process; rank 0 logs it
        with preserved_state(pl_module):
            pl_module.eval()
            example = self._example(pl_module)
            if not self._logged_size:
                # The network only: a module may hold more (e.g. an EMA copy of the weights).
                network = getattr(pl_module, "model", pl_module)
                self.params = count_params(network)
                self.madds = count_madds(network, example)
                self._logged_size = True
            latency = self._measure(pl_module, example)
        self.last = latency
        metrics = {self.key: latency.median_ms, self.key.replace("_ms", "_p90_ms"): latency.p90_ms,
                   "params_M": self.params / 1e6, "madds_G": self.madds / 1e9}
        # Measured on rank 0 only; rank_zero_only logging keeps the other ranks from waiting.
        pl_module.log_dict(metrics, rank_zero_only=True, sync_dist=False)
        self._report(latency)

    def _measure(self, pl_module: L.LightningModule, example: Tensor) -> Latency:
        if self.backend == "torch":
            return measure_latency(self._fn(pl_module), example, warmup=self.warmup, runs=self.runs)
        return self._measure_exported(pl_module, example.detach().cpu())

    def _measure_exported(self, pl_module: L.LightningModule, example: Tensor) -> Latency:
        """Export a CPU copy of the evaluated network and time it on the chosen runtime."""
        from mbv3_dense.deploy import make_backend

        source = getattr(pl_module, "eval_model", None)
        if source is None:
            source = getattr(pl_module, "model", pl_module)
        with torch.inference_mode(False), torch.no_grad():
            network = copy.deepcopy(source).cpu().eval()
            preprocess = getattr(network, "preprocess", None)
            postprocess = getattr(network, "postprocess", None)
            end_to_end = bool(getattr(pl_module, "end_to_end_export", False))
            net_in = preprocess(list(example)) if end_to_end else example
            calibration = None
            if self.int8:
                gen = torch.Generator().manual_seed(0)
                calibration = [preprocess(list(torch.rand(example.shape, generator=gen))) if end_to_end
                               else torch.randn(net_in.shape, generator=gen) for _ in range(self.calibration_inputs)]
            threads = self.threads if self.threads is not None else torch.get_num_threads()
            runtime = make_backend(self.backend, network, net_in, threads=threads, int8_calibration=calibration)
        if end_to_end:
            sizes = [tuple(int(v) for v in example.shape[-2:])] * example.shape[0]

            def fn(x: Tensor) -> object:
                return postprocess(runtime(preprocess(list(x))), sizes)
        else:
            fn = runtime
        latency = measure_latency(fn, example, warmup=self.warmup, runs=self.runs)
        return Latency(latency.median_ms, latency.p90_ms, latency.runs, f"cpu ({self.backend})", threads)

    @rank_zero_only
    def _report(self, latency: Latency) -> None:
        h, w = self.input_size
        log.info("%s at %dx%d, batch 1, %s, %d threads: median %.2f ms, p90 %.2f ms "
                 "(params %.3fM, MAdds %.3fG)", self.key, h, w, latency.device, latency.threads,
                 latency.median_ms, latency.p90_ms, self.params / 1e6, self.madds / 1e9)
