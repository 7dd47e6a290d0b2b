"""A training sampler whose order is a function of ``(seed, epoch)`` and that can resume mid-epoch.

torch's ``RandomSampler`` draws each epoch's permutation from the global RNG, so the order after
a resume depends on everything that consumed random numbers before it, and Lightning restarts a
plain loader at the first batch of the interrupted epoch. :class:`ResumableRandomSampler` draws
the permutation of epoch ``e`` from its own generator seeded with ``seed + e`` (as
``DistributedSampler`` does) and can be told to skip the samples already consumed in the
current epoch (:class:`mbv3_dense.callbacks.ResumeState` does this from the checkpoint).

It subclasses ``RandomSampler``, so under DDP Lightning still replaces it by its own
``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler, Sampler


def global_seed() -> int:
    """The seed set by ``seed_everything`` (``PL_GLOBAL_SEED``), 0 when none was set."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class ResumableRandomSampler(RandomSampler):
    """Each index once per epoch, in an order fixed by ``(seed, epoch)``.

    Args:
        data_source: the dataset.
        seed: base seed; ``None`` takes :func:`global_seed`.
    """

    def __init__(self, data_source: Sized, *, seed: int | None = None) -> None:
        super().__init__(data_source)
        self.seed = global_seed() if seed is None else seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch (and of a resumed one)."""
        self.epoch = epoch

    def skip_next(self, num_samples: int) -> None:
        """Leave out the first ``num_samples`` indices of the next iteration (then skip nothing again)."""
        self._skip = max(0, int(num_samples))

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        skip, self._skip = self._skip, 0
        yield from order[skip:]

    def __len__(self) -> int:
        return len(self.data_source)


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
