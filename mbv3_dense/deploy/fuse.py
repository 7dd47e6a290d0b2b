"""Eager-mode inference rewrites: batch-norm folding and channels-last memory format.

Both return a new module (the input is left untouched) that computes the same function in eval
mode, within float rounding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every ``Conv2d -> BatchNorm2d`` pair folded into one conv.

    Pairs are found inside ``nn.Sequential`` containers only, where child order is data order
    (our ``ConvNormAct``, torchvision's ``Conv2dNormActivation``, SSDLite and LR-ASPP heads). The
    batch norm is replaced by ``nn.Identity`` so the indices of the other children stay the same.
    The copy is for inference only: its batch norms are gone, so it cannot be trained.
    """
    folded = copy.deepcopy(model).eval()
    for container in folded.modules():
        if not isinstance(container, nn.Sequential):
            continue
        names = list(container._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = container._modules[first], container._modules[second]
            if isinstance(conv, nn.Conv2d) and type(bn) is nn.BatchNorm2d and bn.track_running_stats:
                container._modules[first] = fuse_conv_bn_eval(conv, bn)
                container._modules[second] = nn.Identity()
    return folded


def count_batchnorms(model: nn.Module) -> int:
    """Number of batch-norm layers left in ``model`` (0 after a complete :func:`fold_batchnorm`)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def to_channels_last(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose 4-d weights are stored channels-last (NHWC).

    Inputs should be converted too (``x.contiguous(memory_format=torch.channels_last)``); see
    :class:`ChannelsLast`, which does it on every call.
    """
    return copy.deepcopy(model).to(memory_format=torch.channels_last)


class ChannelsLast(nn.Module):
    """Runs ``model`` on channels-last input; outputs are returned as the model produces them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x.contiguous(memory_format=torch.channels_last))
