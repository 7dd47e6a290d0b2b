"""What the three task modules share: optimizer and scheduler, learning rate scaled to the global
batch, weight decay, the non-finite loss policy, and the hooks the callbacks call.

:class:`TaskModule` is the base of :class:`~mbv3_dense.classification.module.ClassificationModule`,
:class:`~detection.module.DetectionModule` and :class:`~segmentation.module.SegmentationModule`;
:class:`InferenceHooks` declares what :class:`~mbv3_dense.training.latency.LatencyCallback` and
:class:`~mbv3_dense.training.callbacks.PreciseBN` call on a module.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from mbv3_dense.checkpoints.classes import ClassInfo
from mbv3_dense.checkpoints.model_record import RECORD_KEY
from mbv3_dense.data.predict import data_class_info
from mbv3_dense.training.guards import NonFinitePolicy

log = logging.getLogger(__name__)

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)

PredictBackend = Literal["torch", "folded", "onnxruntime", "executorch"]
PREDICT_BACKENDS: tuple[str, ...] = ("torch", "folded", "onnxruntime", "executorch")


@runtime_checkable
class InferenceHooks(Protocol):
    """The methods callbacks call on a task module."""

    def example_input(self, height: int, width: int) -> Tensor:
        """One ``[1, 3, height, width]`` input of what :meth:`inference_step` takes."""

    def inference_step(self, x: Tensor) -> object:
        """One inference as a user runs it (for detection: preprocessing, network, decoding, NMS)."""

    def precise_bn_forward(self, batch: Any) -> None:
        """A training-mode forward of the network on ``batch`` (no loss), to re-estimate BN statistics;
        ``batch`` as the training step gets it (on the device, after ``on_after_batch_transfer``)."""


def split_weight_decay(model: nn.Module, *, trainable_only: bool = True) -> tuple[list[nn.Parameter],
                                                                                list[nn.Parameter]]:
    """``(decayed, not_decayed)``: norm-layer parameters and every bias go in the second list; parameters
    that do not require gradients are left out unless ``trainable_only`` is false."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if trainable_only and not param.requires_grad:
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
        nonfinite_loss: ``"stop"`` raises :class:`~mbv3_dense.training.guards.NonFiniteLossError` naming
            the step at the first NaN/inf loss; ``"skip"`` skips that batch's update and counts it
            (``train/skipped_nonfinite``).
        channels_last: the network's weights and its input batches in channels-last memory format
            (NHWC: what cuDNN's mixed-precision convolutions want). ``None``: when the run is on a CUDA
            GPU. Numerically the same network; the checkpoint's state dict is unchanged.
        compile: ``torch.compile`` the network's forward at set-up (in place: checkpoint keys unchanged).
            The first steps are slow while it compiles; worth it for long GPU runs.
        freeze_backbone_epochs: fine-tuning: the backbone (``model.backbone``) takes no updates for the
            first N epochs and keeps its BatchNorm statistics, then trains with the rest (Lightning's
            ``BackboneFinetuning`` idea; see :meth:`_freeze_backbone_for_epoch` for why not that callback).
        backbone_lr_multiplier: fine-tuning: the backbone's learning rate is the optimizer's times this
            (its own parameter groups, ``backbone`` and ``backbone_no_decay``; the schedule scales both).
        freeze_bn_statistics: every BatchNorm keeps its running statistics (the pretrained ones) instead
            of averaging the batches': for small batches, where batch statistics are noise. Their scale
            and shift still train.
        predict_backend: what ``lightning predict`` runs the network on, prepared once, at the first batch:
            ``"torch"`` (eager, as trained), ``"folded"`` (batch norms folded into the convolutions and
            channels-last memory format, eager PyTorch), ``"onnxruntime"`` or ``"executorch"`` (exported to a
            temporary ``.onnx`` / ``.pte`` lowered to XNNPACK, CPU only). Exported programs have a fixed spatial
            size: the input size of the first batch (detection: the network's ``image_size``; segmentation,
            whose images keep their own sizes: one export per distinct size, the last four kept). The task's
            pre- and postprocessing stay in PyTorch.
    """

    # "classify" | "detect" | "segment", recorded in checkpoints (mbv3_dense.checkpoints.model_record)
    task: ClassVar[str]
    # the logged metric (higher is better) the run's best checkpoint keeps (mbv3_dense.training.cli)
    monitor: ClassVar[str]
    scheduler_interval: ClassVar[Literal["epoch", "step"]] = "epoch"
    # Exported latency runs ``model.preprocess`` -> runtime -> ``model.postprocess`` (detection: the
    # network alone is not what a user runs); otherwise the runtime alone.
    end_to_end_export: ClassVar[bool] = False

    def __init__(self, *, model: nn.Module, optimizer: OptimizerCallable = torch.optim.SGD,
                 scheduler: LRSchedulerCallable | None = None, lr_batch_size: int | None = None,
                 weight_decay_norm_bias: bool = False, nonfinite_loss: NonFinitePolicy = "stop",
                 channels_last: bool | None = None, compile: bool = False,
                 freeze_backbone_epochs: int = 0, backbone_lr_multiplier: float = 1.0,
                 freeze_bn_statistics: bool = False, predict_backend: PredictBackend = "torch") -> None:
        super().__init__()
        if predict_backend not in PREDICT_BACKENDS:
            raise ValueError(f"predict_backend must be one of {', '.join(PREDICT_BACKENDS)}, got {predict_backend!r}")
        if nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        if lr_batch_size is not None and lr_batch_size <= 0:
            raise ValueError(f"lr_batch_size must be positive or None, got {lr_batch_size}")
        if freeze_backbone_epochs < 0:
            raise ValueError(f"freeze_backbone_epochs must be >= 0, got {freeze_backbone_epochs}")
        if not backbone_lr_multiplier >= 0:
            raise ValueError(f"backbone_lr_multiplier must be >= 0, got {backbone_lr_multiplier}")
        if (freeze_backbone_epochs or backbone_lr_multiplier != 1.0) and not hasattr(model, "backbone"):
            raise ValueError(f"{type(model).__name__} has no .backbone to freeze or to give its own learning rate")
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.lr_batch_size = lr_batch_size
        self.weight_decay_norm_bias = weight_decay_norm_bias
        self.nonfinite_loss = nonfinite_loss
        self.channels_last = channels_last
        self.compile_network = compile
        self.freeze_backbone_epochs = freeze_backbone_epochs
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.freeze_bn_statistics = freeze_bn_statistics
        self._backbone_frozen = False
        self._memory_format = torch.contiguous_format
        self._compiled = False
        self._class_info: ClassInfo | None = None
        self.predict_backend = predict_backend
        self._predict_nets: OrderedDict[tuple[int, ...] | None, Callable[[Tensor], object]] = OrderedDict()

    # ------------------------------------------------------------------ classes
    @property
    def class_info(self) -> ClassInfo | None:
        """What the network's outputs mean (:mod:`mbv3_dense.checkpoints.classes`): from the checkpoint it was restored
        from, else the training data, else the network's ``class_names``; recorded in every checkpoint."""
        if self._class_info is not None:
            return self._class_info
        names = getattr(self.model, "class_names", None)
        return {"names": list(names)} if names is not None else None

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self._class_info is None and hasattr(type(datamodule), "class_info"):
            # Predicting on photos, the training data may be elsewhere: then the checkpoint says (restored next).
            self._class_info = data_class_info(datamodule) if stage == "predict" else datamodule.class_info

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get(RECORD_KEY)
        if isinstance(record, dict) and record.get("classes"):
            self._class_info = record["classes"]

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

    # ------------------------------------------------------------------ fine-tuning: frozen backbone, frozen BN
    def on_train_start(self) -> None:
        # A run resumed mid-epoch gets no on_train_epoch_start for that epoch: the state is set here too.
        self._freeze_backbone_for_epoch()

    def on_train_epoch_start(self) -> None:
        self._freeze_backbone_for_epoch()

    def _freeze_backbone_for_epoch(self) -> None:
        """Freeze or release the backbone for this epoch (a function of the epoch alone, so a resumed run
        does what the uninterrupted one did).

        Lightning's ``BackboneFinetuning`` is not used: it leaves frozen parameters out of the optimizer and
        adds them as a new group when they thaw, and on resume it replaces the optimizer's groups with ones
        saved at an earlier epoch (their learning rates included), so a resumed run would not equal an
        uninterrupted one; and its ``train_bn=False`` makes BatchNorm use batch statistics even in eval mode.
        Here every parameter is in the optimizer from the start (:meth:`parameter_groups`).
        """
        frozen = self.current_epoch < self.freeze_backbone_epochs
        if frozen == self._backbone_frozen:
            return
        self._backbone_frozen = frozen
        # Under DDP, parameters must keep requires_grad as they were when the model was wrapped (it hooks only
        # those): there, frozen means the gradients are dropped before the step (on_before_optimizer_step).
        if self.trainer.world_size == 1:
            self.model.backbone.requires_grad_(not frozen)
        self.train(self.training)
        log.info("epoch %d: backbone %s", self.current_epoch,
                 "frozen (no updates, BatchNorm statistics kept)" if frozen else "released: it trains with the rest")

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._backbone_frozen:
            for param in self.model.backbone.parameters():
                param.grad = None

    def train(self, mode: bool = True) -> TaskModule:
        """As ``nn.Module.train``, but frozen parts stay in eval mode: the backbone while it is frozen and,
        with ``freeze_bn_statistics``, every BatchNorm (their running statistics are kept as they are)."""
        super().train(mode)
        if mode and self._backbone_frozen:
            self.model.backbone.eval()
        if mode and self.freeze_bn_statistics:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    # ------------------------------------------------------------------ batches: uint8 in, network input out
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Training and validation batches travel as uint8 and become the network's input here, on the device
        (a quarter of the bytes of float32 to copy, and no float work in the loader workers).

        Prediction batches are left as they are: ``predict_step`` keeps the uint8 images for the writers
        and converts what it feeds the network itself.
        """
        if self._trainer is not None and self.trainer.predicting:
            return batch
        return self.batch_to_input(batch)

    def batch_to_input(self, batch: Any) -> Any:
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

    # ------------------------------------------------------------------ prediction backend
    def on_predict_start(self) -> None:
        self._predict_nets.clear()
        if self.predict_backend in ("onnxruntime", "executorch") and self.device.type != "cpu":
            raise ValueError(f"predict_backend {self.predict_backend!r} runs on the CPU, but the run is on "
                             f"{self.device}: add --trainer.accelerator cpu, or use predict_backend 'folded'")
        log.info("predict backend: %s", {
            "torch": "torch (eager, as trained)", "folded": "folded (eager PyTorch, batch norms folded, channels-last)",
            "onnxruntime": "onnxruntime (the network exported to ONNX, CPU)",
            "executorch": "executorch (the network exported to a .pte lowered to XNNPACK, CPU)"}[self.predict_backend])

    def on_predict_end(self) -> None:
        self._predict_nets.clear()  # exported sessions and folded copies are not kept past the run

    def predict_network(self, example: Tensor) -> Callable[[Tensor], object]:
        """The callable ``predict_step`` runs the network through: :attr:`eval_model` itself for
        ``predict_backend="torch"``, else its deployed form (:func:`mbv3_dense.deploy.make_backend`), built on
        the first call and reused: once for ``"folded"`` (any input size), once per input size (height,
        width) for the exported backends. ``example``: a network input of the size about to be run. Under a
        trainer that is not predicting (pictures drawn during validation) it is always :attr:`eval_model`."""
        if self.predict_backend == "torch" or (self._trainer is not None and not self.trainer.predicting):
            return self.eval_model
        exported = self.predict_backend in ("onnxruntime", "executorch")
        key = (int(example.shape[-2]), int(example.shape[-1])) if exported else None
        if key not in self._predict_nets:
            self._predict_nets[key] = self._build_predict_network(example)
            while len(self._predict_nets) > 4:
                self._predict_nets.popitem(last=False)
        self._predict_nets.move_to_end(key)
        return self._predict_nets[key]

    def _build_predict_network(self, example: Tensor) -> Callable[[Tensor], object]:
        from mbv3_dense.deploy.backend import make_backend  # the exporters are imported only when used

        start = time.perf_counter()
        net = self.eval_model.eval()
        example = example[:1].detach().float().contiguous()
        if self.predict_backend == "folded":
            backend = make_backend("torch", net, example, fold=True, channels_last=True)
        else:
            backend = make_backend(self.predict_backend, net, example.cpu(), threads=torch.get_num_threads(),
                                   task=self.task if self.predict_backend == "executorch" else None)
        log.info("predict backend %s prepared for %s inputs in %.1f s", self.predict_backend,
                 "x".join(map(str, example.shape[-2:])) if self.predict_backend != "folded" else "any",
                 time.perf_counter() - start)
        return backend

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
        """One inference as timed by :class:`~mbv3_dense.training.latency.LatencyCallback`: the network's forward."""
        return self(x)

    def precise_bn_forward(self, batch: Any) -> None:
        """Forward the images of a training batch (its first element, the network's input) through the network."""
        self.model(batch[0])

    # ------------------------------------------------------------------ optimization
    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups: decayed weights and (weight decay 0) norms and biases, or one group with
        ``weight_decay_norm_bias``; split into backbone and the rest when the backbone has its own learning
        rate or is frozen for a while. Every parameter is in a group from the start (a frozen one takes no
        step while it has no gradient), so unfreezing changes no group and a resume finds the same ones."""
        backbone = getattr(self.model, "backbone", None) if (
            self.backbone_lr_multiplier != 1.0 or self.freeze_backbone_epochs) else None
        parts = [("backbone", backbone), ("head", self.model)] if backbone is not None else [("", self.model)]
        seen: set[int] = set()
        groups: list[dict[str, Any]] = []
        for part, module in parts:
            decay, no_decay = split_weight_decay(module, trainable_only=False)
            decay, no_decay = [p for p in decay if id(p) not in seen], [p for p in no_decay if id(p) not in seen]
            seen |= {id(p) for p in decay + no_decay}
            prefix = f"{part}_" if part else ""
            if self.weight_decay_norm_bias:
                groups.append({"params": decay + no_decay, "name": part or "all"})
            else:
                groups += [{"params": decay, "name": part or "decay"},
                           {"params": no_decay, "weight_decay": 0.0, "name": f"{prefix}no_decay"}]
        return [g for g in groups if g["params"]]

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameter_groups())
        for group in optimizer.param_groups:
            if group.get("name", "").startswith("backbone"):
                group["lr"] *= self.backbone_lr_multiplier
        if self.backbone_lr_multiplier != 1.0:
            log.info("backbone learning rate: %g x the optimizer's", self.backbone_lr_multiplier)
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
