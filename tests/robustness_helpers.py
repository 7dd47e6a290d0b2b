"""Callbacks that the robustness tests put into subprocess trainings (importable with PYTHONPATH=<repo>)."""

from __future__ import annotations

import time

import lightning as L


class Throttle(L.Callback):
    """Sleep after every training batch, so that a test can SIGKILL the run between two steps."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        time.sleep(self.seconds)
