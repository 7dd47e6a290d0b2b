"""Quantization-aware fine-tuning (PT2E, XNNPACK quantizer): the QAT graph, its conversion and its int8 ``.pte``.

Path: the float network, in train mode, goes through ``torch.export`` (batch axis dynamic, spatial size
fixed) and torchao's ``prepare_qat_pt2e`` with ExecuTorch's ``XNNPACKQuantizer`` (QAT config, symmetric
int8, per-channel weights by default). ``prepare_qat_pt2e`` folds every BatchNorm into its convolution
the way the deployed graph will have it (the weight is scaled by ``gamma / sqrt(running_var + eps)``
and fake-quantized, the output divided back, then BatchNorm runs on it: Krishnamoorthi 2018, section
3.2), and puts fake-quantize modules on weights and activations. Training then sees the int8 rounding.
At the end, ``convert_pt2e`` folds BatchNorm for good and the graph is lowered to XNNPACK.

**Why PT2E QAT collapses on MobileNetV3 (pytorch/pytorch#114859), and the fixes here** (the long story:
docs/benchmark.md, "Quantization-aware training"). torchao's rewrites put BatchNorm's ``eps`` and ``momentum``
back to PyTorch's defaults (1e-5, 0.1), where MobileNetV3 uses 1e-3 and 0.01-0.03: they are restored after
``prepare_qat_pt2e`` (:func:`restore_batchnorm_arguments`), train/eval flip the ops' flags in place
(:func:`set_graph_mode`), and :func:`convert_qat` folds with each layer's eps and deploys the trained scales,
with weight channels of one sign at zero point 0, which XNNPACK assumes (:func:`_deployed_qparams`).

The ``lightning fit`` callback that runs it is
:class:`mbv3_dense.training.quantization_aware.QuantizationAwareTraining`.
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

import torch
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
def graph_work() -> Iterator[None]:
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


def require_trained_statistics(state: dict[str, Tensor]) -> None:
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
        require_trained_statistics(dict(network.named_buffers()))
    h, w = int(input_size[0]), int(input_size[1])
    was_training = network.training
    with graph_work():
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

    with graph_work():
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
    with graph_work():
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
        with graph_work(), torch.no_grad():
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
    with graph_work():
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
