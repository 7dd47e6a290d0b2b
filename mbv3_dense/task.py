"""What the three task modules share: optimizer and scheduler, learning rate scaled to the global
batch, weight decay, the non-finite loss policy, and the hooks the callbacks call.

:class:`TaskModule` is the base of :class:`~mbv3_dense.classification.module.ClassificationModule`,
:class:`~detection.module.DetectionModule` and :class:`~segmentation.module.SegmentationModule`;
:class:`InferenceHooks` declares what :class:`~mbv3_dense.latency.LatencyCallback` and
:class:`~mbv3_dense.callbacks.PreciseBN` call on a module.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mbv3_dense.guards import NonFinitePolicy

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


@runtime_checkable
class InferenceHooks(Protocol):
    """The methods callbacks call on a task module."""

    def example_input(self, height: int, width: int) -> Tensor:
        """One ``[1, 3, height, width]`` input of what :meth:`inference_step` takes."""

    def inference_step(self, x: Tensor) -> object:
        """One inference as a user runs it (for detection: preprocessing, network, decoding, NMS)."""

    def precise_bn_forward(self, batch: Any) -> None:  # noqa: ANN401 - each task's batch type
        """A training-mode forward of the network on ``batch`` (no loss), to re-estimate BN statistics;
        ``batch`` as the training step gets it (on the device, after ``on_after_batch_transfer``)."""


def split_weight_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(decayed, not_decayed)``: norm-layer parameters and every bias go in the second list."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            (no_decay if isinstance(module, NORM_TYPES) or name == "bias" else decay).append(param)
    return decay, no_decay


def global_batch_size(trainer: L.Trainer) -> int | None:
    """Images per optimizer step over all processes: per-device batch x devices x nodes x
    accumulation, or None when the data module does not say its batch size."""
    datamodule = getattr(trainer, "datamodule", None)
    per_device = getattr(datamodule, "batch_size", None)
    if not isinstance(per_device, int):
        return None
    return per_device * trainer.world_size * trainer.accumulate_grad_batches


class TaskModule(L.LightningModule):
    """Base of the task modules: holds ``model``, the optimizer and scheduler callables and the
    non-finite loss policy, and builds the optimizer.

    Args:
        model: the network.
        optimizer: builds the optimizer from parameter groups.
        scheduler: builds the LR scheduler, stepped every epoch or every step (:attr:`scheduler_interval`).
        lr_batch_size: the global batch the optimizer's ``lr`` is written for. The LR used is
            ``lr * global_batch / lr_batch_size`` (linear scaling; global batch = per-device batch x
            devices x nodes x gradient accumulation), logged at set-up, so one config runs on a CPU,
            one GPU or 8 GPUs. ``None``: the LR as written.
        weight_decay_norm_bias: also apply the optimizer's weight decay to norm layers and biases
            (off by default: the paper's TensorFlow models and torchvision's classification recipe
            decay convolution and linear weights only).
        nonfinite_loss: ``"stop"`` raises :class:`~mbv3_dense.guards.NonFiniteLossError` naming
            the step at the first NaN/inf loss; ``"skip"`` skips that batch's update and counts it
            (``train/skipped_nonfinite``).
        channels_last: the network's weights and its input batches in channels-last memory format
            (NHWC: what cuDNN's mixed-precision convolutions want). ``None``: when the run is on a CUDA
            GPU. Numerically the same network; the checkpoint's state dict is unchanged.
        compile: ``torch.compile`` the network's forward at set-up (in place: checkpoint keys unchanged).
            The first steps are slow while it compiles; worth it for long GPU runs.
    """

    task: ClassVar[str]  # "classify" | "detect" | "segment", recorded in checkpoints (mbv3_dense.model_record)
    scheduler_interval: ClassVar[Literal["epoch", "step"]] = "epoch"
    # Exported latency runs ``model.preprocess`` -> runtime -> ``model.postprocess`` (detection: the
    # network alone is not what a user runs); otherwise the runtime alone.
    end_to_end_export: ClassVar[bool] = False

    def __init__(self, *, model: nn.Module, optimizer: OptimizerCallable = torch.optim.SGD,
                 scheduler: LRSchedulerCallable | None = None, lr_batch_size: int | None = None,
                 weight_decay_norm_bias: bool = False, nonfinite_loss: NonFinitePolicy = "stop",
                 channels_last: bool | None = None, compile: bool = False) -> None:  # noqa: A002 - the option's name
        super().__init__()
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if lr_batch_size is not None and lr_batch_size <= 0:
            raise ValueError(f"lr_batch_size must be positive or None, got {lr_batch_size}")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_batch_size = lr_batch_size
        self.weight_decay_norm_bias = weight_decay_norm_bias
        self.nonfinite_loss = nonfinite_loss
        self.channels_last = channels_last
        self.compile_network = compile
        self._memory_format = torch.contiguous_format
        self._compiled = False

    def configure_model(self) -> None:
        """Channels-last weights and ``torch.compile``, once, before the run moves the module to its device."""
        on_cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        if self.channels_last if self.channels_last is not None else on_cuda:
            self._memory_format = torch.channels_last
            self.model.to(memory_format=torch.channels_last)
            self.eval_model.to(memory_format=torch.channels_last)  # a weight average, where one is kept
            log.info("channels-last memory format for the network and its input batches")
        if self.compile_network and not self._compiled:
            self.model.compile()
            self._compiled = True
            log.info("network compiled with torch.compile (the first steps include compilation)")

    # ------------------------------------------------------------------ batches: uint8 in, network input out
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:  # noqa: ANN401 - each task's batch
        """Training and validation batches travel as uint8 and become the network's input here, on the device
        (a quarter of the bytes of float32 to copy, and no float work in the loader workers).

        Prediction batches are left as they are: ``predict_step`` keeps the uint8 images for the writers
        and converts what it feeds the network itself.
        """
        if self._trainer is not None and self.trainer.predicting:
            return batch
        return self.batch_to_input(batch)

    def batch_to_input(self, batch: Any) -> Any:  # noqa: ANN401 - each task's batch type
        """``batch`` (a sequence whose first element is the images) with :meth:`images_to_input` applied to
        its images. Tasks whose batches look otherwise override this."""
        return type(batch)((self.images_to_input(batch[0]), *batch[1:]))

    def images_to_input(self, images: Tensor) -> Tensor:
        """uint8 ``[N, 3, H, W]`` RGB -> the network's float input, normalised by the network's own
        ``normalize``, in the network's memory format (channels-last where :meth:`configure_model` chose it).
        Floating-point images are taken to be the network's input already."""
        if not images.is_floating_point():
            images = self.model.normalize(images.float().div_(255))
        return images.contiguous(memory_format=self._memory_format)

    # ------------------------------------------------------------------ hooks used by callbacks
    def forward(self, x: Tensor) -> object:
        return self.model(x)

    @property
    def eval_model(self) -> nn.Module:
        """The network validation uses (a module that keeps a weight average returns it)."""
        return self.model

    def example_input(self, height: int, width: int) -> Tensor:
        """A normalised-looking ``[1, 3, height, width]`` input for latency and MAdds, in the memory format the
        batches have (channels-last on a GPU)."""
        return torch.randn(1, 3, height, width, device=self.device).contiguous(memory_format=self._memory_format)

    def inference_step(self, x: Tensor) -> object:
        """One inference as timed by :class:`~mbv3_dense.latency.LatencyCallback`: the network's forward."""
        return self(x)

    def precise_bn_forward(self, batch: Any) -> None:  # noqa: ANN401 - each task's batch type
        """Forward the images of a training batch (its first element, the network's input) through the network."""
        self.model(batch[0])

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: one, or decayed weights and (weight decay 0) norms and biases."""
        if self.weight_decay_norm_bias:
            return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]
        decay, no_decay = split_weight_decay(self.model)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union of return types
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr_batch_size is not None:
            self._scale_learning_rate(optimizer)
        if self.scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.scheduler(optimizer), "interval": self.scheduler_interval}}

    def _scale_learning_rate(self, optimizer: torch.optim.Optimizer) -> None:
        batch = global_batch_size(self.trainer)
        if batch is None:
            raise ValueError("lr_batch_size is set but the data module has no integer batch_size to scale the "
                             "learning rate by; set lr_batch_size: null to use the LR as written")
        factor = batch / self.lr_batch_size
        for group in optimizer.param_groups:
            group["lr"] *= factor
        trainer = self.trainer
        log.info("learning rate %.6g: %.6g per %d images x global batch %d (%d per device x %d devices x %d nodes "
                 "x %d accumulated) / %d", optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["lr"] / factor,
                 self.lr_batch_size, batch, trainer.datamodule.batch_size, trainer.num_devices, trainer.num_nodes,
                 trainer.accumulate_grad_batches, self.lr_batch_size)
