"""Run an exported ``.pte`` with ExecuTorch's runtime, called like the PyTorch model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mbv3_dense.deploy.executorch_export import META_METHOD
from mbv3_dense.deploy.onnx_export import unflatten_outputs


class ExecuTorchFileError(ValueError):
    """A ``.pte`` file that cannot be used: missing, not an ExecuTorch program, or built for something else."""


def set_threads(threads: int) -> None:
    """Size XNNPACK's thread pool (process-wide; do not call while a program is running)."""
    from executorch.extension.pybindings import portable_lib

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def read_meta(program, path: Path) -> dict:  # noqa: ANN001 - executorch.runtime.Program
    """The description :func:`mbv3_dense.deploy.export_executorch` stored in the file."""
    if META_METHOD not in program.method_names:
        raise ExecuTorchFileError(f"{path}: an ExecuTorch program, but not one written by mbv3_dense "
                                  f"(no {META_METHOD!r} method; methods: {sorted(program.method_names)})")
    try:
        values = program.load_method(META_METHOD).execute([])
        return json.loads(bytes(int(v) for v in values).decode())
    except (RuntimeError, ValueError) as err:
        raise ExecuTorchFileError(f"{path}: unreadable {META_METHOD!r} description: {err}") from err


class ExecuTorchModel:
    """An XNNPACK-lowered ``.pte`` run by ExecuTorch, called like the PyTorch model it came from.

    ``model(x)`` takes a float ``[N, 3, H, W]`` tensor with the file's ``H, W`` and returns tensors in
    the structure the PyTorch model returned. The program has a fixed batch (1 as exported by this
    project); a larger batch is run one item at a time and concatenated. Outputs are copies.

    Args:
        path: the ``.pte`` file.
        task: when given, the file must have been exported for this task.
        input_size: when given, ``(H, W)`` the file must have been exported for.
        threads: XNNPACK threads (``None``: ``torch.get_num_threads()``); process-wide, see :func:`set_threads`.

    Raises:
        ExecuTorchFileError: naming the file and what is wrong with it (``FileNotFoundError`` when missing).
    """

    def __init__(self, path: str | Path, *, task: str | None = None, input_size: tuple[int, int] | None = None,
                 threads: int | None = None) -> None:
        from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ExecuTorch (.pte) file")
        set_threads(threads if threads is not None else torch.get_num_threads())
        data = self.path.read_bytes()
        try:
            self.program = Runtime.get().load_program(data)
        except (RuntimeError, ValueError) as err:
            raise ExecuTorchFileError(f"{self.path}: not a loadable ExecuTorch program "
                                      f"({len(data)} bytes; corrupt or truncated?): {err}") from err
        self.meta = read_meta(self.program, self.path)
        if task is not None and self.meta.get("task") != task:
            raise ExecuTorchFileError(f"{self.path}: exported for task {self.meta.get('task')!r}, "
                                      f"not {task!r}")
        self.input_shape = tuple(int(v) for v in self.meta["input_shape"])
        if input_size is not None and tuple(input_size) != self.input_shape[2:]:
            raise ExecuTorchFileError(f"{self.path}: exported for input size {self.input_shape[2]}x"
                                      f"{self.input_shape[3]}, not {input_size[0]}x{input_size[1]}")
        try:
            self.method = self.program.load_method("forward")
        except RuntimeError as err:
            raise ExecuTorchFileError(f"{self.path}: cannot load its forward method: {err}") from err
        self.structure = self.meta["outputs"]
        self.int8 = bool(self.meta.get("int8"))

    def _run_one(self, x: Tensor) -> list[Tensor]:
        return [t.clone() for t in self.method.execute([x])]

    def __call__(self, x: Tensor) -> object:
        x = torch.as_tensor(x).detach().cpu().float().contiguous()
        batch = self.input_shape[0]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape[1:] or x.shape[0] % batch:
            raise ValueError(f"{self.path}: input of shape {tuple(x.shape)}, but the program was exported for "
                             f"{list(self.input_shape)} (batch a multiple of {batch})")
        if x.shape[0] == batch:
            outputs = self._run_one(x)
        else:
            parts = [self._run_one(chunk.contiguous()) for chunk in x.split(batch)]
            outputs = [torch.cat(group) for group in zip(*parts, strict=True)]
        return unflatten_outputs(outputs, self.structure)

    def __repr__(self) -> str:
        kind = "int8" if self.int8 else "fp32"
        return f"ExecuTorchModel({str(self.path)!r}, task={self.meta.get('task')!r}, {kind}, " \
               f"input={list(self.input_shape)})"
