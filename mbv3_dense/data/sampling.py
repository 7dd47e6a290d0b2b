"""Randomness the project owns: a sample's augmentation is a function of ``(seed, epoch, index)``.

Two pieces make a training run a function of its seed alone, whatever the worker count, the
world size, or the point where it was killed and resumed:

- :class:`SeededSampler` decides the order: epoch ``e`` is the permutation drawn from a generator
  seeded with ``seed + e`` (as ``DistributedSampler`` does), padded and sharded over the processes
  like ``DistributedSampler``, and it can skip the samples a resumed epoch already consumed
  (:func:`training_sampler` reads how many from the resuming trainer). It yields :class:`SampleKey` s,
  not bare indices, so the key travels to whichever worker loads the sample.
- :func:`sample_randomness` decides the augmentation: the dataset opens it around its transform,
  and every generator a transform may draw from (torch's, numpy's and Python's global ones, which
  torchvision's v2 transforms use, and the numpy/Python pair handed to albumentations) is seeded
  from the key. The global states are restored afterwards, so loading a sample never moves the
  training process's own random streams (dropout keeps its sequence).

Nothing here reads a worker's or the OS's random state: a DataLoader worker's seed, the number of
workers and the rank that happens to draw an index change nothing.

:func:`train_loader` and :func:`eval_loader` build the three data modules' loaders with these
samplers, and :func:`worker_init` gives each loader worker one thread (docs/data_pipeline.md).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

log = logging.getLogger(__name__)


def global_seed() -> int:
    """The seed set by ``seed_everything`` (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class SampleKey(NamedTuple):
    """What a training sampler yields: the dataset index and the random draw it is owed.

    Attributes:
        index: position in the dataset.
        epoch: training epoch (0-based).
        seed: the run's seed.
    """

    index: int
    epoch: int
    seed: int


def as_sample_key(key: int | SampleKey) -> SampleKey:
    """A bare index (a dataset read outside training, e.g. ``dataset[3]``) gets epoch 0 of :func:`global_seed`."""
    if isinstance(key, SampleKey):
        return key
    return SampleKey(int(key), 0, global_seed())


class SampleGenerators(NamedTuple):
    """The generators one sample's augmentation draws from (albumentations takes this pair)."""

    numpy: np.random.Generator
    python: random.Random


@contextmanager
def sample_randomness(key: int | SampleKey) -> Iterator[SampleGenerators]:
    """Seed every generator from ``key`` for the duration of one sample's augmentation.

    Inside the block torch's global CPU generator, Python's ``random`` and numpy's legacy global
    generator are seeded from ``(seed, epoch, index)``. Afterwards torch's and Python's are exactly
    as before; numpy's legacy one is left seeded (saving and restoring its state costs 0.2 ms a
    sample, and nothing in training draws from it). The yielded numpy/Python generators are
    independent streams of the same key, for libraries that take generators
    (``albumentations.Compose.set_random_state``).
    """
    key = as_sample_key(key)
    if min(key) < 0:
        raise ValueError(f"sample keys must be non-negative, got {key}")
    sequence = np.random.SeedSequence([key.seed, key.epoch, key.index])
    words = [int(w) for w in sequence.generate_state(4, dtype=np.uint32)]
    generators = SampleGenerators(np.random.default_rng(sequence), random.Random(words[0] << 32 | words[1]))
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed would also queue seeds for every accelerator (0.3 ms).
        torch.default_generator.manual_seed(words[2] << 32 | words[3])
        random.seed(words[1] << 32 | words[2])
        np.random.seed(words[3])
        try:
            yield generators
        finally:
            random.setstate(python_state)


class SeededSampler(DistributedSampler):
    """Each index once per epoch (padded and sharded over the processes), in an order fixed by ``(seed, epoch)``.

    A ``DistributedSampler`` subclass, so Lightning keeps it under DDP instead of putting its own
    in place: the shard of each rank is this sampler's, and a resumed epoch skips on every rank.

    Args:
        dataset: the dataset (only its length is used).
        num_replicas: processes sharing the epoch (the world size).
        rank: this process's rank.
        seed: base seed; ``None`` takes :func:`global_seed`.
    """

    def __init__(self, dataset: Sized, *, num_replicas: int = 1, rank: int = 0, seed: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True,
                         seed=global_seed() if seed is None else seed, drop_last=False)
        self._skip = 0

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` keys of this rank's next iteration (then skip nothing again)."""
        self._skip = max(0, int(num_samples))

    def indices(self) -> list[int]:
        """This rank's dataset indices for the current epoch, in order, before any skip."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=generator).tolist()
        padding = self.total_size - len(order)
        if padding > 0:  # as DistributedSampler: repeat the start so that every rank gets as many
            order += (order * math.ceil(padding / len(order)))[:padding]
        return order[self.rank:self.total_size:self.num_replicas]

    def __iter__(self) -> Iterator[SampleKey]:
        skip, self._skip = self._skip, 0
        for index in self.indices()[skip:]:
            yield SampleKey(index, self.epoch, self.seed)


def batches_done_in_interrupted_epoch(trainer: object | None) -> int:
    """Training batches of the epoch a checkpoint interrupted, when ``trainer`` resumes from it mid-epoch; else 0.

    Lightning restores its loops before it asks for the training loader, so a data module's
    ``train_dataloader()`` can read this and hand the skip to the sampler before the loader's first
    ``iter()`` (which, with worker processes, already draws the first indices). A checkpoint written at
    ``on_train_batch_end`` counts its batch as processed; one written at the end of an epoch skips nothing.
    """
    if trainer is None or getattr(trainer, "ckpt_path", None) is None:
        return 0
    loop = trainer.fit_loop.epoch_loop
    if not loop.restarting or loop.batch_progress.is_last_batch:
        return 0
    return int(loop.batch_progress.current.processed)


def training_sampler(dataset: Sized, trainer: object | None, batch_size: int) -> SeededSampler:
    """The training sampler of a data module: one shard per process of ``trainer`` (one without a trainer),
    resuming an interrupted epoch after the batches it had done (:func:`batches_done_in_interrupted_epoch`)."""
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
    sampler = SeededSampler(dataset, num_replicas=world_size, rank=rank)
    done = batches_done_in_interrupted_epoch(trainer)
    if done:
        sampler.skip_next(done * batch_size)
        log.info("resuming epoch %d after its first %d batches (%d samples on this process)", trainer.current_epoch,
                 done, done * batch_size)
    return sampler


def loader_generator() -> torch.Generator:
    """A DataLoader ``generator``: iterating the loader then draws nothing from torch's global generator."""
    return torch.Generator().manual_seed(global_seed())


def evaluation_sampler(dataset: Sized, trainer: object | None) -> Sampler | None:
    """The validation sampler: under DDP each sample goes to exactly one process.

    A padded ``DistributedSampler`` repeats samples to even out the shards, and the metrics would
    count the repeats twice; Lightning's ``UnrepeatedDistributedSampler`` does not pad. Returns
    ``None`` (the loader's sequential order) in a single process.
    """
    world_size = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world_size <= 1:
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=world_size, rank=trainer.global_rank, shuffle=False)


def worker_init(worker_id: int) -> None:
    """A loader worker's thread settings: one torch thread, OpenCV without its thread pool.

    Each worker is one process on one core: worker threads would oversubscribe the cores that the
    other workers and the training process use. PyTorch already gives a worker one intra-op
    thread; OpenCV (decoding, resizing, warping) would otherwise start a pool as wide as the machine
    in every worker. The main process keeps its settings (``num_workers=0`` loads there).
    """
    torch.set_num_threads(1)
    cv2.setNumThreads(0)


def train_loader(dataset: Dataset, *, trainer: object | None, batch_size: int, num_workers: int,
                 collate_fn: Callable[[list], Any] | None = None, drop_last: bool = True,
                 pin_memory: bool = True) -> DataLoader:
    """A data module's training loader: :func:`training_sampler` order, a key-seeded augmentation per sample,
    persistent one-thread workers, and host memory pinned when a CUDA device is there to copy to.

    The loader's own generator (:func:`loader_generator`) keeps ``iter()`` from drawing on the global
    RNG (dropout's), whose state :class:`~mbv3_dense.training.callbacks.ResumeState` restores.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=training_sampler(dataset, trainer, batch_size),
                      drop_last=drop_last, num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory and torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      worker_init_fn=worker_init, generator=loader_generator())


def eval_loader(dataset: Dataset, *, trainer: object | None, batch_size: int, num_workers: int,
                collate_fn: Callable[[list], Any] | None = None, pin_memory: bool = True) -> DataLoader:
    """A data module's validation loader: in order, each sample on exactly one process (:func:`evaluation_sampler`)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, sampler=evaluation_sampler(dataset, trainer),
                      num_workers=num_workers, collate_fn=collate_fn,
                      pin_memory=pin_memory and torch.cuda.is_available(), persistent_workers=num_workers > 0,
                      worker_init_fn=worker_init)
