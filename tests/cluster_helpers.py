"""Callbacks that the multi-node tests put into their subprocess trainings (importable with PYTHONPATH=<repo>)."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L


class RecordPid(L.Callback):
    """Write ``<folder>/rank<R>.pid`` (this process's id) when training starts, so that a test can signal one
    training process of a multi-process run; a restarted process overwrites its file."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"rank{trainer.global_rank}.pid.tmp"
        tmp.write_text(str(os.getpid()))
        tmp.replace(self.folder / f"rank{trainer.global_rank}.pid")
