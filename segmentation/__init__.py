"""LR-ASPP semantic segmentation on Cityscapes (paper section 6.3)."""

from segmentation.builders import lraspp_mobilenet_v3_large, lraspp_mobilenet_v3_small
from segmentation.model import LRASPP, LRASPPHead

__all__ = ["LRASPP", "LRASPPHead", "lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_small"]
