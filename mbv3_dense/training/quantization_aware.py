"""``QuantizationAwareTraining``: the Lightning callback that runs PT2E quantization-aware fine-tuning in
``lightning fit`` (``configs/qat/<task>.yaml``) on the graph of :mod:`mbv3_dense.deploy.qat`, and ends in an
int8 ``.pte`` beside the PTQ baseline's.

The callback keeps the module's code unchanged: it swaps ``pl_module.model`` for a
:class:`~mbv3_dense.deploy.qat.QATNetwork` at set-up (its forward runs the QAT graph; every other attribute -
``normalize``, ``preprocess``, ``postprocess``, ``default_boxes`` - is the float network's), freezes BatchNorm
statistics and observers at the scheduled optimizer steps, and writes ``<name>.pte`` when ``fit`` ends.
Checkpoints keep the float layout (see :class:`QuantizationAwareTraining`).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from mbv3_dense.deploy.executorch_export import ExecuTorchExport
from mbv3_dense.deploy.qat import (
    QAT_KEY,
    STATE_PREFIX,
    QATNetwork,
    export_qat_pte,
    prepare_qat,
    ptq_pte,
    require_trained_statistics,
)

log = logging.getLogger(__name__)


class QuantizationAwareTraining(L.Callback):
    """Quantization-aware fine-tuning of the module's network in ``lightning fit``, ending in an int8 ``.pte``.

    Add it with a config overlay (``configs/qat/<task>.yaml``) and start from a trained checkpoint given
    to the network's builder (``--model.init_args.model.init_args.weights RUN.ckpt``; a network whose
    BatchNorm statistics were never trained is refused). At set-up the module's ``model`` becomes a
    :class:`QATNetwork` (:func:`prepare_qat`); validation then measures the int8 model as simulated.
    From optimizer step ``freeze_batchnorm_step`` BatchNorm uses its running statistics (the folded
    weights stop moving with each batch), from ``freeze_observers_step`` the quantization ranges are
    fixed; both follow ``trainer.global_step``, so a resumed run freezes where the uninterrupted one did.
    When ``fit`` ends the network is converted and lowered to ``pte`` (XNNPACK int8, batch 1).

    Checkpoints stay readable by every script: ``state_dict`` holds the network's float weights (the
    fine-tuned ones, BatchNorm statistics included) under the usual ``model.*`` keys, and the
    fake-quantize state (observed ranges, enable flags) under ``qat.*``; ``checkpoint["mbv3_dense_qat"]``
    records the settings and the ``.pte`` path. ``--ckpt_path last`` resumes the QAT run exactly; the
    evaluation scripts read the file as the float network (``--pte`` runs the int8 file).

    Args:
        input_size: ``(H, W)`` of the network's input in training and validation (the graph's only size);
            None: the network's ``image_size`` (SSDLite), else the data module's ``crop_size``.
        per_channel: one weight scale per output channel (False: one per tensor).
        freeze_batchnorm_step: optimizer step from which BatchNorm statistics are frozen (None: never).
        freeze_observers_step: optimizer step from which quantization ranges are frozen (None: never).
        pte: where the int8 ``.pte`` goes (default ``<trainer.default_root_dir>/qat_int8.pte``).
        ptq_baseline: also write ``ptq_int8.pte`` beside it at the start of training: post-training
            quantization of the starting weights with the same quantizer, calibrated on
            ``calibration_batches`` training batches (the comparison QAT must beat).
        calibration_batches: training batches for that calibration.
    """

    def __init__(self, *, input_size: tuple[int, int] | None = None, per_channel: bool = True,
                 freeze_batchnorm_step: int | None = None, freeze_observers_step: int | None = None,
                 pte: str | None = None, ptq_baseline: bool = False, calibration_batches: int = 4) -> None:
        if input_size is not None and (len(input_size) != 2 or min(input_size) < 1):
            raise ValueError(f"input_size must be (height, width) or None, got {input_size}")
        for name, step in (("freeze_batchnorm_step", freeze_batchnorm_step),
                           ("freeze_observers_step", freeze_observers_step)):
            if step is not None and step < 0:
                raise ValueError(f"{name} must be a non-negative step or None, got {step}")
        if calibration_batches < 1:
            raise ValueError(f"calibration_batches must be at least 1, got {calibration_batches}")
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.per_channel = per_channel
        self.freeze_batchnorm_step = freeze_batchnorm_step
        self.freeze_observers_step = freeze_observers_step
        self.pte = pte
        self.ptq_baseline = ptq_baseline
        self.calibration_batches = calibration_batches
        self.network: QATNetwork | None = None
        self.export: ExecuTorchExport | None = None

    def pte_path(self, trainer: L.Trainer) -> Path:
        return Path(self.pte) if self.pte else Path(trainer.default_root_dir) / "qat_int8.pte"

    # ------------------------------------------------------------------ set-up: swap in the QAT graph
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.network is not None:
            return
        network = getattr(pl_module, "model", None)
        if not isinstance(network, nn.Module):
            raise ValueError(f"{type(pl_module).__name__} has no network attribute 'model' to fine-tune")
        if getattr(pl_module, "model_ema", None) is not None:
            raise ValueError("quantization-aware training does not keep a weight average: set "
                             "model.init_args.ema_decay: null (validation would measure the float average)")
        if getattr(pl_module, "compile_network", False):
            raise ValueError("quantization-aware training runs the exported graph: set model.init_args.compile: false")
        if self.input_size is None:
            self.input_size = _input_size(network, getattr(trainer, "datamodule", None))
        # Checked when training starts: a resumed run or `validate --ckpt_path` loads its weights after set-up.
        self.network = prepare_qat(network.cpu(), self.input_size, per_channel=self.per_channel,
                                   check_trained=False)
        pl_module.model = self.network
        # Checkpoints in the float layout (model.*) plus the fake-quantize state (qat.*), both ways.
        pl_module.register_state_dict_post_hook(_to_float_layout)
        pl_module.register_load_state_dict_pre_hook(_from_float_layout)

    # ------------------------------------------------------------------ schedule
    def _frozen(self, step: int) -> tuple[bool, bool]:
        bn = self.freeze_batchnorm_step is not None and step >= self.freeze_batchnorm_step
        obs = self.freeze_observers_step is not None and step >= self.freeze_observers_step
        return bn, obs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        bn, obs = self._frozen(trainer.global_step)
        qat = self.network
        if (bn, obs) != (qat.batchnorm_frozen, qat.observers_frozen):
            qat.freeze(batchnorm=bn, observers=obs)
            log.info("QAT at step %d: BatchNorm statistics %s, quantization ranges %s", trainer.global_step,
                     "frozen" if bn else "updating", "frozen" if obs else "updating")
        pl_module.log_dict({"qat/batchnorm_frozen": float(bn), "qat/observers_frozen": float(obs)},
                           on_step=True, on_epoch=False, batch_size=1)

    # ------------------------------------------------------------------ baseline and export
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        require_trained_statistics(dict(self.network.graph.named_buffers()))
        if not self.ptq_baseline or trainer.global_rank != 0 or trainer.global_step > 0:
            return
        from mbv3_dense.training.callbacks import _fresh_loader

        path = self.pte_path(trainer).with_name("ptq_int8.pte")
        inputs = []
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for i, batch in enumerate(_fresh_loader(trainer.train_dataloader)):
                if i >= self.calibration_batches:
                    break
                batch = pl_module.on_after_batch_transfer(pl_module.transfer_batch_to_device(batch, torch.device("cpu"),
                                                                                              0), 0)
                inputs.append(batch[0].float())
        float_net = self.network.__dict__["network"]
        state = {k[len("model."):]: v for k, v in self.network.graph.state_dict().items() if k.startswith("model.")}
        float_copy = copy.deepcopy(float_net).cpu()
        float_copy.load_state_dict({k: v.cpu() for k, v in state.items()})
        result = ptq_pte(float_copy, inputs, path, task=getattr(pl_module, "task", None), per_channel=self.per_channel)
        log.info("PTQ baseline of the starting weights (%s, %d calibration images): %s (%.0f s)",
                 "per-channel" if self.per_channel else "per-tensor", sum(len(x) for x in inputs), result.path,
                 result.seconds)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ``lightning validate --ckpt_path X`` with the overlay: the simulated int8 metric of X, and its .pte.
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0 or self.network is None:
            return
        path = self.pte_path(trainer)
        self.export, diff = export_qat_pte(self.network, path, task=getattr(pl_module, "task", None))
        log.info("QAT int8 .pte %s (%.1f MB, %.0f s; int8 graph vs QAT graph: mean difference %.1e of the mean "
                 "output): %s", path, path.stat().st_size / 1e6, self.export.seconds, diff,
                 self.export.delegation_summary())

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[QAT_KEY] = {"per_channel": self.per_channel, "input_size": list(self.input_size),
                               "freeze_batchnorm_step": self.freeze_batchnorm_step,
                               "freeze_observers_step": self.freeze_observers_step,
                               "pte": str(self.pte_path(trainer)), "state_prefix": STATE_PREFIX}


def _input_size(network: nn.Module, datamodule: object) -> tuple[int, int]:
    size = getattr(network, "image_size", None)
    if size is None:
        size = getattr(datamodule, "crop_size", None)
    if isinstance(size, int):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2):
        raise ValueError("QuantizationAwareTraining: give input_size (height, width): the network has no image_size "
                         "and the data module no crop_size to take it from")
    return int(size[0]), int(size[1])


_GRAPH = "model.graph."
_FLOAT = "model.graph.model."  # the graph wraps the float network as ``model`` (``_Flat``)


def _to_float_layout(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _GRAPH)]:
        rest = key[len(prefix + _GRAPH):]
        new = prefix + rest if key.startswith(prefix + _FLOAT) else prefix + STATE_PREFIX + rest
        state_dict[new] = state_dict.pop(key)


def _from_float_layout(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    for key in list(state_dict):
        if key.startswith(prefix + "model.") and not key.startswith(prefix + _GRAPH):
            state_dict[prefix + _GRAPH + key[len(prefix):]] = state_dict.pop(key)
        elif key.startswith(prefix + STATE_PREFIX):
            state_dict[prefix + _GRAPH + key[len(prefix + STATE_PREFIX):]] = state_dict.pop(key)
