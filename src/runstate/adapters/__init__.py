"""Framework adapters, imported lazily: only when a value of that framework is met.

``find_codec`` and ``object_codecs`` look at ``sys.modules``: if a framework has not been
imported by the program, none of its values can be in the state, so it is never imported
here just to check.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import numpy as np

from runstate.format.tensors import NumpyCodec, TensorCodec
from runstate.format.tree import CoreObjects, ObjectCodec

__all__ = ["codec_for_lib", "find_codec", "object_codecs"]

_NUMPY = NumpyCodec()


def _torch_adapter() -> Any:
    from runstate.adapters import torch as torch_adapter

    return torch_adapter


def find_codec(value: Any) -> TensorCodec | None:
    """The codec for a tensor value, or None when ``value`` is not a tensor."""
    if isinstance(value, (np.ndarray, np.generic)):
        return _NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        codec: TensorCodec = _torch_adapter().CODEC
        return codec
    return None


def codec_for_lib(lib: str) -> TensorCodec | None:
    """The codec that rebuilds tensors tagged ``lib``; None when its framework is missing."""
    if lib == "numpy":
        return _NUMPY
    if lib == "torch":
        try:
            codec: TensorCodec = _torch_adapter().CODEC
        except ImportError:
            return None
        return codec
    return None


def object_codecs(*, for_loading: bool = False) -> list[ObjectCodec]:
    """Codecs for generator objects; torch's is included when torch is importable."""
    codecs: list[ObjectCodec] = [CoreObjects()]
    if "torch" in sys.modules or for_loading:
        with contextlib.suppress(ImportError):
            codecs.append(_torch_adapter().OBJECTS)
    return codecs
