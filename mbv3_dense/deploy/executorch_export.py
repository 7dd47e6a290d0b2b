"""Export to ExecuTorch (``.pte``) lowered to XNNPACK, in float32 or PT2E int8, and read what was delegated.

Path: ``torch.export.export`` -> ``executorch.exir.to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` -> ``to_executorch()``. int8 inserts quantize/dequantize pairs with torchao's
PT2E (``prepare_pt2e`` -> calibration -> ``convert_pt2e``) and ExecuTorch's ``XNNPACKQuantizer``
(symmetric int8, one weight scale per output channel, static activation ranges), which XNNPACK then
runs as int8 kernels.

The program is exported at a fixed input shape (batch 1 by default): spatial sizes are constants of
the graph (pool windows, anchor grids), as in the ONNX export. A second method, :data:`META_METHOD`,
returns a JSON description (task, input shape, output structure, int8) as a list of byte values, so a
file can say what it was built for and :class:`mbv3_dense.deploy.executorch_runtime.ExecuTorchModel`
refuses a file built for another task or input size.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mbv3_dense.deploy.onnx_export import _Flat, flatten_outputs

log = logging.getLogger(__name__)

META_METHOD = "mbv3_meta"
META_VERSION = 1
_UNCOUNTED = {"executorch_call_delegate", "getitem"}


@dataclass(frozen=True)
class ExecuTorchExport:
    """What :func:`export_executorch` wrote.

    Attributes:
        path: the ``.pte`` file.
        meta: the description stored in the file (see :func:`read_meta`).
        delegated: operator nodes of the edge graph that XNNPACK took over.
        not_delegated: operator name -> count of nodes left to ExecuTorch's portable kernels.
        constant_only: the subset of ``not_delegated`` whose inputs are all constants of the graph
            (e.g. the 0-d scalars of ``hardsigmoid``'s decomposition): they do not depend on the input.
        seconds: time taken by export, quantization and lowering.
    """

    path: Path
    meta: dict
    delegated: int
    not_delegated: dict[str, int] = field(default_factory=dict)
    constant_only: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def delegation_summary(self) -> str:
        if not self.not_delegated:
            return f"every operator is delegated to XNNPACK ({self.delegated} nodes in the delegate)"
        parts = []
        for name, count in sorted(self.not_delegated.items()):
            const = self.constant_only.get(name, 0)
            note = f" ({const} on constants only)" if const else ""
            parts.append(f"{name} x{count}{note}")
        return f"{self.delegated} nodes delegated to XNNPACK; not delegated: " + ", ".join(parts)


def quantize_pt2e_int8(model: nn.Module, example: Tensor, calibration: Iterable[Tensor]) -> nn.Module:
    """A PT2E-quantized copy of ``model`` (fake-quantized graph module, runs in PyTorch) for XNNPACK.

    Args:
        model: the float network in eval mode; it is not modified.
        example: an input of the export shape.
        calibration: inputs of that shape drawn from the data the model will see (preprocessed as
            the model expects); activation ranges are their min/max.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    graph = torch.export.export(_Flat(model).eval(), (example,), strict=False).module()
    prepared = prepare_pt2e(graph, quantizer)
    count = 0
    with torch.no_grad():
        for x in calibration:
            prepared(torch.as_tensor(x, dtype=torch.float32))
            count += 1
    if count == 0:
        raise ValueError("int8 calibration needs at least one input")
    return convert_pt2e(prepared)


def export_executorch(
    model: nn.Module,
    example: Tensor,
    path: str | Path,
    *,
    task: str | None = None,
    int8_calibration: Iterable[Tensor] | None = None,
) -> ExecuTorchExport:
    """Export ``model`` (eval mode, on the CPU) at ``example``'s shape to an XNNPACK-lowered ``.pte``.

    Args:
        model: the network; its output is a tensor, a tuple or a dict of tensors. Not modified.
        example: the input, ``[N, 3, H, W]``; the file runs at exactly this shape.
        path: where the ``.pte`` goes.
        task: stored in the file (``"classify"``, ``"detect"``, ``"segment"``), checked when loading.
        int8_calibration: when given, quantize to int8 with PT2E (:func:`quantize_pt2e_int8`),
            calibrated on these inputs.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    start = time.perf_counter()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model = model.eval()
    example = example.detach().cpu().float()
    # torch.export draws from the global generator: exporting must not move the caller's random stream.
    # The example is copied to the standard NCHW layout: one in channels-last layout (an HWC image
    # permuted to CHW, as ToTensorV2 gives) makes the program expect that dim order, and it then fails
    # at run time on NCHW inputs ("Attempted to resize a static tensor"). Copies made outside
    # inference mode are normal tensors, which torch.export needs, even when called from an
    # evaluation loop or a validation hook; so are the weights of a model built under inference mode.
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        example = example.clone(memory_format=torch.contiguous_format)
        traced = _with_normal_tensors(model)
        if int8_calibration is not None:
            int8_calibration = [torch.as_tensor(x, dtype=torch.float32).clone(memory_format=torch.contiguous_format)
                                for x in int8_calibration]
        try:
            with torch.no_grad():
                _, structure = flatten_outputs(traced(example))
            if int8_calibration is not None:
                network: nn.Module = quantize_pt2e_int8(traced, example, int8_calibration)
            else:
                network = _Flat(traced).eval()
            meta = {"format": "mbv3_dense.executorch", "version": META_VERSION, "task": task,
                    "input_shape": list(example.shape), "outputs": structure, "int8": int8_calibration is not None}
            exported = torch.export.export(network, (example,), strict=False)
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                               constant_methods={META_METHOD: list(json.dumps(meta).encode())})
            delegated, not_delegated, constant_only = _delegation(edge.exported_program())
            program = edge.to_executorch()
        finally:
            model.train(was_training)
    path.write_bytes(program.buffer)
    result = ExecuTorchExport(path, meta, delegated, not_delegated, constant_only, time.perf_counter() - start)
    log.info("ExecuTorch export %s (%s, %.1f s): %s", path.name, "int8" if meta["int8"] else "fp32",
             result.seconds, result.delegation_summary())
    return result


def _with_normal_tensors(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it whose parameters and buffers are normal tensors where it holds
    inference tensors (a model built or loaded under ``torch.inference_mode``): tracing saves them
    for autograd, which inference tensors refuse. Call outside inference mode."""
    if not any(t.is_inference() for t in itertools.chain(model.parameters(), model.buffers())):
        return model
    normal = {id(t): nn.Parameter(t.detach().clone(), requires_grad=t.requires_grad) if isinstance(t, nn.Parameter)
              else t.clone() for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=normal).eval()


def _delegation(program) -> tuple[int, dict[str, int], dict[str, int]]:  # noqa: ANN001 - ExportedProgram
    """(nodes inside XNNPACK delegates, operators left outside, those of them fed by constants only)."""
    graph_module = program.graph_module
    user_inputs = set(program.graph_signature.user_inputs)
    delegated = 0
    for name, sub in graph_module.named_children():
        if name.startswith("lowered_module"):
            original = getattr(sub, "original_module", None)
            if original is not None:
                delegated += sum(1 for n in original.graph.nodes if n.op == "call_function")
    outside, constant_only = Counter(), Counter()
    depends: dict[str, bool] = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            depends[node.name] = node.name in user_inputs
            continue
        inputs = node.all_input_nodes
        depends[node.name] = any(depends.get(n.name, True) for n in inputs)
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if name in _UNCOUNTED:
            continue
        outside[name] += 1
        if not depends[node.name]:
            constant_only[name] += 1
    return delegated, dict(outside), dict(constant_only)


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    schema = getattr(target, "_schema", None)
    if schema is not None:
        overload = getattr(target, "_overloadname", "default")
        return f"{schema.name.split('::')[-1]}.{overload}" if overload != "default" else schema.name.split("::")[-1]
    return name
