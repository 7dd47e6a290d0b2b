"""The MobileNetV3 backbone shared by the classifier, SSDLite and LR-ASPP.

The network is described by the paper's Tables 1 (Large) and 2 (Small), kept below as rows of
:class:`BlockSpec`. The backbone declares its feature taps up front (:attr:`MobileNetV3.feature_info`)
so that heads ask for features by name and never count layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from mbv3_dense.layers import (
    ConvNormAct,
    InvertedResidual,
    NormLayer,
    default_norm_layer,
    hardswish_layer,
    init_weights,
    make_divisible,
    relu_layer,
)

Arch = Literal["large", "small"]


@dataclass(frozen=True)
class BlockSpec:
    """One ``bneck`` row of the paper's Table 1 / Table 2.

    Attributes:
        kernel: depthwise kernel size.
        expanded: channels after the 1x1 expansion ("exp size").
        out: output channels ("#out").
        se: whether the block has squeeze-and-excite ("SE").
        hswish: hard-swish (``True``, "HS") or ReLU (``False``, "RE") non-linearity ("NL").
        stride: stride of the depthwise conv ("s").
        tail: part of the last stage, whose channels the reduced tail halves (section 6.2/6.3).
    """

    kernel: int
    expanded: int
    out: int
    se: bool
    hswish: bool
    stride: int
    tail: bool = False


# Table 1: MobileNetV3-Large (input 224x224x3). Stem: conv2d 3x3, 16, HS, s2.
LARGE_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(3, 16, 16, se=False, hswish=False, stride=1),
    BlockSpec(3, 64, 24, se=False, hswish=False, stride=2),
    BlockSpec(3, 72, 24, se=False, hswish=False, stride=1),
    BlockSpec(5, 72, 40, se=True, hswish=False, stride=2),
    BlockSpec(5, 120, 40, se=True, hswish=False, stride=1),
    BlockSpec(5, 120, 40, se=True, hswish=False, stride=1),
    BlockSpec(3, 240, 80, se=False, hswish=True, stride=2),
    BlockSpec(3, 200, 80, se=False, hswish=True, stride=1),
    BlockSpec(3, 184, 80, se=False, hswish=True, stride=1),
    BlockSpec(3, 184, 80, se=False, hswish=True, stride=1),
    BlockSpec(3, 480, 112, se=True, hswish=True, stride=1),
    BlockSpec(3, 672, 112, se=True, hswish=True, stride=1),
    # The first stride-32 block keeps its 672-wide expansion (it reads 112 channels); its output
    # and the rest of the stage are halved by the reduced tail.
    BlockSpec(5, 672, 160, se=True, hswish=True, stride=2, tail=True),
    BlockSpec(5, 960, 160, se=True, hswish=True, stride=1, tail=True),
    BlockSpec(5, 960, 160, se=True, hswish=True, stride=1, tail=True),
)
# Table 2: MobileNetV3-Small.
SMALL_BLOCKS: tuple[BlockSpec, ...] = (
    BlockSpec(3, 16, 16, se=True, hswish=False, stride=2),
    BlockSpec(3, 72, 24, se=False, hswish=False, stride=2),
    BlockSpec(3, 88, 24, se=False, hswish=False, stride=1),
    BlockSpec(5, 96, 40, se=True, hswish=True, stride=2),
    BlockSpec(5, 240, 40, se=True, hswish=True, stride=1),
    BlockSpec(5, 240, 40, se=True, hswish=True, stride=1),
    BlockSpec(5, 120, 48, se=True, hswish=True, stride=1),
    BlockSpec(5, 144, 48, se=True, hswish=True, stride=1),
    BlockSpec(5, 288, 96, se=True, hswish=True, stride=2, tail=True),
    BlockSpec(5, 576, 96, se=True, hswish=True, stride=1, tail=True),
    BlockSpec(5, 576, 96, se=True, hswish=True, stride=1, tail=True),
)
BLOCKS: dict[str, tuple[BlockSpec, ...]] = {"large": LARGE_BLOCKS, "small": SMALL_BLOCKS}
STEM_CHANNELS = 16
# Width of the classifier's hidden Linear layer (Tables 1/2: "conv2d 1x1, NBN", 1280 / 1024).
HEAD_CHANNELS: dict[str, int] = {"large": 1280, "small": 1024}
# The last conv ("C5") widens the last block's output 6x (960 = 6 * 160, 576 = 6 * 96).
LAST_CONV_EXPANSION = 6


@dataclass(frozen=True)
class FeatureInfo:
    """A named output of the backbone.

    Attributes:
        channels: channels of the tensor.
        stride: its stride relative to the input (after any dilation for output stride 16/8).
        index: the index in ``features`` of the module that produces it.
        expansion: ``True`` when the tap is the 1x1 expansion output inside that block.
    """

    channels: int
    stride: int
    index: int
    expansion: bool = False


class MobileNetV3(nn.Module):
    """MobileNetV3-Large or -Small without a classifier head.

    ``features`` is a ``Sequential`` of stem, bottlenecks and the last 1x1 conv, laid out like
    torchvision's ``MobileNetV3.features``. ``forward`` returns a dict of the taps named in
    ``out_features``; the available taps are declared in :attr:`feature_info`:

    - ``stride4``, ``stride8``, ``stride16``: the output of the last block at that stride.
    - ``stride8_entry``: the output of the first stride-8 block (torchvision's LR-ASPP tap).
    - ``c4_expand``: the expansion output of the first stride-32 bottleneck (SSDLite's C4).
    - ``c5``: the last 1x1 conv (960 channels for Large, 576 for Small at width 1.0).

    With ``output_stride`` 16 or 8 the deepest strides are replaced by dilation (DeepLab style,
    as torchvision's ``dilated=True``), and the declared strides follow.

    Args:
        arch: ``"large"`` or ``"small"``.
        width_mult: multiplier for every channel count (rounded to multiples of 8).
        reduced_tail: halve the channels of the last stage (the paper's detection and RF2 variant).
        output_stride: 32, 16 or 8.
        norm_layer: builds a norm module from a channel count.
        out_features: names of the taps ``forward`` returns.
    """

    def __init__(
        self,
        *,
        arch: Arch = "large",
        width_mult: float = 1.0,
        reduced_tail: bool = False,
        output_stride: int = 32,
        norm_layer: NormLayer = default_norm_layer,
        out_features: tuple[str, ...] = ("c5",),
    ) -> None:
        super().__init__()
        if arch not in BLOCKS:
            raise ValueError(f"arch must be 'large' or 'small', got {arch!r}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 32, 16 or 8, got {output_stride}")
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.arch = arch
        self.width_mult = width_mult
        self.reduced_tail = reduced_tail
        self.output_stride = output_stride

        def channels(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        divider = 2 if reduced_tail else 1
        specs = BLOCKS[arch]
        stem_out = channels(STEM_CHANNELS)
        layers: list[nn.Module] = [
            ConvNormAct(3, stem_out, kernel_size=3, stride=2, norm_layer=norm_layer, activation=hardswish_layer)
        ]
        info: dict[str, FeatureInfo] = {}
        stride, dilation, in_ch = 2, 1, stem_out
        for i, spec in enumerate(specs):
            nominal = self._nominal_stride(specs, i)
            block_stride = spec.stride
            if block_stride > 1 and stride * block_stride > output_stride:
                # Keep the resolution and dilate this and every later block instead.
                dilation *= block_stride
                block_stride = 1
            # The reduced tail halves the stage's outputs, and the expansions that read them.
            reads_tail = spec.tail and i > 0 and specs[i - 1].tail
            expanded = channels(spec.expanded // divider if reads_tail else spec.expanded)
            out = channels(spec.out // divider if spec.tail else spec.out)
            index = len(layers)
            layers.append(
                InvertedResidual(
                    in_channels=in_ch,
                    expanded_channels=expanded,
                    out_channels=out,
                    kernel_size=spec.kernel,
                    stride=block_stride,
                    dilation=dilation,
                    use_se=spec.se,
                    activation=hardswish_layer if spec.hswish else relu_layer,
                    norm_layer=norm_layer,
                )
            )
            if spec.stride > 1 and nominal == 32:
                # The expansion runs before the strided depthwise conv: it is still at the old stride.
                info["c4_expand"] = FeatureInfo(expanded, stride, index, expansion=True)
            stride *= block_stride
            if spec.stride > 1 and nominal == 8:
                info["stride8_entry"] = FeatureInfo(out, stride, index)
            if nominal in (4, 8, 16):
                info[f"stride{nominal}"] = FeatureInfo(out, stride, index)
            in_ch = out
        last_out = LAST_CONV_EXPANSION * in_ch
        layers.append(ConvNormAct(in_ch, last_out, norm_layer=norm_layer, activation=hardswish_layer))
        info["c5"] = FeatureInfo(last_out, stride, len(layers) - 1)
        self.features = nn.Sequential(*layers)
        self.feature_info: dict[str, FeatureInfo] = info
        self.out_channels = last_out
        self.out_features = out_features  # validated by the setter below
        init_weights(self)

    @staticmethod
    def _nominal_stride(specs: tuple[BlockSpec, ...], i: int) -> int:
        stride = 2
        for spec in specs[: i + 1]:
            stride *= spec.stride
        return stride

    @property
    def out_features(self) -> tuple[str, ...]:
        return self._out_features

    @out_features.setter
    def out_features(self, names: tuple[str, ...] | list[str]) -> None:
        unknown = [n for n in names if n not in self.feature_info]
        if unknown or not names:
            raise ValueError(f"unknown feature taps {unknown}; available: {sorted(self.feature_info)}")
        self._out_features = tuple(names)
        self._last_index = max(self.feature_info[n].index for n in names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Args: x: ``[N, 3, H, W]``. Returns: ``{name: [N, C, H/stride, W/stride]}`` for ``out_features``."""
        wanted = self._out_features
        by_index: dict[int, list[tuple[str, bool]]] = {}
        for name in wanted:
            tap = self.feature_info[name]
            by_index.setdefault(tap.index, []).append((name, tap.expansion))
        out: dict[str, Tensor] = {}
        for index in range(self._last_index + 1):
            layer = self.features[index]
            taps = by_index.get(index)
            if taps and any(expansion for _, expansion in taps):
                x, expanded = layer.forward_with_expansion(x)
            else:
                x = layer(x)
                expanded = None
            for name, expansion in taps or ():
                out[name] = expanded if expansion else x
        return out
