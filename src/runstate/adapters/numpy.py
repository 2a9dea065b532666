"""NumPy adapter: arrays and NumPy scalars, the one adapter always active.

NumPy is part of the core (the format stores and reads NumPy arrays), so this adapter only
names what the core already has: :class:`~runstate.format.tensors.NumpyCodec`. A custom
framework whose values reach runstate as NumPy arrays (``runstate.keras.State``, a
``runstate.register``-ed class) needs no adapter of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runstate.adapters.base import Adapter
from runstate.format.tensors import NumpyCodec, TensorCodec

__all__ = ["ADAPTER", "NumpyAdapter"]

_CODEC = NumpyCodec()


class NumpyAdapter(Adapter):
    """``numpy.ndarray`` and NumPy scalars as tensors tagged ``"numpy"``."""

    name = "numpy"
    lib = "numpy"

    def tensor_codec(self, value: Any) -> TensorCodec | None:
        return _CODEC if isinstance(value, (np.ndarray, np.generic)) else None

    def codec(self) -> TensorCodec | None:
        return _CODEC


ADAPTER = NumpyAdapter()
