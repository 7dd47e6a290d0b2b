"""Moved to :mod:`detection.data`; this name stays importable while scripts move over."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("detection.data")
