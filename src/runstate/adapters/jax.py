"""JAX adapter: jax arrays as tensors, typed PRNG keys as objects.

A JAX training state is a pytree: dicts, lists, tuples, NamedTuples (optax states) and
``None`` around ``jax.Array`` leaves, Python numbers and PRNG keys. The containers map onto
typed-tree nodes; this module handles the leaves:

* ``jax.Array`` is stored like a NumPy array (``lib: "jax"``; bfloat16 and float8 through
  ml_dtypes) and rebuilt as a ``jax.Array`` on the default device, or on the device/sharding of
  the live array it replaces. A weakly typed array (made from a Python scalar) keeps its weak
  type, because it changes type promotion and therefore results.
* typed keys (``jax.random.key``) are ``object`` nodes: ``jax.random.key_data(key)`` plus the
  name of the PRNG implementation, rebuilt with ``jax.random.wrap_key_data``. Raw ``uint32``
  keys (``jax.random.PRNGKey``) are ordinary arrays.

JAX values are immutable, so restoring replaces them in the ``state`` dict instead of
changing them in place. Imported only when the program has imported jax.
"""

from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from runstate.adapters.base import Adapter, Problem
from runstate.errors import UnsupportedTypeError
from runstate.format.tensors import NumpyCodec, TensorBlob, TensorCodec
from runstate.format.tree import ObjectCodec

__all__ = ["ADAPTER", "CODEC", "OBJECTS", "JaxAdapter", "JaxCodec", "JaxObjects", "check_like", "is_key", "place_like"]

_NUMPY = NumpyCodec()
_KEY_KIND = "jax.random.key"


def is_key(value: Any) -> bool:
    """True for a typed PRNG key array (``jax.random.key``), not for raw uint32 keys."""
    return isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key)


def _weak(x: jax.Array) -> jax.Array:
    """``x`` as a weakly typed array (the only way is JAX's internal conversion)."""
    from jax._src.lax.lax import _convert_element_type

    out: jax.Array = _convert_element_type(x, weak_type=True)
    return out


class JaxCodec:
    """Codec for ``jax.Array`` (not typed keys: :class:`JaxObjects` stores those)."""

    lib = "jax"

    def to_blob(self, value: Any, where: str) -> TensorBlob:
        if isinstance(value, jax.core.Tracer):
            raise UnsupportedTypeError(
                f"{where}: a traced jax value (inside jit, grad or vmap) has no data; save outside transformations"
            )
        if not value.is_fully_addressable:
            raise UnsupportedTypeError(
                f"{where}: a jax array sharded across processes cannot be saved by one process; gather it "
                "(jax.experimental.multihost_utils.process_allgather) or save each process's shards as its own item"
            )
        arr = np.asarray(value)  # copies to host; shares the buffer on CPU
        blob = _NUMPY.to_blob(arr, where)
        meta = dict(blob.meta)
        if value.weak_type:
            meta["weak_type"] = True

        def read() -> memoryview:
            _ = value  # keeps the array (and the buffer arr views) alive until written
            return blob.read()

        # Same Python object => same array: jax arrays are immutable, and ``value`` stays alive
        # through ``read``, so its id cannot be reused by another array during encoding.
        return TensorBlob(blob.dtype, blob.shape, blob.nbytes, self.lib, read, meta, ("jax", id(value)))

    def from_bytes(self, data: np.ndarray, dtype: str, shape: tuple[int, ...], meta: dict[str, Any]) -> Any:
        arr = _NUMPY.from_bytes(data, dtype, shape, {k: v for k, v in meta.items() if k != "scalar"})
        out = jax.device_put(np.asarray(arr))
        if out.dtype != arr.dtype:
            raise UnsupportedTypeError(
                f"a {arr.dtype} jax array needs 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                f"before loading (JAX would silently turn it into {out.dtype})"
            )
        if meta.get("weak_type"):
            out = _weak(out)
        return out


class JaxObjects:
    """Object codec for typed PRNG keys (``jax.random.key``)."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        if is_key(value):
            impl = jax.random.key_impl(value)
            return _KEY_KIND, jax.random.key_data(value), {"impl": str(impl)}
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind != _KEY_KIND:
            raise KeyError(kind)
        impl = attrs.get("impl")
        if not isinstance(impl, str) or not impl.isidentifier():
            raise ValueError(f"PRNG implementation {impl!r} is not a name")
        data = np.asarray(state)
        if data.dtype != np.uint32:
            raise ValueError(f"key data of dtype {data.dtype}, expected uint32")
        return jax.random.wrap_key_data(jnp.asarray(data), impl=impl)

    def copy_into(self, target: Any, source: Any) -> bool:
        return False  # keys are immutable: restoring replaces them


CODEC = JaxCodec()
OBJECTS = JaxObjects()


def place_like(stored: Any, template: Any) -> Any:
    """Put a restored array on the sharding of the live array it replaces."""
    if (
        isinstance(stored, jax.Array)
        and isinstance(template, jax.Array)
        and not isinstance(template, jax.core.Tracer)
        and stored.sharding != template.sharding
    ):
        return jax.device_put(stored, template.sharding)
    return stored


def _describe(leaf: Any) -> str:
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return f"{type(leaf).__name__} {leaf.dtype}{list(leaf.shape)}"
    return type(leaf).__name__


def check_like(template: Any, restored: Any) -> list[tuple[tuple[Any, ...], str, str]]:
    """Differences between a live pytree holding jax arrays and the restored one.

    JAX values are replaced rather than loaded into, so nothing else would notice a stored
    pytree of another structure, shape or dtype until a jitted function fails (or silently
    retraces). Returns ``(path, kind, message)`` triples; empty when ``template`` holds no
    jax array or everything matches.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(template)
    if not any(isinstance(leaf, jax.Array) for _, leaf in leaves_with_path):
        return []
    stored_leaves, stored_def = jax.tree_util.tree_flatten(restored)
    stored_def = cast(Any, stored_def)
    if stored_def != treedef:
        return [((), "structure", f"pytree structure {stored_def} in checkpoint, {treedef} live")]
    problems: list[tuple[tuple[Any, ...], str, str]] = []
    for (keypath, live), got in zip(leaves_with_path, stored_leaves, strict=True):
        if not isinstance(live, jax.Array):
            continue
        path = tuple(_key(k) for k in keypath)
        if not isinstance(got, jax.Array):
            problems.append((path, "type", f"{_describe(got)} in checkpoint, {_describe(live)} live"))
        elif tuple(got.shape) != tuple(live.shape):
            problems.append((path, "shape", f"shape {tuple(got.shape)} in checkpoint, {tuple(live.shape)} live"))
        elif got.dtype != live.dtype:
            problems.append((path, "dtype", f"dtype {got.dtype} in checkpoint, {live.dtype} live"))
    return problems


def _key(k: Any) -> Any:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    return str(k)


class JaxAdapter(Adapter):
    """jax arrays (replaced on restore, placed on the live sharding, checked as pytrees) and keys."""

    name = "jax"
    lib = "jax"

    def tensor_codec(self, value: Any) -> TensorCodec | None:
        if isinstance(value, jax.Array) and not is_key(value):  # typed keys are objects (OBJECTS)
            return CODEC
        return None

    def object_codec(self) -> ObjectCodec | None:
        return OBJECTS

    def codec(self) -> TensorCodec | None:
        return CODEC

    def place_like(self, stored: Any, template: Any) -> Any:
        return place_like(stored, template)

    def check_like(self, template: Any, restored: Any) -> list[Problem]:
        return check_like(template, restored)


ADAPTER = JaxAdapter()
