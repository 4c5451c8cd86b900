"""The demo: a real fine-tuning run on the 8x8 digits that ship with scikit-learn.

:func:`pretrained_base` gives the demo's transformer with the pretrained weights that ship
with jadapters (trained on the upright digits), for Linen or NNX.
"""

from jadapters.demo.pretrained import base_info as base_info
from jadapters.demo.pretrained import pretrained_base as pretrained_base

__all__ = ["base_info", "pretrained_base"]
