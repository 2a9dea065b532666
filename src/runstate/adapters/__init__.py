"""Framework adapters, imported lazily: only when a value of that framework is met.

``find_codec`` and ``object_codecs`` look at ``sys.modules``: if a framework has not been
imported by the program, none of its values can be in the state, so it is never imported
here just to check.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from runstate.errors import UnsupportedTypeError
from runstate.format.tensors import NumpyCodec, TensorCodec
from runstate.format.tree import CoreObjects, ObjectCodec

__all__ = ["codec_for_lib", "find_codec", "jax_adapter", "object_codecs", "prepare_loaders"]

_NUMPY = NumpyCodec()


def _torch_adapter() -> Any:
    from runstate.adapters import torch as torch_adapter

    return torch_adapter


def jax_adapter() -> Any:
    """``runstate.adapters.jax`` when the program has imported jax, else None."""
    if sys.modules.get("jax") is None:
        return None
    from runstate.adapters import jax as jax_module

    return jax_module


def find_codec(value: Any) -> TensorCodec | None:
    """The codec for a tensor value, or None when ``value`` is not a tensor."""
    if isinstance(value, (np.ndarray, np.generic)):
        return _NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        codec: TensorCodec = _torch_adapter().CODEC
        return codec
    jax = sys.modules.get("jax")
    if jax is not None and isinstance(value, jax.Array):
        adapter = jax_adapter()
        if not adapter.is_key(value):  # typed keys are objects (adapter.OBJECTS)
            jax_codec: TensorCodec = adapter.CODEC
            return jax_codec
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
    if lib == "jax":
        try:
            from runstate.adapters import jax as jax_module
        except ImportError:
            return None  # read as NumPy arrays
        jax_codec: TensorCodec = jax_module.CODEC
        return jax_codec
    return None


class _JaxKeysWhenLoaded:
    """Rebuilds typed JAX PRNG keys, importing jax only when a checkpoint holds one."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != "jax.random.key":
            raise KeyError(kind)
        try:
            from runstate.adapters import jax as jax_module
        except ImportError:
            raise UnsupportedTypeError(
                "this checkpoint holds a typed JAX PRNG key (jax.random.key); install jax to load it"
            ) from None
        return jax_module.OBJECTS.make(kind, state, attrs)

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


class _TorchGeneratorsWhenLoaded:
    """Rebuilds ``torch.Generator`` objects, importing torch only when a checkpoint holds one."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != "torch.Generator":
            raise KeyError(kind)
        try:
            objects = _torch_adapter().OBJECTS
        except ImportError:
            raise UnsupportedTypeError("this checkpoint holds a torch.Generator; install torch to load it") from None
        return objects.make(kind, state, attrs)

    def copy_into(self, target: Any, source: Any) -> bool:
        return False


def prepare_loaders(state: Any, *, saving: bool, require_exact: bool = False) -> None:
    """Make the data loaders of ``state`` resume exactly, or flag those that cannot (see
    ``runstate.adapters.data``)."""
    if isinstance(state, Mapping):
        from runstate.adapters import data

        data.prepare(state, saving=saving, require_exact=require_exact)


def object_codecs(*, for_loading: bool = False) -> list[ObjectCodec]:
    """Codecs for generator objects; torch's is included when the program has imported torch;
    when loading without it, a stand-in imports torch only if the checkpoint holds a generator.

    JAX's (typed PRNG keys) is included when the program has imported jax; when loading
    without it, a stand-in imports jax only if the checkpoint holds a typed key.
    """
    from runstate.adapters.data import GeneratorObjects

    codecs: list[ObjectCodec] = [CoreObjects(), GeneratorObjects()]
    if "torch" in sys.modules:
        with contextlib.suppress(ImportError):
            codecs.append(_torch_adapter().OBJECTS)
    elif for_loading:
        codecs.append(_TorchGeneratorsWhenLoaded())
    adapter = jax_adapter()
    if adapter is not None:
        codecs.append(adapter.OBJECTS)
    elif for_loading:
        codecs.append(_JaxKeysWhenLoaded())
    return codecs
