"""Parameter and multiply-add counts (MAdds = FLOPs / 2, counted by ``torch.utils.flop_counter``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN statistics excluded), as torchvision reports."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_madds(model: nn.Module | Callable[[Tensor], object], example: Tensor) -> int:
    """Multiply-adds of one call on ``example``; FlopCounterMode counts 2 FLOPs per multiply-add."""
    was_training = isinstance(model, nn.Module) and model.training
    if isinstance(model, nn.Module):
        model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(example)
    if isinstance(model, nn.Module) and was_training:
        model.train()
    return counter.get_total_flops() // 2
