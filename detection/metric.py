"""COCO mAP under DDP when the processes hold different numbers of images.

torchmetrics' ``MeanAveragePrecision`` keeps one tensor per image in list states and gathers them
one tensor at a time, so every process must hold the same number of images: with an unpadded
sampler (each image evaluated exactly once, see :func:`mbv3_dense.data.sampling.evaluation_sampler`)
the ranks issue different numbers of collective calls and the gather crashes or hangs, while a
padded sampler would count the repeated images twice. :class:`GatheredMeanAveragePrecision`
gathers each list state as one Python object per rank instead.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torchmetrics.detection import MeanAveragePrecision


class GatheredMeanAveragePrecision(MeanAveragePrecision):
    """``MeanAveragePrecision`` (bbox) whose states are gathered with ``all_gather_object``: every rank may have
    evaluated a different number of images, and after ``compute()`` all ranks hold the same result."""

    # COCO's protocol scores each image's 100 best detections (maxDets 100), which is what the metric keeps of
    # SSDLite's up to 300: torchmetrics' warning that it drops the rest is the protocol, not a problem.
    warn_on_many_detections = False

    def _sync_dist(self, dist_sync_fn: Any = None, process_group: Any = None) -> None:
        group = process_group or self.process_group
        world_size = dist.get_world_size(group=group)
        for attr in self._reductions:
            local = [t.cpu() for t in getattr(self, attr)]
            gathered: list[list | None] = [None] * world_size
            dist.all_gather_object(gathered, local, group=group)
            setattr(self, attr, [t.to(self.device) for part in gathered for t in part])
