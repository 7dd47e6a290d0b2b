"""Moved to :mod:`segmentation.data`; this name stays importable while scripts move over."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("segmentation.data")
