"""SSDLite detection on COCO with a MobileNetV3 backbone."""

from detection.builders import ssdlite_mobilenet_v3_large, ssdlite_mobilenet_v3_small
from detection.model import SSDLite

__all__ = ["SSDLite", "ssdlite_mobilenet_v3_large", "ssdlite_mobilenet_v3_small"]
