"""LR-ASPP semantic segmentation on Cityscapes (paper section 6.3)."""

from segmentation.model import LRASPP, LRASPPHead, lraspp_mobilenet_v3_large, lraspp_mobilenet_v3_small

__all__ = ["LRASPP", "LRASPPHead", "lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_small"]
