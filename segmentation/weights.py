"""LR-ASPP checkpoints: torchvision's ``lraspp_mobilenet_v3_large`` and our Lightning ``.ckpt``.

torchvision keys are ``backbone.{i}...`` (its ``features`` under an ``IntermediateLayerGetter``)
and ``classifier.{cbr,scale,low_classifier,high_classifier}...``; ours are
``backbone.features.{i}...`` and ``head.*``. The module layouts match, so conversion is a rename.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from mbv3_dense.weights import (
    StateDict,
    WeightsError,
    extract_state_dict,
    lightning_model_state,
    load_state_dict_strict,
    read_checkpoint,
)


def from_torchvision_lraspp(state: Mapping[str, Tensor]) -> StateDict:
    """torchvision ``LRASPP`` state dict -> ours (unknown keys are kept, for the strict load to report)."""
    out: StateDict = {}
    for key, value in state.items():
        if re.match(r"backbone\.\d+\.", key):
            out["backbone.features." + key[len("backbone."):]] = value
        elif key.startswith("classifier."):
            out["head." + key[len("classifier."):]] = value
        else:
            out[key] = value
    return out


def to_lraspp_layout(state: Mapping[str, Tensor], container: str, source: str) -> StateDict:
    """Any supported LR-ASPP checkpoint -> our key layout."""
    if container == "lightning":
        state = lightning_model_state(state)
    if "backbone.0.0.weight" in state:
        return from_torchvision_lraspp(state)
    if "backbone.features.0.0.weight" in state:
        return dict(state)
    raise WeightsError(f"{source}: not an LR-ASPP checkpoint (expected torchvision's backbone.0.* / "
                       f"classifier.* keys or ours backbone.features.* / head.*); first keys: {sorted(state)[:5]}")


def load_lraspp_weights(model: nn.Module, path: str | Path) -> None:
    """Load a torchvision LR-ASPP state dict or one of our ``.ckpt`` files into ``model``, strictly.

    Raises:
        WeightsError: unreadable file, unknown layout, or keys/shapes that do not fit (listed).
    """
    state, container = extract_state_dict(read_checkpoint(path), path)
    load_state_dict_strict(model, to_lraspp_layout(state, container, str(path)), str(path))
