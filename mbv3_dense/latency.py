"""Inference latency, measured the same way everywhere, and the callback that logs it next to the metric."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from mbv3_dense.complexity import count_madds, count_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Latency:
    """Timing of one input shape: milliseconds per call at batch 1."""

    median_ms: float
    p90_ms: float
    runs: int
    device: str
    threads: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(fn: Callable[[Tensor], object], example: Tensor, *, warmup: int = 5,
                    runs: int = 20) -> Latency:
    """Median and 90th percentile wall time of ``fn(example)``, after ``warmup`` calls.

    CUDA work is synchronised before each clock read.
    """
    device = example.device
    for _ in range(warmup):
        fn(example)
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(example)
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    p90 = times[min(len(times) - 1, int(round(0.9 * (len(times) - 1))))]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Latency(statistics.median(times), p90, runs, name, torch.get_num_threads())


class LatencyCallback(L.Callback):
    """Log ``latency_ms`` / ``latency_p90_ms`` (eval mode, batch 1) after every validation.

    The LightningModule decides what one inference is: it may define ``inference_step(x)`` (for
    example detection, which counts decoding and NMS); otherwise ``pl_module(x)`` is timed. The
    input is ``pl_module.example_input(height, width)`` when defined, else a random
    ``[1, 3, height, width]`` tensor. Params and MAdds are logged once, at the first validation.

    Args:
        input_size: ``(height, width)`` of the timed input.
        warmup: untimed calls first.
        runs: timed calls; the median and 90th percentile are logged.
        every_n_validations: measure on every n-th validation only (timing costs time).
    """

    def __init__(self, *, input_size: tuple[int, int] = (224, 224), warmup: int = 3, runs: int = 10,
                 every_n_validations: int = 1) -> None:
        self.input_size = tuple(input_size)
        self.warmup = warmup
        self.runs = runs
        self.every_n_validations = max(1, every_n_validations)
        self._validations = 0
        self._logged_size = False
        self.last: Latency | None = None
        self.params: int | None = None
        self.madds: int | None = None

    def _example(self, pl_module: L.LightningModule) -> Tensor:
        h, w = self.input_size
        if hasattr(pl_module, "example_input"):
            return pl_module.example_input(h, w).to(pl_module.device)
        return torch.rand(1, 3, h, w, device=pl_module.device)

    def _fn(self, pl_module: L.LightningModule) -> Callable[[Tensor], object]:
        return getattr(pl_module, "inference_step", pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            example = self._example(pl_module)
            if not self._logged_size:
                # The network only: a module may hold more (e.g. an EMA copy of the weights).
                network = getattr(pl_module, "model", pl_module)
                self.params = count_params(network)
                self.madds = count_madds(network, example)
                self._logged_size = True
            latency = self._measure(pl_module, example)
        finally:
            pl_module.train(was_training)
        self.last = latency
        metrics = {"latency_ms": latency.median_ms, "latency_p90_ms": latency.p90_ms,
                   "params_M": self.params / 1e6, "madds_G": self.madds / 1e9}
        # Measured on rank 0 only; rank_zero_only logging keeps the other ranks from waiting.
        pl_module.log_dict(metrics, rank_zero_only=True, sync_dist=False)
        self._report(latency)

    def _measure(self, pl_module: L.LightningModule, example: Tensor) -> Latency:
        return measure_latency(self._fn(pl_module), example, warmup=self.warmup, runs=self.runs)

    @rank_zero_only
    def _report(self, latency: Latency) -> None:
        h, w = self.input_size
        log.info("latency at %dx%d, batch 1, %s, %d threads: median %.2f ms, p90 %.2f ms "
                 "(params %.3fM, MAdds %.3fG)", h, w, latency.device, latency.threads,
                 latency.median_ms, latency.p90_ms, self.params / 1e6, self.madds / 1e9)


def model_summary(model: nn.Module, example: Tensor) -> dict[str, float]:
    """``{"params_M", "madds_G"}`` of ``model`` on ``example``."""
    return {"params_M": count_params(model) / 1e6, "madds_G": count_madds(model, example) / 1e9}
