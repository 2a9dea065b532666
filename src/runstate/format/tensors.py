"""Framework-neutral description of a tensor on its way to or from disk.

A codec turns a framework's tensor into a :class:`TensorBlob` (dtype code, shape and a way
to obtain its little-endian bytes) and turns bytes read from disk back into a tensor. The
NumPy codec lives here because NumPy is a core dependency; the torch codec lives in
``runstate.adapters.torch`` and is imported only when a torch tensor is met.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

__all__ = [
    "DTYPE_SIZES",
    "NumpyCodec",
    "TensorBlob",
    "TensorCodec",
]

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("runstate supports little-endian machines only")

#: Element size in bytes of every safetensors dtype code runstate writes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "C64": 8,
}

_NUMPY_TO_CODE: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
    "complex64": "C64",
}
_CODE_TO_NUMPY: dict[str, str] = {v: k for k, v in _NUMPY_TO_CODE.items()}


@dataclass
class TensorBlob:
    """A tensor ready to be written.

    Attributes:
        dtype: safetensors dtype code of the bytes in the file (``"F32"``, ``"BF16"``...).
        shape: shape of the tensor in the file.
        nbytes: number of bytes ``read()`` returns.
        lib: which codec restores it (``"torch"`` or ``"numpy"``).
        read: returns the contiguous little-endian bytes; called once, at write time.
        meta: extra fields for the manifest's tensor index (``device``, ``lib_dtype``...).
        identity: equal for two values that are the same tensor (tied weights); stored once.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    lib: str
    read: Callable[[], memoryview]
    meta: dict[str, Any] = field(default_factory=dict)
    identity: Hashable | None = None


class TensorCodec(Protocol):
    """Converts one framework's tensors to blobs and back."""

    lib: str

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        """Describe ``value``; ``where`` names it in error messages."""
        ...

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        """Build a tensor from ``data`` (a 1-D uint8 array this function may keep)."""
        ...


def _as_bytes(arr: np.ndarray) -> memoryview:
    return np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data


class NumpyCodec:
    """Codec for ``numpy.ndarray`` and NumPy scalars (``numpy.float32(1.0)``...)."""

    lib = "numpy"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        from runstate.errors import UnsupportedTypeError

        is_scalar = isinstance(value, np.generic)
        arr = np.asarray(value)
        meta: dict[str, Any] = {"scalar": True} if is_scalar else {}
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        name = arr.dtype.name
        code = _NUMPY_TO_CODE.get(name)
        if code is None:
            if arr.dtype.kind in "OUSVMm" or arr.dtype.fields is not None:
                raise UnsupportedTypeError(
                    f"{where}: a numpy array of dtype {arr.dtype} cannot be stored without "
                    "pickle; convert it to a numeric array or to a list of Python values"
                )
            # A numeric dtype safetensors lacks (complex128, longdouble...): raw bytes.
            meta["lib_dtype"] = arr.dtype.str
            meta["lib_shape"] = list(arr.shape)
            flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
            return TensorBlob("U8", (flat.size,), flat.size, self.lib, lambda: flat.data, meta)
        identity = None
        if not is_scalar:
            iface = arr.__array_interface__
            identity = ("numpy", iface["data"][0], arr.shape, arr.strides, arr.dtype.str)
        shape = tuple(int(s) for s in arr.shape)
        return TensorBlob(code, shape, int(arr.nbytes), self.lib, lambda: _as_bytes(arr), meta, identity)

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        if "lib_dtype" in meta:
            arr = data.view(np.dtype(meta["lib_dtype"])).reshape(meta["lib_shape"])
        else:
            np_name = _CODE_TO_NUMPY.get(dtype)
            if np_name is None:
                from runstate.errors import UnsupportedTypeError

                raise UnsupportedTypeError(
                    f"a tensor of dtype {dtype} cannot be represented in NumPy; install torch to load it"
                )
            arr = data.view(np.dtype(np_name)).reshape(shape)
        if meta.get("scalar"):
            return arr.reshape(()).copy()[()]
        return arr
