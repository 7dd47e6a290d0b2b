"""Exporting a network whose ``.pte`` takes any height and width within a declared range.

``torch.export`` marks the input's height and width as symbolic (``torch.export.Dim``) and every shape
downstream becomes an expression of them; XNNPACK reshapes its operators at run time. Two things stand
in the way, both handled here:

- the paper LR-ASPP's pooling (``segmentation.model.ClampedAvgPool2d``) reads its window from the traced
  shape (``min(49, map side)``). An operator's window is a constant of the graph, so within one range the
  window must be fixed: along each side the range must stay either at least the window (a 49 window) or
  at most it (the window is the whole side: global pooling). :func:`fixed_pool_windows` replaces the
  module by that fixed pooling, or refuses a range that straddles the window, naming the sizes where it
  changes.
- shapes that decide a Python branch (``if s.shape != (1, 1)``) must be decided by the range alone;
  when they are not, ``torch.export`` refuses and suggests the range it can take, which
  :func:`export_dynamic` passes on as a :class:`DynamicSizeError`.

What XNNPACK then leaves outside: a bilinear resize whose *output* size is symbolic
(``upsample_bilinear2d`` to the input's size in LR-ASPP) has no XNNPACK kernel (its
``static_resize_bilinear_2d`` takes constant output sizes) and runs on ExecuTorch's portable kernel;
a resize *from* a symbolic size *to* a fixed one (SSDLite's preprocess inside the program) is delegated.
"""

from __future__ import annotations

import copy
import importlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Modules whose window depends on the traced shape, named by import path (this package imports no task package).
CLAMPED_POOLS = ("segmentation.model.ClampedAvgPool2d",)


class DynamicSizeError(ValueError):
    """A dynamic size range that the network (or its export) cannot take; the message says why and what can."""


class SizeRange(NamedTuple):
    """Inclusive range of the input's height and width (both sides take the same range), in pixels."""

    min: int
    max: int

    def __str__(self) -> str:
        return f"{self.min}:{self.max}"

    def contains(self, height: int, width: int) -> bool:
        return self.min <= height <= self.max and self.min <= width <= self.max


def fit_size(x: Tensor, size_range: SizeRange) -> Tensor:
    """``[N, C, H, W]`` resized (bilinear) so that each side is within the range; unchanged when it is."""
    h, w = (min(max(int(v), size_range.min), size_range.max) for v in x.shape[-2:])
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)


def parse_size_range(text: str) -> SizeRange:
    """``"MIN:MAX"`` -> :class:`SizeRange`; a :class:`DynamicSizeError` naming the text when it is not one."""
    parts = str(text).split(":")
    try:
        low, high = (int(p) for p in parts)
    except ValueError:
        raise DynamicSizeError(f"dynamic size {text!r}: expected MIN:MAX in pixels, e.g. 256:2048") from None
    return check_size_range(SizeRange(low, high))


def check_size_range(size_range: SizeRange) -> SizeRange:
    """The range itself is sane: 2 <= MIN <= MAX (``torch.export`` specialises sizes 0 and 1)."""
    low, high = size_range
    if low < 2 or high < low:
        raise DynamicSizeError(f"dynamic size {low}:{high}: needs 2 <= MIN <= MAX")
    if low == high:
        raise DynamicSizeError(f"dynamic size {low}:{high}: MIN equals MAX, which is a fixed size: use --size "
                               f"{low} {low}")
    return SizeRange(low, high)


def _clamped_pool_types() -> tuple[type, ...]:
    types = []
    for path in CLAMPED_POOLS:
        module_name, _, name = path.rpartition(".")
        try:
            types.append(getattr(importlib.import_module(module_name), name))
        except (ImportError, AttributeError):
            continue
    return tuple(types)


def _windowed_pools(model: nn.Module) -> list[nn.Module]:
    """The clamped pools of ``model`` that have a window (not global pooling), in module order."""
    types = _clamped_pool_types()
    return [m for m in model.modules() if types and isinstance(m, types) and getattr(m, "kernel_size", None)]


class FixedWindowAvgPool2d(nn.Module):
    """Average pooling with a window fixed along each side, or spanning the whole side (global there).

    For a clamped pool whose range keeps each side on one side of the window, this computes the same
    function with constant windows: averaging a ``k x w`` window equals averaging over the width the
    ``k x 1`` averages.

    Args:
        window: ``(kh, kw)``; ``None`` on a side means the whole side.
        stride: the pool's stride (unused on a global side: it has one output there).
    """

    def __init__(self, window: tuple[int | None, int | None], stride: tuple[int, int]) -> None:
        super().__init__()
        self.window = window
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        kh, kw = self.window
        if kh is None and kw is None:
            return x.mean((2, 3), keepdim=True)
        x = F.avg_pool2d(x, (kh or 1, kw or 1), stride=(self.stride[0] if kh else 1, self.stride[1] if kw else 1))
        if kh is None:
            return x.mean(2, keepdim=True)
        if kw is None:
            return x.mean(3, keepdim=True)
        return x

    def extra_repr(self) -> str:
        return f"window={self.window}, stride={self.stride}"


def _pool_input_sizes(model: nn.Module, pools: list[nn.Module], example: Tensor,
                      size: tuple[int, int]) -> list[tuple[int, int]]:
    """The spatial size each pool sees for an input of ``size``, by a forward pass on meta tensors (no compute)."""
    seen: dict[int, tuple[int, int]] = {}
    probe = copy.deepcopy(model).to("meta")
    probe_pools = _windowed_pools(probe)
    hooks = [p.register_forward_pre_hook(lambda mod, args, i=i: seen.__setitem__(i, tuple(args[0].shape[-2:])))
             for i, p in enumerate(probe_pools)]
    try:
        with torch.no_grad():
            probe(torch.empty(example.shape[0], example.shape[1], *size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(pools))]


def fixed_pool_windows(model: nn.Module, example: Tensor, size_range: SizeRange) -> nn.Module:
    """``model``, or a copy whose clamped pools have the fixed windows that ``size_range`` implies.

    Raises:
        DynamicSizeError: a pool's window would change within the range (naming the pool, the side and the
            input sizes where it changes).
    """
    pools = [(name, m) for name, m in model.named_modules() if any(m is p for p in _windowed_pools(model))]
    if not pools:
        return model
    low = _pool_input_sizes(model, [m for _, m in pools], example, (size_range.min, size_range.min))
    high = _pool_input_sizes(model, [m for _, m in pools], example, (size_range.max, size_range.max))
    replacements = {}
    for (name, pool), small, large in zip(pools, low, high, strict=True):
        window: list[int | None] = []
        for side, k, stride, lo, hi in zip(("height", "width"), pool.kernel_size, pool.stride, small, large,
                                           strict=True):
            if lo >= k:
                pooled = ((lo - k) // stride + 1, (hi - k) // stride + 1)
                if pooled[0] == 1 and pooled[1] > 1:
                    index, axis = [n for n, _ in pools].index(name), int(side == "width")
                    low, high = size_range.min, size_range.max  # the first input size whose output is 2: bisect
                    while low < high:
                        middle = (low + high) // 2
                        seen = _pool_input_sizes(model, [m for _, m in pools], example, (middle, middle))
                        low, high = (middle + 1, high) if seen[index][axis] < k + stride else (low, middle)
                    first = low
                    raise DynamicSizeError(
                        f"dynamic size {size_range}: {name} pools a window of {k} at stride {stride} on the {side}: "
                        f"its output is 1 at {size_range.min} px and more from {first} px; torch.export cannot trace "
                        f"a size that is 1 at some sizes of a range and more at others (its contiguity and branch "
                        f"checks on size-1 sides). Take a range from {first} px, or up to {first - 1} px")
                window.append(k)
            elif hi <= k:
                window.append(None)
            else:
                raise DynamicSizeError(
                    f"dynamic size {size_range}: {name} pools a window of {k} on the {side} of a map that is "
                    f"{lo} at {size_range.min} px and {hi} at {size_range.max} px; the window is clamped to the map, "
                    f"so it would change inside the range, and an operator's window is a constant of the program. "
                    f"Take a range whose maps stay at most {k} or at least {k} (export one .pte per regime)")
        replacements[name] = FixedWindowAvgPool2d((window[0], window[1]), tuple(pool.stride))
    fixed = copy.deepcopy(model)
    for name, module in replacements.items():
        parent_name, _, child = name.rpartition(".")
        parent = fixed.get_submodule(parent_name) if parent_name else fixed
        setattr(parent, child, module)
    return fixed


def dynamic_shapes(size_range: SizeRange) -> tuple[dict[int, torch.export.Dim]]:
    """``torch.export`` dynamic shapes for one ``[N, 3, H, W]`` input: H and W in the range, N fixed."""
    return ({2: torch.export.Dim("height", min=size_range.min, max=size_range.max),
             3: torch.export.Dim("width", min=size_range.min, max=size_range.max)},)


def export_dynamic(network: nn.Module, example: Tensor, size_range: SizeRange) -> torch.export.ExportedProgram:
    """``torch.export.export`` with the height and width of the input symbolic within ``size_range``.

    Raises:
        DynamicSizeError: the network's code decides a branch on a size that the range leaves open (or
            specialises a size); the message carries ``torch.export``'s reason and suggested range.
    """
    try:
        return torch.export.export(network, (example,), dynamic_shapes=dynamic_shapes(size_range), strict=False)
    except Exception as err:  # torch._dynamo.exc.UserError and friends: the class moves between releases
        text = str(err)
        if "Constraints violated" not in text and "specializ" not in text.lower() and "Dim" not in text:
            raise
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        reason = " ".join(lines[:6])
        raise DynamicSizeError(f"dynamic size {size_range}: the network cannot take every size in the range "
                               f"({reason[:900]})") from err


class WithPreprocess(nn.Module):
    """A detector that takes the ``[1, 3, H, W]`` image in [0, 1] at its own size: ``model.preprocess`` (the
    model's ``normalize``, then a bilinear resize to its fixed ``image_size``, in that order) runs in the program.

    The two calls are made on the batch tensor rather than through ``preprocess``'s list of images: unbinding
    and stacking a tensor of symbolic size would leave slice, select and cat copies outside XNNPACK. The export
    check compares the program with ``model(model.preprocess([image]))``, so the two cannot drift apart unseen.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> object:
        size = tuple(self.model.image_size)
        return self.model(F.interpolate(self.model.normalize(image), size=size, mode="bilinear", align_corners=False))
