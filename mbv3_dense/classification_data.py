"""Moved to :mod:`mbv3_dense.classification.data`; this name stays importable while scripts move over."""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("mbv3_dense.classification.data")
