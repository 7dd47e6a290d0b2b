"""Export to ONNX with the TorchScript exporter (``dynamo=False``) and check the result against PyTorch.

The default ``torch.onnx.export(dynamo=True)`` needs ``onnxscript``, which this project does not
install. Models may return a tensor, a tuple/list of tensors or a dict of
tensors; the graph's outputs are flat, and the structure is written into the model's metadata
(key :data:`STRUCTURE_KEY`) so :class:`mbv3_dense.deploy.runtime.OnnxModel` returns the same
structure as the PyTorch model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

STRUCTURE_KEY = "mbv3_dense.outputs"
DEFAULT_OPSET = 17


def flatten_outputs(out: object) -> tuple[list[Tensor], dict]:
    """``(tensors, structure)`` of a model output: a tensor, a tuple/list or a dict of tensors."""
    if isinstance(out, Tensor):
        return [out], {"kind": "tensor"}
    if isinstance(out, dict):
        bad = [k for k, v in out.items() if not isinstance(v, Tensor)]
        if bad:
            raise TypeError(f"model output dict has entries that are not tensors: {bad}")
        return list(out.values()), {"kind": "dict", "keys": list(out)}
    if isinstance(out, (tuple, list)) and all(isinstance(v, Tensor) for v in out):
        return list(out), {"kind": "tuple", "length": len(out)}
    raise TypeError(f"cannot export a model returning {type(out).__name__}: return a tensor, a tuple or a "
                    "dict of tensors")


def unflatten_outputs(tensors: list, structure: dict) -> object:
    """Inverse of :func:`flatten_outputs`."""
    kind = structure.get("kind", "tuple")
    if kind == "tensor":
        return tensors[0]
    if kind == "dict":
        return dict(zip(structure["keys"], tensors, strict=True))
    return tuple(tensors)


class _Flat(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        return tuple(flatten_outputs(self.model(x))[0])


def export_onnx(
    model: nn.Module,
    example: Tensor,
    path: str | Path,
    *,
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``model`` in eval mode, traced on ``example``, to ``path``; returns the path.

    The input is named ``input``; outputs are ``output`` for a single tensor, the dict keys for a
    dict, ``output_{i}`` for a tuple. Only the batch axis can be dynamic: spatial sizes are fixed
    at export, because shapes computed in Python (pool windows, anchor grids) are traced as
    constants.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        tensors, structure = flatten_outputs(model(example))
    if structure["kind"] == "tensor":
        output_names = ["output"]
    elif structure["kind"] == "dict":
        output_names = [str(k) for k in structure["keys"]]
    else:
        output_names = [f"output_{i}" for i in range(len(tensors))]
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {"input": {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values used as constants
        # The wrapper is put in eval mode: the exporter restores the wrapper's mode recursively afterwards.
        torch.onnx.export(_Flat(model).eval(), (example,), str(path), input_names=["input"], output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    model.train(was_training)
    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = STRUCTURE_KEY, json.dumps(structure)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    return path


@dataclass(frozen=True)
class ParityReport:
    """Largest absolute difference between two outputs, per output name, and whether it is within ``tolerance``."""

    max_abs_error: dict[str, float]
    tolerance: float

    @property
    def ok(self) -> bool:
        return all(err <= self.tolerance for err in self.max_abs_error.values())

    def __str__(self) -> str:
        parts = ", ".join(f"{k}: {v:.3e}" for k, v in self.max_abs_error.items())
        return f"max abs error {parts} (tolerance {self.tolerance:.1e}): {'OK' if self.ok else 'FAILED'}"


def compare_outputs(reference: object, candidate: object, *, tolerance: float) -> ParityReport:
    """Compare two outputs of the same structure (tensors or numpy arrays inside)."""
    ref, structure = flatten_outputs(reference)
    cand, _ = flatten_outputs(_as_tensors(candidate))
    if structure["kind"] == "dict":
        names = [str(k) for k in structure["keys"]]
    else:
        names = ["output"] if len(ref) == 1 else [f"output_{i}" for i in range(len(ref))]
    if len(cand) != len(ref):
        raise ValueError(f"outputs differ in number: {len(ref)} vs {len(cand)}")
    errors = {}
    for name, r, c in zip(names, ref, cand, strict=True):
        c = torch.as_tensor(c)
        if tuple(r.shape) != tuple(c.shape):
            raise ValueError(f"output {name!r}: shape {tuple(c.shape)} differs from the reference {tuple(r.shape)}")
        errors[name] = (r.float() - c.float()).abs().max().item() if r.numel() else 0.0
    return ParityReport(errors, tolerance)


def _as_tensors(out: object) -> object:
    if isinstance(out, dict):
        return {k: torch.as_tensor(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return tuple(torch.as_tensor(v) for v in out)
    return torch.as_tensor(out)
