"""Quantization-aware fine-tuning (PT2E, XNNPACK quantizer) as a ``lightning fit`` callback, and its int8 ``.pte``.

Path: the float network, in train mode, goes through ``torch.export`` (batch axis dynamic, spatial size
fixed) and torchao's ``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer`` (QAT config, symmetric
int8, per-channel weights by default). ``prepare_qat_pt2e`` folds every BatchNorm into its convolution
the way the deployed graph will have it (the weight is scaled by ``gamma / sqrt(running_var + eps)``
and fake-quantized, the output divided back, then BatchNorm runs on it: Krishnamoorthi 2018, section
3.2), and puts fake-quantize modules on weights and activations. Training then sees the int8 rounding.
At the end, ``convert_pt2e`` folds BatchNorm for good and the graph is lowered to XNNPACK.

**Why PT2E QAT collapses on MobileNetV3 (pytorch/pytorch#114859), and the fixes here.** torchao's
graph rewrites drop BatchNorm's ``eps`` and ``momentum`` and put PyTorch's defaults (1e-5, 0.1) in their
place: the conv-BN fusion of ``prepare_qat_pt2e`` (its replacement pattern hard-codes ``bn_eps = 1e-5``
and calls ``F.batch_norm`` without ``momentum``), ``move_exported_model_to_eval/train`` (its own
"TODO: support custom momentum and eps"; it also resets dropout's probability to 0.5) and the BN
folding of ``convert_pt2e``. ResNets use eps 1e-5 and do not notice; MobileNetV3 uses eps 1e-3
(TensorFlow's, kept by torchvision and this project) and momentum 0.01-0.03. Every channel whose
variance is near 1e-3 or below (MobileNetV3 has many nearly dead depthwise and squeeze-excite-fed
channels) is then scaled by up to ``sqrt(1e-3 / 1e-5) = 10x`` more than the trained network expects,
from the first step, and the running statistics move 10x faster than trained for. On the demo
classifier the QAT graph with fake quantization off (the float function) was 50% of the largest logit
away from the network before any training step. Here the arguments are put back after
``prepare_qat_pt2e`` (:func:`restore_batchnorm_arguments`), train/eval switches flip the ops'
``training`` flags in place instead of re-matching patterns (:func:`set_graph_mode`), and before
``convert_pt2e`` the running variances are shifted by ``eps - 1e-5`` so that its folding with 1e-5
computes ``gamma / sqrt(running_var + eps)`` (:func:`convert_qat`). A second, smaller gap: the fused
fake-quantize kernel computes its scales with another rounding than the observer's
``calculate_qparams``, which ``convert_pt2e`` asks; weights then moved by one int8 step against what
QAT trained. :func:`convert_qat` deploys the trained scales, and the int8 graph computes exactly what
the QAT graph computed in evaluation mode (tests/test_qat.py). A third: the same kernel gives a
per-channel weight whose values all have one sign a zero point of +-127, which PyTorch's int8 graph
honours and XNNPACK's int8 convolution ignores (LR-ASPP's QAT .pte lost 2.4 mIoU points to its 68
such channels); those channels are deployed symmetric, zero point 0 (:func:`_deployed_qparams`).

The callback keeps the module's code unchanged: :class:`QuantizationAwareTraining` swaps
``pl_module.model`` for a :class:`QATNetwork` at set-up (its forward runs the QAT graph; every other
attribute - ``normalize``, ``preprocess``, ``postprocess``, ``default_boxes`` - is the float
network's), freezes BatchNorm statistics and observers at the scheduled optimizer steps, and writes
``<name>.pte`` when ``fit`` ends. Checkpoints keep the float layout (see :class:`QuantizationAwareTraining`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from mbv3_dense.deploy.executorch_export import META_METHOD, META_VERSION, ExecuTorchExport, delegation_of
from mbv3_dense.deploy.onnx_export import _Flat, flatten_outputs, unflatten_outputs
from mbv3_dense.deploy.quantize import xnnpack_quantizer

log = logging.getLogger(__name__)

# The BatchNorm eps torchao's QAT patterns hard-code (qat_utils.py, "TODO: allow setting eps").
TORCHAO_BN_EPS = 1e-5
QAT_KEY = "mbv3_dense_qat"  # the checkpoint entry of a QAT run
STATE_PREFIX = "qat."  # fake-quantize state in the checkpoint's state_dict, beside the float weights
_BATCH_NORM = (torch.ops.aten.batch_norm.default,)
_DROPOUT = (torch.ops.aten.dropout.default, torch.ops.aten.dropout_.default)


@contextlib.contextmanager
def _graph_work() -> Iterator[None]:
    """Graph passes draw from the global generator and need normal (not inference) tensors:
    keep the caller's random stream where it was (one seed, one run)."""
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        yield


def _fused_variance_adds(graph: torch.fx.GraphModule, var_node: torch.fx.Node) -> list[torch.fx.Node]:
    """The ``running_var + eps`` nodes of the QAT conv-BN fusion that read ``var_node``."""
    return [u for u in var_node.users if u.op == "call_function" and u.target == torch.ops.aten.add.Tensor
            and u.args[0] is var_node and isinstance(u.args[1], float)]


def restore_batchnorm_arguments(graph: torch.fx.GraphModule, source: nn.Module) -> int:
    """Put each BatchNorm's own ``eps`` and ``momentum`` back into a PT2E graph; returns the count.

    ``graph`` was exported from ``source`` (its ``get_attr`` targets are ``source``'s names), then
    rewritten by ``prepare_qat_pt2e``, which gives every fused BatchNorm eps 1e-5 and momentum 0.1.
    The fused pattern's ``sqrt(running_var + eps)`` (the scale the weight is fake-quantized at) gets
    the layer's eps too.

    Raises:
        ValueError: a BatchNorm node whose statistics are not a module's buffers, or a layer with
            ``momentum=None`` (a cumulative average cannot be expressed in the graph).
    """
    count = 0
    for node in graph.graph.nodes:
        if node.op != "call_function" or node.target not in _BATCH_NORM:
            continue
        mean, var = node.args[3], node.args[4]
        if not (isinstance(mean, torch.fx.Node) and mean.op == "get_attr" and isinstance(var, torch.fx.Node)):
            raise ValueError(f"BatchNorm node {node.name}: its running mean is not a module buffer")
        layer = source.get_submodule(mean.target.rpartition(".")[0])
        if not isinstance(layer, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"BatchNorm node {node.name} reads {mean.target}, which is not a BatchNorm's")
        if layer.momentum is None:
            raise ValueError(f"{mean.target.rpartition('.')[0]}: BatchNorm with momentum=None (cumulative average) "
                             "cannot be fine-tuned in a PT2E graph; give it a momentum")
        args = list(node.args)
        args[6], args[7] = float(layer.momentum), float(layer.eps)
        node.args = tuple(args)
        for add in _fused_variance_adds(graph, var):
            add.args = (var, float(layer.eps))
        count += 1
    graph.recompile()
    return count


def set_graph_mode(graph: torch.fx.GraphModule, *, batchnorm_training: bool, dropout_training: bool) -> bool:
    """Flip the ``training`` argument of the BatchNorm and dropout ops of an exported graph in place.

    ``GraphModule.train()`` does not change what an exported graph computes; torchao's
    ``move_exported_model_to_eval`` re-matches patterns and loses eps, momentum and the dropout
    probability. BatchNorm with ``training=False`` uses (and no longer updates) the running statistics:
    that is also how they are frozen. Returns whether anything changed (the graph is recompiled then).
    """
    changed = False
    for node in graph.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _BATCH_NORM:
            index, value = 5, batchnorm_training
        elif node.target in _DROPOUT:
            index, value = 2, dropout_training
        else:
            continue
        if node.args[index] != value:
            args = list(node.args)
            args[index] = value
            node.args = tuple(args)
            changed = True
    if changed:
        graph.recompile()
    return changed


def fake_quantizers(graph: nn.Module) -> list[nn.Module]:
    """The fake-quantize modules (weights and activations) of a prepared graph."""
    from torchao.quantization.pt2e.fake_quantize import FakeQuantizeBase

    return [m for m in graph.modules() if isinstance(m, FakeQuantizeBase)]


class QATNetwork(nn.Module):
    """A network during quantization-aware training: ``forward`` runs the PT2E QAT graph, every other
    attribute is the float network's (``normalize``, ``preprocess``, ``postprocess``, ``num_classes``...).

    The graph shares the float network's parameters (``torch.export`` keeps them); the float network is
    not registered as a submodule, so each parameter is counted, optimised and saved once.

    ``train(mode)`` switches BatchNorm (batch statistics in training, running ones in evaluation or
    once frozen), dropout, and the observers (they update in training only, until frozen).

    Args:
        graph: the prepared graph (:func:`prepare_qat`), returning a flat tuple of tensors.
        network: the float network it was exported from.
        structure: the float network's output structure (:func:`~mbv3_dense.deploy.onnx_export.flatten_outputs`).
        input_size: ``(H, W)`` the graph was exported at (its only spatial size).
        per_channel: whether weights are quantized per output channel (recorded, for the exports).
    """

    def __init__(self, graph: torch.fx.GraphModule, network: nn.Module, structure: dict, input_size: tuple[int, int],
                 *, per_channel: bool) -> None:
        super().__init__()
        self.graph = graph
        self.__dict__["network"] = network  # not a submodule: its parameters are the graph's
        self.structure = structure
        self.input_size = None if input_size is None else (int(input_size[0]), int(input_size[1]))
        self.per_channel = per_channel
        self.batchnorm_frozen = False
        self.observers_frozen = False
        self.train(True)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["network"], name)

    def _apply(self, fn, recurse: bool = True):
        # Device and dtype moves reach the float network too: its methods use its own buffers (e.g.
        # SSDLite's image_mean). Its parameters are the graph's and move once.
        super()._apply(fn, recurse)
        self.__dict__["network"]._apply(fn, recurse)
        return self

    def forward(self, x: Tensor) -> object:
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"the QAT graph was exported at {self.input_size[0]}x{self.input_size[1]} and takes no "
                             f"other size, got an input of {tuple(x.shape)}: train and validate at that size "
                             "(e.g. data crop_size equal to the validation images), or set the callback's input_size")
        self._apply_mode()
        return unflatten_outputs(list(self.graph(x)), self.structure)

    def train(self, mode: bool = True) -> QATNetwork:
        # The graph's own flag changes nothing it computes; the mode is applied to its ops (_apply_mode).
        self.training = mode
        self._apply_mode()
        return self

    def freeze(self, *, batchnorm: bool, observers: bool) -> None:
        """Freeze (or not) the BatchNorm statistics and the observers' ranges."""
        self.batchnorm_frozen, self.observers_frozen = batchnorm, observers
        self._apply_mode()

    def _apply_mode(self) -> None:
        """Make the graph's ops follow ``training`` and the frozen flags. Called on every forward as well:
        Lightning restores ``training`` flags after validation by assignment, without ``train()``."""
        mode = (self.training and not self.batchnorm_frozen, self.training, self.training and not self.observers_frozen)
        if mode == self.__dict__.get("_applied"):
            return
        set_graph_mode(self.graph, batchnorm_training=mode[0], dropout_training=mode[1])
        for fq in fake_quantizers(self.graph):
            fq.enable_observer(mode[2])
        self.__dict__["_applied"] = mode


def _check_trained(state: dict[str, Tensor]) -> None:
    """Refuse BatchNorm statistics that were never trained (``state``: a network's buffers by name)."""
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    variances = [v for k, v in state.items() if k.endswith("running_var")]
    if means and all(bool((m == 0).all()) for m in means) and all(bool((v == 1).all()) for v in variances):
        raise ValueError("every BatchNorm of the network holds its initial statistics (mean 0, variance 1): "
                         "quantization-aware training starts from a trained network; give its checkpoint to the "
                         "builder (--model.init_args.model.init_args.weights RUN.ckpt)")


def prepare_qat(network: nn.Module, input_size: tuple[int, int], *, per_channel: bool = True,
                check_trained: bool = True) -> QATNetwork:
    """The float ``network`` (trained, on the CPU) as a :class:`QATNetwork` in train mode.

    Exported at ``[B, 3, H, W]`` with ``B`` dynamic and ``(H, W) = input_size``, prepared with
    ``prepare_qat_pt2e`` and :func:`xnnpack_quantizer(per_channel=..., qat=True)`, BatchNorm arguments
    restored. The global random stream is left where it was. ``check_trained``: refuse a network whose
    BatchNorm statistics were never trained (off when a checkpoint's state is loaded into it next).
    """
    from torch.export import Dim
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    if check_trained:
        _check_trained(dict(network.named_buffers()))
    h, w = int(input_size[0]), int(input_size[1])
    was_training = network.training
    with _graph_work():
        example = torch.randn(2, 3, h, w)
        with torch.no_grad():
            _, structure = flatten_outputs(network.eval()(example))
        flat = _Flat(network).train()
        exported = torch.export.export(flat, (example,), dynamic_shapes=({0: Dim("batch", min=1, max=65536)},),
                                       strict=False)
        graph = prepare_qat_pt2e(exported.module(), xnnpack_quantizer(per_channel=per_channel, qat=True))
        fixed = restore_batchnorm_arguments(graph, flat)
    network.train(was_training)
    log.info("QAT graph: %d BatchNorm layers folded with their own eps/momentum, %d fake quantizers, %dx%d input, "
             "%s weights", fixed, len(fake_quantizers(graph)), h, w, "per-channel" if per_channel else "per-tensor")
    return QATNetwork(graph, network, structure, (h, w), per_channel=per_channel)


def _trained_qparams(fq: nn.Module) -> tuple[Tensor, Tensor]:
    return fq.scale.detach().clone(), fq.zero_point.detach().clone()


def _deployed_qparams(fq: nn.Module) -> tuple[Tensor, Tensor]:
    """The scales QAT trained with, except where XNNPACK cannot run them: a symmetric (weight) quantizer
    must have zero point 0. The fused fake-quantize kernel gives a per-channel weight whose values all
    have one sign (a channel in [0.007, 0.455], say) zero point -127 or 127 and half the symmetric scale:
    PyTorch's reference int8 graph computes that, but XNNPACK's int8 convolution takes the weights as
    symmetric and ignores the zero point, so the channel's weights are shifted by 127 steps. Those channels
    get the observer's symmetric scale (its range widened to hold 0) and zero point 0."""
    scale, zero_point = _trained_qparams(fq)
    if fq.qscheme not in (torch.per_channel_symmetric, torch.per_tensor_symmetric) or not bool((zero_point != 0).any()):
        return scale, zero_point
    symmetric_scale, _ = fq.activation_post_process.calculate_qparams()
    shifted = zero_point != 0
    scale = torch.where(shifted, symmetric_scale.to(scale.dtype).reshape(scale.shape), scale)
    return scale, torch.where(shifted, torch.zeros_like(zero_point), zero_point)


def symmetric_zero_point_channels(graph: nn.Module) -> int:
    """How many weight channels of a QAT graph the fused fake-quantize kernel gave a non-zero zero point
    in a symmetric scheme (deployed with the symmetric scale instead: :func:`_deployed_qparams`)."""
    return sum(int((fq.zero_point != 0).sum()) for fq in fake_quantizers(graph)
               if fq.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric))


def convert_qat(qat: QATNetwork) -> torch.fx.GraphModule:
    """The int8 graph of ``qat``'s current state (``convert_pt2e`` of a copy; ``qat`` is unchanged).

    BatchNorm is folded with running statistics, dropout is off, and the scales are those the fake
    quantizers trained with. torchao folds with eps 1e-5 whatever the layer's: each fused layer's
    running variance is shifted by ``eps - 1e-5`` first, so that the folded weights are
    ``gamma / sqrt(running_var + eps)``.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with _graph_work():
        graph = copy.deepcopy(qat.graph).cpu()
        set_graph_mode(graph, batchnorm_training=False, dropout_training=False)
        for fq in fake_quantizers(graph):
            fq.disable_observer()
            # convert_pt2e asks the observer for its qparams (Python's formula on its min/max), which can
            # differ by a rounding from the scale the fused fake-quantize kernel computed and trained
            # with: deploy the trained ones (symmetric ones where the kernel gave a weight channel a
            # zero point XNNPACK would ignore, see _deployed_qparams).
            fq.calculate_qparams = partial(_deployed_qparams, fq)
        with torch.no_grad():
            for node in graph.graph.nodes:
                if node.op == "call_function" and node.target in _BATCH_NORM:
                    var = node.args[4]
                    if _fused_variance_adds(graph, var):
                        graph.get_buffer(var.target).add_(float(node.args[7]) - TORCHAO_BN_EPS)
        return convert_pt2e(graph)


def write_pte(network: nn.Module, example: Tensor, path: str | Path, *, task: str | None, structure: dict,
              int8: bool = True) -> ExecuTorchExport:
    """Lower an already quantized (or float) graph returning a flat tuple to an XNNPACK ``.pte``.

    The file carries the same description as :func:`~mbv3_dense.deploy.export_executorch` writes (task,
    input shape, output ``structure``, int8), so :class:`~mbv3_dense.deploy.ExecuTorchModel` and the
    evaluation scripts' ``--pte`` read it. Written next to ``path`` and renamed: no half-written file.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = example.detach().cpu().float().contiguous()
    meta = {"format": "mbv3_dense.executorch", "version": META_VERSION, "task": task,
            "input_shape": list(example.shape), "outputs": structure, "int8": bool(int8),
            "dynamic_size": None, "preprocess": False}
    with _graph_work():
        exported = torch.export.export(network, (example,), strict=False)
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                           constant_methods={META_METHOD: list(json.dumps(meta).encode())})
        delegation = delegation_of(edge.exported_program())
        program = edge.to_executorch()
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(program.buffer)
    os.replace(partial, path)
    return ExecuTorchExport(path, meta, delegation, time.perf_counter() - start)


def export_qat_pte(qat: QATNetwork, path: str | Path, *, task: str | None) -> tuple[ExecuTorchExport, float]:
    """Convert ``qat`` to int8 and write its ``.pte`` at batch 1.

    Returns the export and how far the int8 graph is from the QAT graph (evaluation mode) on a random
    input: mean absolute difference over mean absolute output. They differ by rounding only (one int8
    step where a value sits on a rounding boundary, carried through the layers), not by a fold.
    """
    shifted = symmetric_zero_point_channels(qat.graph)
    if shifted:
        log.info("QAT: %d weight channels of one sign had a non-zero zero point (the fused fake-quantize kernel's); "
                 "deployed with their symmetric scale and zero point 0, as XNNPACK runs them", shifted)
    converted = convert_qat(qat)
    example = torch.randn(1, 3, *qat.input_size, generator=torch.Generator().manual_seed(0))
    was_training = qat.training
    qat.train(False)
    try:
        with _graph_work(), torch.no_grad():
            device = next(qat.graph.parameters()).device
            reference = [t.cpu() for t in qat.graph(example.to(device))]
            got = list(converted(example))
    finally:
        qat.train(was_training)
    diff = sum((r - g).abs().sum().item() for r, g in zip(reference, got, strict=True)) / max(
        sum(r.abs().sum().item() for r in reference), 1e-12)
    return write_pte(converted, example, path, task=task, structure=qat.structure), diff


def ptq_pte(network: nn.Module, calibration: Iterable[Tensor], path: str | Path, *, task: str | None,
            per_channel: bool = True) -> ExecuTorchExport:
    """Post-training quantization of the float ``network`` to an int8 ``.pte``, with the same quantizer
    settings as QAT: the baseline a QAT run is compared with. ``calibration``: network inputs ``[1, 3, H, W]``."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    calibration = [x.detach().cpu().float() for x in calibration]
    if not calibration:
        raise ValueError("PTQ calibration needs at least one input")
    was_training = network.training
    with _graph_work():
        network = copy.deepcopy(network).cpu().eval()
        example = calibration[0][:1].contiguous()
        with torch.no_grad():
            _, structure = flatten_outputs(network(example))
        graph = torch.export.export(_Flat(network).eval(), (example,), strict=False).module()
        prepared = prepare_pt2e(graph, xnnpack_quantizer(per_channel=per_channel))
        with torch.no_grad():
            for x in calibration:
                for item in x.split(1):
                    prepared(item.contiguous())
        converted = convert_pt2e(prepared)
    result = write_pte(converted, example, path, task=task, structure=structure)
    network.train(was_training)
    return result


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
        _check_trained(dict(self.network.graph.named_buffers()))
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
