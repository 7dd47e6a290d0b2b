"""mbv3-dense: MobileNetV3 for classification, SSDLite detection and LR-ASPP segmentation."""

from mbv3_dense.backbone import BlockSpec, FeatureInfo, MobileNetV3
from mbv3_dense.classification.builders import mobilenet_v3_large, mobilenet_v3_small
from mbv3_dense.classification.model import MobileNetV3Classifier
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BlockSpec",
    "FeatureInfo",
    "MobileNetV3",
    "MobileNetV3Classifier",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]
