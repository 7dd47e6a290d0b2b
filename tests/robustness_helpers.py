"""Callbacks that the robustness tests put into subprocess trainings (importable with PYTHONPATH=<repo>)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import lightning as L
import torch

from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD


class Throttle(L.Callback):
    """Sleep after every training batch, so that a test can SIGKILL the run between two steps."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


def loader_images(images: torch.Tensor) -> torch.Tensor:
    """The uint8 images the loader delivered, from a classification batch as the training step sees it:
    normalised on the device with ImageNet mean/std (TaskModule.on_after_batch_transfer). The float32
    round trip is off by less than 1e-4 of a grey level, so rounding gives the loader's bytes back."""
    if not images.is_floating_point():
        return images
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((images * std + mean) * 255).round().to(torch.uint8)


class RecordSamples(L.Callback):
    """Write, per rank, which sample keys each training batch held and a digest of each augmented image.

    Reads the keys from the training sampler (a :class:`mbv3_dense.data.sampling.SeededSampler`), so it is
    meant for uninterrupted runs, where batch ``i`` of an epoch holds keys ``i * B .. (i + 1) * B - 1``.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        size = loader.batch_size
        indices = loader.sampler.indices()[batch_idx * size:(batch_idx + 1) * size]
        for index, image in zip(indices, loader_images(batch.images.cpu()), strict=True):
            digest = hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()
            self.rows.append({"epoch": trainer.current_epoch, "index": index, "digest": digest})

    def on_train_end(self, trainer, pl_module) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))
