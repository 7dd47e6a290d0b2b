"""ONNX Runtime sessions set up for fair timing, and a wrapper callable like the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mbv3_dense.deploy.onnx_export import STRUCTURE_KEY, unflatten_outputs


def create_session(
    path: str | Path,
    *,
    threads: int | None = None,
    allow_spinning: bool = False,
    optimization: str = "all",
):
    """An ``onnxruntime.InferenceSession`` on the CPU.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads; ``None`` uses ``torch.get_num_threads()`` so both frameworks get
            the same number. Inter-op parallelism is off (one thread).
        allow_spinning: let idle worker threads busy-wait after a run. ORT's default is on, which
            steals the CPU from whatever runs next: interleaved with torch it made torch look ~3x
            slower here (docs/benchmark.md), so it is off unless asked for.
        optimization: graph optimisation level, ``"all"``, ``"extended"``, ``"basic"`` or ``"none"``.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    levels = {
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    }
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {sorted(levels)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = levels[optimization]
    spin = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxModel:
    """Runs an exported model through ONNX Runtime, called like the PyTorch model it came from.

    ``model(x)`` takes a float ``[N, 3, H, W]`` tensor (or array) and returns torch tensors in the
    structure the PyTorch model returned (a tensor, a tuple or a dict; see
    :func:`mbv3_dense.deploy.onnx_export.export_onnx`). Tensors share memory with ORT's output arrays.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (``None``: ``torch.get_num_threads()``).
        allow_spinning: see :func:`create_session`.
    """

    def __init__(self, path: str | Path, *, threads: int | None = None, allow_spinning: bool = False) -> None:
        self.path = Path(path)
        self.session = create_session(self.path, threads=threads, allow_spinning=allow_spinning)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        default = {"kind": "tensor"} if len(self.output_names) == 1 else {"kind": "tuple"}
        self.structure = json.loads(meta[STRUCTURE_KEY]) if STRUCTURE_KEY in meta else default

    def run_numpy(self, x: np.ndarray) -> list[np.ndarray]:
        """Run on a float32 array; returns the graph's outputs in order."""
        return self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})

    def __call__(self, x: Tensor | np.ndarray) -> object:
        array = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
        outputs = [torch.from_numpy(o) for o in self.run_numpy(array)]
        return unflatten_outputs(outputs, self.structure)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, outputs={self.output_names})"
