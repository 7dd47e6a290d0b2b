"""Reading checkpoints from the wild and converting them to this project's layout.

Every read goes through :func:`read_checkpoint` (``torch.load(weights_only=True)``); every
external key layout is converted in one function here (torchvision, mmpretrain, timm, our own
Lightning ``.ckpt``), and every load is strict through :func:`load_state_dict_strict`, whose
error names the missing, unexpected and wrongly shaped keys.

Our classifier layout is ``backbone.features.{i}...`` (torchvision's ``features`` under
``backbone.``) plus ``classifier.{0,3}``.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mbv3_dense.errors import InputError
from mbv3_dense.layers import set_bn_eps

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]


class WeightsError(InputError, RuntimeError):
    """A checkpoint that cannot be read or does not fit the model."""


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint file safely (``weights_only=True``) on the CPU.

    Raises:
        WeightsError: the file is missing, unreadable, or holds objects other than tensors and
            plain containers (a pickle that would run code is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise WeightsError(
            f"{path}: refused to load: the file holds Python objects that torch.load(weights_only=True) "
            f"does not allow ({first_line}). Weights must be a plain state dict of tensors; "
            "a pickle that runs code is never executed."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def extract_state_dict(obj: Any, path: str | Path = "<checkpoint>") -> tuple[StateDict, str]:
    """Unwrap a loaded checkpoint into ``(state_dict, container)``.

    ``container`` is ``"lightning"`` for a Lightning ``.ckpt`` (keys keep their ``model.`` prefix),
    ``"mmpretrain"`` for ``{"state_dict": ..., "meta": ...}``, ``"reference"`` for torchvision's
    reference-script checkpoints (``{"model": ...}``), and ``"plain"`` for a bare state dict.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        container = "lightning" if "pytorch-lightning_version" in obj else "mmpretrain"
        state = obj["state_dict"]
    elif "model" in obj and isinstance(obj["model"], Mapping):
        container, state = "reference", obj["model"]
    else:
        container, state = "plain", obj
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {bad[:10]}")
    return dict(state), container


def describe_checkpoint(state: Mapping[str, Tensor]) -> str | None:
    """What network a state dict holds, by its keys (for messages about a file given to the wrong network)."""
    keys = state.keys()
    if "head.classification_head.module_list.0.1.weight" in keys:
        return "torchvision's SSDLite detector"
    if "classifier.low_classifier.weight" in keys:
        return "torchvision's LR-ASPP segmenter"
    if "head.low_classifier.weight" in keys:
        return "an LR-ASPP segmenter (this project's layout)"
    if any(k.startswith("cls_head.") for k in keys):
        return "an SSDLite detector (this project's layout)"
    if "classifier.3.weight" in keys and ("features.0.0.weight" in keys or "backbone.features.0.0.weight" in keys):
        return "a MobileNetV3 classifier"
    if "conv_stem.weight" in keys:
        return "a timm MobileNetV3 classifier"
    if "backbone.layer0.conv.weight" in keys:
        return "an mmpretrain MobileNetV3 classifier"
    return None


def backbone_arch(state: Mapping[str, Tensor], prefix: str = "backbone.features.") -> str | None:
    """``"large"`` or ``"small"`` by the number of stages under ``prefix`` (17 and 13), else None."""
    stages = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    return {17: "large", 13: "small"}.get(len({s for s in stages if s.isdigit()}))


def detect_layout(state: Mapping[str, Tensor], source: str = "<checkpoint>") -> str:
    """Name the key layout of a classifier/backbone state dict.

    Returns one of ``"mbv3_dense"`` (``backbone.features.*``), ``"torchvision"`` (``features.*``),
    ``"mmpretrain"`` (``backbone.layer*``), ``"timm"`` (``conv_stem.*``).

    Raises:
        WeightsError: naming ``source``, what the file seems to hold, and the first keys.
    """
    keys = state.keys()
    if "head.low_classifier.weight" in keys or any(k.startswith("cls_head.") for k in keys):
        pass  # a dense model, even when its backbone keys look like a classifier's
    elif "backbone.features.0.0.weight" in keys:
        return "mbv3_dense"
    elif "features.0.0.weight" in keys:
        return "torchvision"
    elif "backbone.layer0.conv.weight" in keys:
        return "mmpretrain"
    elif "conv_stem.weight" in keys:
        return "timm"
    raise layout_error(source, "a MobileNetV3 classifier", "torchvision (features.*), mmpretrain (backbone.layer*), "
                       "timm (conv_stem.*) or mbv3-dense (backbone.features.*)", state)


def layout_error(source: str, network: str, expected: str, state: Mapping[str, Tensor], *,
                 classifier_hint: str = "") -> WeightsError:
    """The error for a state dict in none of ``network``'s layouts: it names ``source``, what the file seems to
    hold (:func:`describe_checkpoint`), the layouts ``expected`` and its first keys; ``classifier_hint`` is added
    when the file holds a classifier (given as ``weights`` where ``weights_backbone`` was meant)."""
    held = describe_checkpoint(state)
    return WeightsError(f"{source}: not {network} checkpoint" + (f": it holds {held}" if held else "")
                        + f"; expected {expected} keys; first keys: {sorted(state)[:5]}"
                        + (classifier_hint if held and "classifier" in held else ""))


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Keep the keys that start with ``prefix``, without it."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_state_dict_strict(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with an error that lists what does not fit.

    Raises:
        WeightsError: naming ``source`` and the missing, unexpected and wrongly shaped keys.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        def listing(title: str, items: list[str]) -> str:
            more = f" ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}): " + ", ".join(items[:20]) + more if items else ""

        raise WeightsError(
            f"{source} does not fit {type(module).__name__}"
            + listing("missing keys", missing)
            + listing("unexpected keys", unexpected)
            + listing("wrongly shaped keys", shapes)
        )
    module.load_state_dict(state, strict=True)


# --------------------------------------------------------------------------------------------
# Layout converters: external classifier layouts -> ours (backbone.features.* + classifier.*).
# They need the target model to know each block's structure (expansion conv or not), since
# Large's first bottleneck has no expansion: layers are mapped by role, not by index.
# --------------------------------------------------------------------------------------------


def _block_roles(features: nn.Sequential, index: int) -> dict[str, int]:
    """Positions of the roles inside ``features[index].block``."""
    block = features[index]
    roles: dict[str, int] = {}
    pos = 0
    if block.expand_index is not None:
        roles["expand"] = pos
        pos += 1
    roles["depthwise"] = pos
    pos += 1
    if any(type(m).__name__ == "SqueezeExcite" for m in block.block):
        roles["se"] = pos
        pos += 1
    roles["project"] = pos
    return roles


def _conv_module_key(rest: str) -> str:
    """mmcv ``ConvModule`` names (``conv.weight``, ``bn.running_mean``) -> ``0.weight`` / ``1.running_mean``."""
    if rest.startswith("conv."):
        return "0." + rest[len("conv."):]
    if rest.startswith("bn."):
        return "1." + rest[len("bn."):]
    raise KeyError(rest)


def from_torchvision_classifier(state: Mapping[str, Tensor]) -> StateDict:
    """torchvision ``MobileNetV3`` (``features.*``, ``classifier.*``) -> ours."""
    return {("backbone." + k if k.startswith("features.") else k): v for k, v in state.items()}


def from_mmpretrain(state: Mapping[str, Tensor], features: nn.Sequential) -> StateDict:
    """mmpretrain ``MobileNetV3`` + ``StackedLinearClsHead`` -> ours.

    mmpretrain names the stem ``backbone.layer0``, bottleneck ``k`` ``backbone.layer{k}`` with
    ``expand_conv`` / ``depthwise_conv`` / ``se.conv{1,2}.conv`` / ``linear_conv`` ConvModules,
    the last 1x1 conv ``backbone.layer{n+1}``, and the head ``head.layers.{0,1}.fc``.
    """
    out: StateDict = {}
    last = len(features) - 1
    role_names = {"expand_conv": "expand", "depthwise_conv": "depthwise", "linear_conv": "project"}
    for key, value in state.items():
        head = re.fullmatch(r"head\.layers\.(\d)\.fc\.(weight|bias)", key)
        if head:
            out[f"classifier.{3 * int(head.group(1))}.{head.group(2)}"] = value
            continue
        m = re.fullmatch(r"backbone\.layer(\d+)\.(.+)", key)
        if not m:
            out[key] = value  # reported as unexpected by the strict load
            continue
        index, rest = int(m.group(1)), m.group(2)
        if index == 0 or index == last:
            try:
                out[f"backbone.features.{index}.{_conv_module_key(rest)}"] = value
            except KeyError:
                out[key] = value
            continue
        if index > last:
            out[key] = value
            continue
        roles = _block_roles(features, index)
        se = re.fullmatch(r"se\.conv([12])\.conv\.(weight|bias)", rest)
        if se and "se" in roles:
            out[f"backbone.features.{index}.block.{roles['se']}.fc{se.group(1)}.{se.group(2)}"] = value
            continue
        name, _, conv_rest = rest.partition(".")
        if name in role_names and role_names[name] in roles:
            try:
                out[f"backbone.features.{index}.block.{roles[role_names[name]]}.{_conv_module_key(conv_rest)}"] = value
                continue
            except KeyError:
                pass
        out[key] = value
    return out


def from_timm(state: Mapping[str, Tensor], features: nn.Sequential) -> StateDict:
    """timm ``mobilenetv3_{large,small}_100`` -> ours.

    timm groups bottlenecks as ``blocks.{stage}.{j}``; they are assigned to our bottlenecks in
    order, the last group being the final 1x1 ``ConvBnAct``. ``conv_head`` is a 1x1 conv with bias,
    reshaped into the first Linear. BN eps differs (1e-5): see :func:`load_classifier_weights`.
    """
    out: StateDict = {}
    groups = sorted({tuple(int(x) for x in m.groups()) for k in state
                     if (m := re.match(r"blocks\.(\d+)\.(\d+)\.", k))})
    position = {g: i + 1 for i, g in enumerate(groups)}  # features index of each timm block
    for key, value in state.items():
        if key == "conv_stem.weight":
            out["backbone.features.0.0.weight"] = value
        elif key.startswith("bn1."):
            out["backbone.features.0.1." + key[4:]] = value
        elif key.startswith("conv_head."):
            out["classifier.0." + key[len("conv_head."):]] = value.flatten(1) if value.dim() == 4 else value
        elif key.startswith("classifier."):
            out["classifier.3." + key[len("classifier."):]] = value
        elif m := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(.+)", key):
            index = position[(int(m.group(1)), int(m.group(2)))]
            layer, rest = m.group(3), m.group(4)
            prefix = f"backbone.features.{index}"
            if index >= len(features) - 1:  # the final ConvBnAct: conv, bn1
                sub = {"conv": "0", "bn1": "1"}.get(layer)
                out[f"{prefix}.{sub}.{rest}" if sub else key] = value
                continue
            roles = _block_roles(features, index)
            has_expand = "expand" in roles
            if has_expand:
                table = {"conv_pw": (roles["expand"], "0"), "bn1": (roles["expand"], "1"),
                         "conv_dw": (roles["depthwise"], "0"), "bn2": (roles["depthwise"], "1"),
                         "conv_pwl": (roles["project"], "0"), "bn3": (roles["project"], "1")}
            else:  # DepthwiseSeparableConv: conv_dw, bn1, se, conv_pw, bn2
                table = {"conv_dw": (roles["depthwise"], "0"), "bn1": (roles["depthwise"], "1"),
                         "conv_pw": (roles["project"], "0"), "bn2": (roles["project"], "1")}
            if layer == "se" and "se" in roles:
                fc = {"conv_reduce": "fc1", "conv_expand": "fc2"}
                name, _, param = rest.partition(".")
                out[f"{prefix}.block.{roles['se']}.{fc.get(name, name)}.{param}"] = value
            elif layer in table:
                pos, sub = table[layer]
                out[f"{prefix}.block.{pos}.{sub}.{rest}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    return out


def lightning_model_state(state: Mapping[str, Tensor]) -> StateDict:
    """The network of one of our Lightning ``.ckpt`` files: keys under ``model.``, prefix removed.

    Where the module kept an exponential moving average of the weights (``model_ema.*``), the
    averaged weights are returned: they are the ones evaluated and deployed.
    """
    ema = strip_prefix(state, "model_ema.")
    return ema if ema else strip_prefix(state, "model.")


def to_classifier_layout(state: Mapping[str, Tensor], container: str, features: nn.Sequential,
                         source: str) -> tuple[StateDict, str]:
    """Convert any supported classifier checkpoint to our layout; returns ``(state, layout)``."""
    if container == "lightning":
        state = lightning_model_state(state)
    layout = detect_layout(state, source)
    if layout == "torchvision":
        state = from_torchvision_classifier(state)
    elif layout == "mmpretrain":
        state = from_mmpretrain(state, features)
    elif layout == "timm":
        state = from_timm(state, features)
    log.info("%s: read as a %s checkpoint", source, layout)
    return dict(state), layout


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> str:
    """Load the backbone part of a classifier checkpoint into a bare :class:`MobileNetV3`.

    The classifier head is dropped with a logged note naming the dropped keys. Returns the layout.
    """
    state, container = extract_state_dict(read_checkpoint(path), path)
    state, layout = to_classifier_layout(state, container, backbone.features, str(path))
    dropped = sorted(k for k in state if not k.startswith("backbone."))
    if dropped:
        log.info("%s: dropping %d head tensors not used by the backbone: %s", path, len(dropped),
                 ", ".join(dropped[:8]) + (" ..." if len(dropped) > 8 else ""))
    load_state_dict_strict(backbone, strip_prefix(state, "backbone."), str(path))
    if layout == "timm":
        set_bn_eps(backbone, 1e-5)
        log.info("%s: timm checkpoint: BatchNorm eps set to 1e-5 (timm's value)", path)
    return layout
