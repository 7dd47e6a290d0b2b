"""Export to ExecuTorch (``.pte``) lowered to XNNPACK, in float32 or PT2E int8, and read what was delegated.

Path: ``torch.export.export`` -> ``executorch.exir.to_edge_transform_and_lower`` with the
``XnnpackPartitioner`` -> ``to_executorch()``. int8 inserts quantize/dequantize pairs with torchao's
PT2E (``prepare_pt2e`` -> calibration -> ``convert_pt2e``) and ExecuTorch's ``XNNPACKQuantizer``
(symmetric int8, one weight scale per output channel, static activation ranges), which XNNPACK then
runs as int8 kernels.

The program is exported at a fixed input shape (batch 1 by default), or with height and width
symbolic within a declared range (``dynamic_size``, :mod:`mbv3_dense.deploy.dynamic`). A detector may
take its own preprocess into the program (``preprocess=True``): the program then takes the image in
[0, 1] at its own size. A second method, :data:`META_METHOD`, returns a JSON description (task, input
shape, dynamic range, output structure, int8) as a list of byte values, so a file can say what it was
built for and :class:`mbv3_dense.deploy.executorch_runtime.ExecuTorchModel` refuses a file built for
another task or input size.

:class:`Delegation` counts the compute nodes inside XNNPACK and outside, by operator and by the kind of
call they were traced from (a ``hardsigmoid`` is decomposed into add, clamp and div, all counted as
``hardsigmoid``).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mbv3_dense.deploy.dynamic import SizeRange, WithPreprocess, check_size_range, export_dynamic, fixed_pool_windows
from mbv3_dense.deploy.onnx_export import _Flat, flatten_outputs

log = logging.getLogger(__name__)

META_METHOD = "mbv3_meta"
META_VERSION = 2
# Nodes that are not computations: the delegate call and tuple access, symbolic-size reads and the Python
# arithmetic on them (sizes of a dynamic program), run-time checks of those sizes.
_UNCOUNTED = {"executorch_call_delegate", "getitem", "sym_size.int", "_assert_scalar", "sym_constrain_range_for_size",
              "_assert_tensor_metadata"}
_PYTHON_ARITHMETIC = ("operator", "_operator", "math", "builtins")
# The kind of call a node was traced from (``torch_fn`` meta), for the kinds MobileNetV3 is made of.
_KINDS = {"conv2d": "convolution", "convolution": "convolution", "linear": "linear", "addmm": "linear",
          "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "avg_pool2d": "pooling",
          "adaptive_avg_pool2d": "pooling", "max_pool2d": "pooling", "mean": "pooling", "add": "add", "iadd": "add",
          "mul": "mul", "imul": "mul", "relu": "relu", "relu6": "relu6", "hardtanh": "relu6", "sigmoid": "sigmoid",
          "interpolate": "upsample", "upsample_bilinear2d": "upsample", "cat": "cat"}
# The kinds that must run inside XNNPACK in every network (tests/test_deploy_coverage.py).
REQUIRED_KINDS = ("convolution", "linear", "hardswish", "hardsigmoid", "pooling", "add", "mul")


@dataclass(frozen=True)
class Delegation:
    """Where the compute nodes of a lowered program run.

    Attributes:
        inside: operator -> nodes inside XNNPACK delegates.
        outside: operator -> compute nodes left to ExecuTorch's portable kernels.
        constant_only: operator -> nodes outside whose inputs are all constants of the graph (e.g. dtype
            copies of the 0-d scalars of ``hardsigmoid``'s decomposition); they are not counted as compute.
        kinds_inside: kind of the traced call (``convolution``, ``hardsigmoid``, ``pooling``...) -> nodes inside.
        kinds_outside: kind -> compute nodes outside.
    """

    inside: dict[str, int] = field(default_factory=dict)
    outside: dict[str, int] = field(default_factory=dict)
    constant_only: dict[str, int] = field(default_factory=dict)
    kinds_inside: dict[str, int] = field(default_factory=dict)
    kinds_outside: dict[str, int] = field(default_factory=dict)

    @property
    def delegated(self) -> int:
        return sum(self.inside.values())

    @property
    def total(self) -> int:
        return self.delegated + sum(self.outside.values())

    @property
    def coverage(self) -> float:
        return self.delegated / self.total if self.total else 1.0

    def summary(self) -> str:
        text = (f"{self.delegated} of {self.total} compute nodes delegated to XNNPACK ({self.coverage:.1%})")
        if self.outside:
            text += "; outside: " + ", ".join(f"{name} x{n}" for name, n in sorted(self.outside.items()))
        if self.constant_only:
            text += ("; not counted, on constants only: "
                     + ", ".join(f"{name} x{n}" for name, n in sorted(self.constant_only.items())))
        return text

    def as_dict(self) -> dict:
        return {**asdict(self), "delegated": self.delegated, "total": self.total, "coverage": self.coverage}


@dataclass(frozen=True)
class ExecuTorchExport:
    """What :func:`export_executorch` wrote.

    Attributes:
        path: the ``.pte`` file.
        meta: the description stored in the file (see :func:`read_meta`).
        delegation: where its compute nodes run (:class:`Delegation`).
        seconds: time taken by export, quantization and lowering.
    """

    path: Path
    meta: dict
    delegation: Delegation
    seconds: float = 0.0

    @property
    def delegated(self) -> int:
        """Compute nodes inside XNNPACK."""
        return self.delegation.delegated

    @property
    def not_delegated(self) -> dict[str, int]:
        """Every operator left outside XNNPACK (compute and constant-only nodes) -> count."""
        return dict(Counter(self.delegation.outside) + Counter(self.delegation.constant_only))

    @property
    def constant_only(self) -> dict[str, int]:
        return self.delegation.constant_only

    def delegation_summary(self) -> str:
        return self.delegation.summary()


def quantize_pt2e_int8(model: nn.Module, example: Tensor, calibration: Iterable[Tensor], *,
                       dynamic_size: SizeRange | None = None) -> nn.Module:
    """A PT2E-quantized copy of ``model`` (fake-quantized graph module, runs in PyTorch) for XNNPACK.

    Args:
        model: the float network in eval mode; it is not modified.
        example: an input of the export shape.
        calibration: inputs of that shape (or, with ``dynamic_size``, of any size in the range) drawn from
            the data the model will see (preprocessed as the model expects); activation ranges are their min/max.
        dynamic_size: export with height and width symbolic in this range.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    flat = _Flat(model).eval()
    if dynamic_size is not None:
        graph = export_dynamic(flat, example, dynamic_size).module()
    else:
        graph = torch.export.export(flat, (example,), strict=False).module()
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
    dynamic_size: SizeRange | None = None,
    preprocess: bool = False,
) -> ExecuTorchExport:
    """Export ``model`` (eval mode, on the CPU) at ``example``'s shape to an XNNPACK-lowered ``.pte``.

    The file is written beside ``path`` and renamed into place: an export that fails leaves no file.

    Args:
        model: the network; its output is a tensor, a tuple or a dict of tensors. Not modified.
        example: the input, ``[N, 3, H, W]``; the file runs at exactly this shape, or, with
            ``dynamic_size``, at any height and width in that range (``example``'s must be in it).
        path: where the ``.pte`` goes.
        task: stored in the file (``"classify"``, ``"detect"``, ``"segment"``), checked when loading.
        int8_calibration: when given, quantize to int8 with PT2E (:func:`quantize_pt2e_int8`),
            calibrated on these inputs.
        dynamic_size: height and width symbolic within this range (:mod:`mbv3_dense.deploy.dynamic`).
        preprocess: the program runs ``model.preprocess`` first (a detector's normalise and resize to its
            ``image_size``): it takes ``[1, 3, H, W]`` images in [0, 1] at their own size, and ``example`` is one.

    Raises:
        DynamicSizeError: a range the network cannot take (a pool window or a branch that would change in it).
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
    if dynamic_size is not None:
        dynamic_size = check_size_range(SizeRange(*dynamic_size))
        if not dynamic_size.contains(int(example.shape[-2]), int(example.shape[-1])):
            raise ValueError(f"example of size {tuple(example.shape[-2:])} outside the dynamic size {dynamic_size}")
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False):
        example = example.clone(memory_format=torch.contiguous_format)
        traced = _with_normal_tensors(model)
        if preprocess:
            traced = WithPreprocess(traced).eval()
        if dynamic_size is not None:
            traced = fixed_pool_windows(traced, example, dynamic_size)
        if int8_calibration is not None:
            int8_calibration = [torch.as_tensor(x, dtype=torch.float32).clone(memory_format=torch.contiguous_format)
                                for x in int8_calibration]
        try:
            with torch.no_grad():
                _, structure = flatten_outputs(traced(example))
            if int8_calibration is not None:
                network: nn.Module = quantize_pt2e_int8(traced, example, int8_calibration, dynamic_size=dynamic_size)
            else:
                network = _Flat(traced).eval()
            meta = {"format": "mbv3_dense.executorch", "version": META_VERSION, "task": task,
                    "input_shape": list(example.shape), "outputs": structure, "int8": int8_calibration is not None,
                    "dynamic_size": list(dynamic_size) if dynamic_size is not None else None,
                    "preprocess": preprocess}
            if dynamic_size is not None:
                exported = export_dynamic(network, example, dynamic_size)
            else:
                exported = torch.export.export(network, (example,), strict=False)
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                               constant_methods={META_METHOD: list(json.dumps(meta).encode())})
            delegation = delegation_of(edge.exported_program())
            program = edge.to_executorch()
        finally:
            model.train(was_training)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(program.buffer)
    partial.replace(path)
    result = ExecuTorchExport(path, meta, delegation, time.perf_counter() - start)
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


def delegation_of(program) -> Delegation:
    """Where the compute nodes of a lowered edge program run (see :class:`Delegation`)."""
    graph_module = program.graph_module
    user_inputs = set(program.graph_signature.user_inputs)
    inside, kinds_inside = Counter(), Counter()
    for name, sub in graph_module.named_children():
        if name.startswith("lowered_module"):
            original = getattr(sub, "original_module", None)
            if original is None:
                continue
            for node in original.graph.nodes:
                if node.op == "call_function" and _op_name(node.target) not in _UNCOUNTED:
                    inside[_op_name(node.target)] += 1
                    kinds_inside[_kind(node)] += 1
    outside, kinds_outside, constant_only = Counter(), Counter(), Counter()
    depends: dict[str, bool] = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            depends[node.name] = node.name in user_inputs
            continue
        inputs = node.all_input_nodes
        depends[node.name] = any(depends.get(n.name, True) for n in inputs)
        if node.op != "call_function" or getattr(node.target, "__module__", None) in _PYTHON_ARITHMETIC:
            continue  # Python arithmetic on symbolic sizes
        name = _op_name(node.target)
        if name in _UNCOUNTED:
            continue
        if not depends[node.name]:
            constant_only[name] += 1
            continue
        outside[name] += 1
        kinds_outside[_kind(node)] += 1
    return Delegation(dict(inside), dict(outside), dict(constant_only), dict(kinds_inside), dict(kinds_outside))


def _kind(node) -> str:
    """The kind of call a node was traced from (``torch_fn`` meta), else its operator's name."""
    traced = node.meta.get("torch_fn")
    name = traced[1].rsplit(".", 1)[-1] if traced else _op_name(node.target).split(".")[0]
    name = name.strip("_")
    return _KINDS.get(name, name)


def _op_name(target: object) -> str:
    name = getattr(target, "__name__", None) or str(target)
    schema = getattr(target, "_schema", None)
    if schema is not None:
        overload = getattr(target, "_overloadname", "default")
        return f"{schema.name.split('::')[-1]}.{overload}" if overload != "default" else schema.name.split("::")[-1]
    return name
