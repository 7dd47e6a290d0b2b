"""Run an exported ``.pte`` with ExecuTorch's runtime, called like the PyTorch model it came from."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from mbv3_dense.deploy.dynamic import SizeRange
from mbv3_dense.deploy.executorch_export import META_METHOD
from mbv3_dense.deploy.onnx_export import unflatten_outputs


class ExecuTorchFileError(ValueError):
    """A ``.pte`` file that cannot be used: missing, not an ExecuTorch program, or built for something else."""


class ExecuTorchInputError(ValueError):
    """An input the program does not take (its shape, or a size outside its range); names the file."""


def set_threads(threads: int) -> None:
    """Size XNNPACK's thread pool (process-wide; do not call while a program is running)."""
    from executorch.extension.pybindings import portable_lib

    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    if portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def read_meta(program, path: Path) -> dict:
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

    ``model(x)`` takes a float ``[N, 3, H, W]`` tensor with the file's ``H, W`` (any ``H, W`` within
    :attr:`dynamic_size` for a file exported with one) and returns tensors in the structure the PyTorch
    model returned. The program has a fixed batch (1 as exported by this project); a larger batch is run
    one item at a time and concatenated. Outputs are copies. A file with :attr:`takes_image` set runs the
    detector's own preprocess: its input is the image in [0, 1] at its own size, not the network's input.

    Args:
        path: the ``.pte`` file.
        task: when given, the file must have been exported for this task.
        input_size: when given, ``(H, W)`` the file must have been exported for (or that its dynamic
            range must hold).
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
        dynamic = self.meta.get("dynamic_size")
        self.dynamic_size = SizeRange(*dynamic) if dynamic else None
        self.takes_image = bool(self.meta.get("preprocess"))
        if input_size is not None and not self.accepts(*input_size):
            raise ExecuTorchFileError(f"{self.path}: exported for input size {self.size_text()}, "
                                      f"not {input_size[0]}x{input_size[1]}")
        try:
            self.method = self.program.load_method("forward")
        except RuntimeError as err:
            raise ExecuTorchFileError(f"{self.path}: cannot load its forward method: {err}") from err
        self.structure = self.meta["outputs"]
        self.int8 = bool(self.meta.get("int8"))

    def accepts(self, height: int, width: int) -> bool:
        """Whether the program runs at ``height x width``."""
        if self.dynamic_size is not None:
            return self.dynamic_size.contains(int(height), int(width))
        return (int(height), int(width)) == self.input_shape[2:]

    def size_text(self) -> str:
        """The sizes the program takes, for messages: ``320x320`` or ``any HxW with H, W in 64:1024``."""
        if self.dynamic_size is not None:
            return f"any HxW with H, W in {self.dynamic_size}"
        return f"{self.input_shape[2]}x{self.input_shape[3]}"

    def _run_one(self, x: Tensor) -> list[Tensor]:
        return [t.clone() for t in self.method.execute([x])]

    def __call__(self, x: Tensor) -> object:
        x = torch.as_tensor(x).detach().cpu().float().contiguous()
        batch = self.input_shape[0]
        if (x.ndim != 4 or x.shape[1] != self.input_shape[1] or not self.accepts(*x.shape[2:])
                or x.shape[0] % batch):
            raise ExecuTorchInputError(f"{self.path}: input of shape {tuple(x.shape)}, but the program was exported "
                                       f"for [{batch}, {self.input_shape[1]}, H, W] with HxW {self.size_text()} "
                                       f"(batch a multiple of {batch})")
        if x.shape[0] == batch:
            outputs = self._run_one(x)
        else:
            parts = [self._run_one(chunk.contiguous()) for chunk in x.split(batch)]
            outputs = [torch.cat(group) for group in zip(*parts, strict=True)]
        return unflatten_outputs(outputs, self.structure)

    def __repr__(self) -> str:
        kind = "int8" if self.int8 else "fp32"
        return f"ExecuTorchModel({str(self.path)!r}, task={self.meta.get('task')!r}, {kind}, " \
               f"input={self.size_text()})"
