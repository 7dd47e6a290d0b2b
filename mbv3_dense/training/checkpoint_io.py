"""Checkpoint files that are either complete or absent: written next to their destination, then renamed.

Lightning's ``TorchCheckpointIO`` serialises into memory and writes through an fsspec transaction,
whose local implementation writes to ``tempfile.mkstemp()`` (the system temp folder) and then
``shutil.move``s the file over the destination. When the temp folder and the checkpoint folder are
on different file systems (a local ``/tmp`` and a network or scratch disk for ``runs/``, the common
cluster layout), ``shutil.move`` falls back to copying into the destination, and a kill during that
copy leaves a truncated ``last.ckpt``; a small ``/tmp`` also fails on large checkpoints.
:class:`AtomicCheckpointIO` writes ``<name>.tmp-<pid>`` in the destination folder, flushes it to
disk and ``os.replace``s it over the destination, which POSIX makes atomic: a reader (or a resume
after SIGKILL) sees the old file or the new one, never a mix. Remote paths (``s3://`` ...) are
left to Lightning.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import fsspec.utils
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are temp-file-in-the-same-folder + fsync + rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) not in ("file", "local"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        atomic_torch_save(checkpoint, path)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` that never leaves a partial ``path`` behind.

    The object is serialised in memory first (a failure there touches no file), written to a
    temporary file beside ``path``, fsynced, renamed over ``path``, and the folder is fsynced so
    that the rename survives a power cut. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some file systems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
