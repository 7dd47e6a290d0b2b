"""Building blocks of MobileNetV3 (Howard et al., ICCV 2019, section 5).

Module and parameter names follow torchvision's layout (``block.{k}``, ``{0: conv, 1: norm}``)
so that torchvision state dicts load without renaming; other layouts are converted in
:mod:`mbv3_dense.checkpoints.weights`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

NormLayer = Callable[[int], nn.Module]
ActLayer = Callable[..., nn.Module]

# Section 5.1 / 6.1.1: BN decay 0.99 (PyTorch momentum 0.01), eps 1e-3 as in TF.
default_norm_layer: NormLayer = partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping below 90% of it.

    The rounding rule of the TF reference implementation (and torchvision's ``_make_divisible``),
    used for every channel count scaled by the width multiplier.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvNormAct(nn.Sequential):
    """Conv2d (no bias) -> norm -> optional activation; children named ``0``, ``1``, ``2``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm_layer: NormLayer = default_norm_layer,
        activation: ActLayer | None = nn.ReLU,
    ) -> None:
        padding = (kernel_size - 1) // 2 * dilation
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                groups=groups,
                bias=False,
            ),
            norm_layer(out_channels),
        ]
        if activation is not None:
            layers.append(activation(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcite(nn.Module):
    """Squeeze-and-excite with ReLU and hard-sigmoid gating (paper section 5.3, Fig. 4).

    The squeeze width is ``make_divisible(channels / 4)``, as in the TF and torchvision models.
    """

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * scale


class InvertedResidual(nn.Module):
    """The MobileNetV3 bottleneck: optional 1x1 expansion, depthwise kxk, optional SE, 1x1 projection.

    ``block`` holds the layers in that order; ``expand_index`` is the position of the expansion
    conv in it (``None`` when the expansion ratio is 1), so heads can tap the expansion output.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        expanded_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        dilation: int,
        use_se: bool,
        activation: ActLayer,
        norm_layer: NormLayer = default_norm_layer,
    ) -> None:
        super().__init__()
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        self.expand_index: int | None = None
        if expanded_channels != in_channels:
            self.expand_index = 0
            layers.append(
                ConvNormAct(in_channels, expanded_channels, norm_layer=norm_layer, activation=activation)
            )
        layers.append(
            ConvNormAct(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel_size,
                stride=stride,
                dilation=dilation,
                groups=expanded_channels,
                norm_layer=norm_layer,
                activation=activation,
            )
        )
        if use_se:
            layers.append(SqueezeExcite(expanded_channels, make_divisible(expanded_channels // 4, 8)))
        layers.append(ConvNormAct(expanded_channels, out_channels, norm_layer=norm_layer, activation=None))
        self.block = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.expanded_channels = expanded_channels
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        return out + x if self.use_residual else out

    def forward_with_expansion(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(output, expansion_output)``; the latter is the 1x1 expansion's activation."""
        if self.expand_index is None:
            return self.forward(x), x
        expanded = self.block[0](x)
        out = self.block[1:](expanded)
        return (out + x if self.use_residual else out), expanded


class Normalize(nn.Module):
    """``[N, 3, H, W]`` (or ``[3, H, W]``) images in [0, 1] -> ``(x - mean) / std`` per channel: a network's input.

    The one owner of input normalisation: each network holds one as its ``normalize`` (ImageNet
    statistics for the classifier and LR-ASPP, [-1, 1] for SSDLite). ``mean`` and ``std`` are
    non-persistent buffers, so they follow the network's device and dtype and are not in its state dict.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def hardswish_layer(inplace: bool = True) -> nn.Module:
    return nn.Hardswish(inplace=inplace)


def relu_layer(inplace: bool = True) -> nn.Module:
    return nn.ReLU(inplace=inplace)


def init_weights(module: nn.Module) -> None:
    """Initialise as torchvision does: Kaiming-normal (fan out) convs, unit norms, N(0, 0.01) linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def set_bn_eps(module: nn.Module, eps: float) -> int:
    """Set ``eps`` on every batch norm in ``module``; returns how many were changed."""
    count = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
            count += 1
    return count
