"""ImageNet classification: the MobileNetV3 classifier (``model``, built by ``builders``), its
LightningModule (``module``), ImageFolder data (``data``, ``transforms``), prediction files (``predict``)
and generated data (``synthetic``), laid out as the ``detection`` and ``segmentation`` packages.

The model builders are imported here; the Lightning classes load on first use, so that
``import mbv3_dense`` stays free of Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

from mbv3_dense.classification.builders import mobilenet_v3_large, mobilenet_v3_small
from mbv3_dense.classification.model import MobileNetV3Classifier

_LAZY = {
    "ClassificationModule": "mbv3_dense.classification.module",
    "ImageFolderDataModule": "mbv3_dense.classification.data",
}

__all__ = ["ClassificationModule", "ImageFolderDataModule", "MobileNetV3Classifier", "mobilenet_v3_large",
           "mobilenet_v3_small"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
