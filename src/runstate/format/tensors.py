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

# Dtypes NumPy lacks, provided by the ml_dtypes package (which JAX, TensorFlow and Keras use).
# An array that already has one of them is stored under its code without importing anything;
# rebuilding one imports ml_dtypes.
_ML_DTYPES_TO_CODE: dict[str, str] = {
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2": "F8_E5M2",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
_CODE_TO_ML_DTYPES: dict[str, str] = {v: k for k, v in _ML_DTYPES_TO_CODE.items()}


def _ml_dtype(name: str) -> np.dtype[Any]:
    """The NumPy dtype ``name`` from ml_dtypes (``bfloat16``, ``float8_e4m3fn``...).

    Raises:
        UnsupportedTypeError: ml_dtypes is not installed, or has no such dtype.
    """
    from runstate.errors import UnsupportedTypeError

    try:
        import ml_dtypes
    except ImportError:
        raise UnsupportedTypeError(
            f"a tensor of dtype {name} needs the ml_dtypes package to be read as a NumPy array; "
            "install it (pip install ml-dtypes) or torch"
        ) from None
    found = getattr(ml_dtypes, name, None) if not name.startswith("_") else None
    if not (isinstance(found, type) and issubclass(found, np.generic) and found.__module__ == "ml_dtypes"):
        raise UnsupportedTypeError(
            f"neither NumPy nor ml_dtypes {ml_dtypes.__version__} has a dtype {name!r}; "
            "install torch (or a newer ml-dtypes) to load this tensor"
        )
    return np.dtype(found)


def _lib_dtype(name: str) -> np.dtype[Any]:
    """The NumPy dtype of a ``lib_dtype`` entry: NumPy's own, else an ml_dtypes one.

    Raises:
        UnsupportedTypeError: neither NumPy nor ml_dtypes knows ``name``.
    """
    try:
        return np.dtype(name)
    except TypeError:
        if not name.isidentifier():
            raise
        return _ml_dtype(name)


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
        token: called (only by incremental saves, when the state is captured), returns
            ``(weak reference to the value's memory, version)`` when the framework can tell
            that the bytes did not change since another blob of the same memory was made (the
            reference is alive and the same object, and the versions are equal), else None.
        source: the live value, kept only where a writer needs more than its bytes (a
            sharded tensor's placement); None otherwise.
    """

    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    lib: str
    read: Callable[[], memoryview]
    meta: dict[str, Any] = field(default_factory=dict)
    identity: Hashable | None = None
    source: Any = None
    token: Callable[[], tuple[Callable[[], Any], Hashable] | None] | None = None


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
        code = _NUMPY_TO_CODE.get(name) or _ML_DTYPES_TO_CODE.get(name)
        ml_dtype = arr.dtype.type.__module__ == "ml_dtypes"
        if code is None:
            if (arr.dtype.kind in "OUSVMm" and not ml_dtype) or arr.dtype.fields is not None:
                raise UnsupportedTypeError(
                    f"{where}: a numpy array of dtype {arr.dtype} cannot be stored without "
                    "pickle; convert it to a numeric array or to a list of Python values"
                )
            # A numeric dtype safetensors lacks (complex128, longdouble...): raw bytes.
            # ml_dtypes types (int4, float8_e8m0fnu...) by name: their dtype.str ("<V1") loses the type.
            meta["lib_dtype"] = arr.dtype.name if ml_dtype else arr.dtype.str
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
            arr = data.view(_lib_dtype(str(meta["lib_dtype"]))).reshape(meta["lib_shape"])
        else:
            np_name = _CODE_TO_NUMPY.get(dtype)
            if np_name is not None:
                np_dtype = np.dtype(np_name)
            elif dtype in _CODE_TO_ML_DTYPES:
                np_dtype = _ml_dtype(_CODE_TO_ML_DTYPES[dtype])
            else:
                from runstate.errors import UnsupportedTypeError

                raise UnsupportedTypeError(
                    f"a tensor of dtype {dtype} cannot be represented in NumPy; install torch to load it"
                )
            arr = data.view(np_dtype).reshape(shape)
        if meta.get("scalar"):
            return arr.reshape(()).copy()[()]
        return arr
