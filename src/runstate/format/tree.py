"""Typed trees: exact, pickle-free encoding of nested Python state as JSON.

A state value becomes a JSON node that keeps every distinction pickle would keep for the
types a training run holds: ``int`` (any size) vs ``float`` vs ``bool``; ``-0.0``, ``inf``
and ``nan``; ``tuple`` vs ``list``; dict key types and order. Tensors are replaced by a
reference to a named entry of the tensor index; the same tensor reached twice (tied weights)
is stored once and referenced twice. Anything else raises :class:`UnsupportedTypeError`
naming its path, because storing it would need pickle.
"""

from __future__ import annotations

import base64
import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from runstate.errors import CheckpointError, CorruptCheckpointError, UnsupportedTypeError
from runstate.format.depth import MAX_TREE_DEPTH, stack_room
from runstate.format.gcpause import gc_paused, gc_resumed
from runstate.format.tensors import TensorBlob, TensorCodec
from runstate.registry import Registration, Registrations
from runstate.registry import registry as default_registry
from runstate.stateful import is_stateful

__all__ = [
    "RESERVED_TENSOR_NAMES",
    "Decoder",
    "Encoder",
    "NamedTupleState",
    "ObjectCodec",
    "StatefulState",
    "format_path",
]

Node = dict[str, Any]
PathPart = Any

#: Names a tensor never gets: ``__metadata__`` is the safetensors header's reserved key. A
#: tensor whose path would give it such a name is named as if the name were taken (``#2``).
RESERVED_TENSOR_NAMES = frozenset({"__metadata__"})


def format_path(path: tuple[PathPart, ...], root: str = "state") -> str:
    """Render a path as Python subscripts: ``state['optimizer']['state'][0]``."""
    return root + "".join(f"[{p!r}]" for p in path)


@dataclass(frozen=True)
class StatefulState:
    """The decoded state of a stateful object; ``type`` is the class that produced it."""

    type: str
    state: Any
    param_names: Any = None  # optimizers: the parameter names of each group, when saved


@dataclass(frozen=True)
class NamedTupleState:
    """A decoded namedtuple: the ``<module>.<qualname>`` of its class, its fields and values.

    The class is never looked up from ``type`` (a checkpoint may be hostile): restoring
    rebuilds it only when the live value at the same place is an instance of that class;
    otherwise it becomes a plain tuple.
    """

    type: str
    fields: tuple[str, ...]
    values: tuple[Any, ...]


def _namedtuple_fields(value: tuple[Any, ...]) -> tuple[str, ...] | None:
    """The field names of a namedtuple (``collections.namedtuple``, ``typing.NamedTuple``)."""
    fields = getattr(type(value), "_fields", None)
    if isinstance(fields, tuple) and len(fields) == len(value) and all(type(f) is str for f in fields):
        return fields
    return None


class ObjectCodec(Protocol):
    """Stores objects that have state but no ``state_dict`` (random generators)."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        """Return ``(kind, state, attrs)`` when this codec handles ``value``, else None."""
        ...

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        """Create a new object of ``kind`` holding ``state``, or raise KeyError."""
        ...

    def copy_into(self, target: Any, source: Any) -> bool:
        """Copy ``source``'s state into ``target`` in place; False when not applicable."""
        ...


class CoreObjects:
    """Object codec for ``random.Random`` and ``numpy.random.Generator``/``RandomState``."""

    def get(self, value: Any) -> tuple[str, Any, dict[str, Any]] | None:
        if isinstance(value, random.Random):
            version, internal, gauss = value.getstate()
            return "random.Random", [version, np.asarray(internal, dtype=np.uint32), gauss], {}
        if isinstance(value, np.random.Generator):
            bitgen = value.bit_generator
            return "numpy.Generator", bitgen.state, {"bit_generator": type(bitgen).__name__}
        if isinstance(value, np.random.RandomState):
            return "numpy.RandomState", value.get_state(legacy=False), {}
        return None

    def make(self, kind: str, state: Any, attrs: dict[str, Any]) -> Any:
        if kind == "random.Random":
            rng = random.Random()
            version, internal, gauss = state
            rng.setstate((version, tuple(int(x) for x in internal), gauss))
            return rng
        if kind == "numpy.Generator":
            name = attrs.get("bit_generator")
            cls = getattr(np.random, str(name), None)
            if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
                raise KeyError(f"unknown NumPy bit generator {name!r}")
            bitgen = cls()
            bitgen.state = state
            return np.random.Generator(bitgen)
        if kind == "numpy.RandomState":
            rs = np.random.RandomState()
            rs.set_state(state)
            return rs
        raise KeyError(kind)

    def copy_into(self, target: Any, source: Any) -> bool:
        if isinstance(target, random.Random) and isinstance(source, random.Random):
            target.setstate(source.getstate())
            return True
        if isinstance(target, np.random.Generator) and isinstance(source, np.random.Generator):
            if type(target.bit_generator) is not type(source.bit_generator):
                return False
            target.bit_generator.state = source.bit_generator.state
            return True
        if isinstance(target, np.random.RandomState) and isinstance(source, np.random.RandomState):
            target.set_state(source.get_state(legacy=False))
            return True
        return False


CodecFinder = Callable[[Any], "TensorCodec | None"]

_UNASKED: Any = object()  # a class the registry has not been asked about yet


class Encoder:
    """Encodes the values of one top-level item, collecting its tensors.

    Args:
        item: the top-level key; used for error paths and as the name of a bare tensor.
        find_codec: returns the codec for a tensor value, or None when it is not a tensor.
        objects: codecs for stateful objects without ``state_dict``.
        registry: how registered classes are saved (``runstate.registry`` when None; the save
            pipeline passes one that also asks the imported frameworks' adapters).
    """

    def __init__(
        self, item: str, find_codec: CodecFinder, objects: list[ObjectCodec], registry: Registrations | None = None
    ) -> None:
        self.item = item
        self.blobs: dict[str, TensorBlob] = {}
        self._find_codec = find_codec
        self._objects = objects
        self._registry = registry if registry is not None else default_registry
        # per class, what the registry said: asked once per class, not once per value (a state
        # of 10,000 tensors asked 10,000 times); the registry does not change during one encode
        self._registered: dict[type, Registration | None] = {}
        self._names_by_identity: dict[Any, str] = {}
        self._root = format_path((item,))
        self._depth = 0

    def encode(self, value: Any) -> Node:
        """Encode the item's value; tensors accumulate in :attr:`blobs`.

        Raises:
            UnsupportedTypeError: a value cannot be stored without pickle, or the tree is
                deeper than :data:`~runstate.format.depth.MAX_TREE_DEPTH` (a value that
                contains itself, too).
        """
        with stack_room(), gc_paused():
            return self._encode(value, ())

    def _where(self, path: tuple[PathPart, ...]) -> str:
        return self._root + "".join([f"[{p!r}]" for p in path])  # format_path((self.item, *path))

    def _tensor_name(self, path: tuple[PathPart, ...]) -> str:
        if len(path) == 1 and type(path[0]) is str:  # the common case: a key of the item's dict
            base = path[0]
        else:
            base = ".".join([str(p) for p in path]) if path else self.item
        if base not in self.blobs and base not in RESERVED_TENSOR_NAMES:
            return base
        name, n = base, 1
        while name in self.blobs or name in RESERVED_TENSOR_NAMES:
            n += 1
            name = f"{base}#{n}"
        return name

    def _encode(self, value: Any, path: tuple[PathPart, ...]) -> Node:
        self._depth += 1
        try:
            if self._depth > MAX_TREE_DEPTH:
                raise UnsupportedTypeError(
                    f"{self._where(path)[:300]}: the state nests deeper than {MAX_TREE_DEPTH} levels "
                    "(or contains itself), which runstate cannot store; flatten it"
                )
            return self._encode_node(value, path)
        finally:
            self._depth -= 1

    def _encode_node(self, value: Any, path: tuple[PathPart, ...]) -> Node:
        t = type(value)
        if value is None:
            return {"t": "none"}
        if t is bool:
            return {"t": "bool", "v": value}
        if t is int or (isinstance(value, int) and getattr(t, "_runstate_stored_as_int", False) is True):
            value = int(value)  # a class that asks to be stored as its int value (runstate.RestoreResult)
            # Decimal, or hexadecimal past Python's int/str digit limit (int(v, 0) reads both).
            return {"t": "int", "v": str(value) if value.bit_length() < 10_000 else hex(value)}
        if t is float:
            return {"t": "float", "v": repr(value)}
        if t is str:
            return {"t": "str", "v": value}
        if t is bytes:
            return {"t": "bytes", "v": base64.b64encode(value).decode("ascii")}
        if t is list:
            return {"t": "list", "v": [self._encode(x, (*path, i)) for i, x in enumerate(value)]}
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {"t": "tuple", "v": [self._encode(x, (*path, i)) for i, x in enumerate(value)]}
        if t is dict or t is OrderedDict:
            items = [[self._encode_key(k, path), self._encode(v, (*path, k))] for k, v in value.items()]
            if t is OrderedDict:
                return {"t": "dict", "ordered": True, "v": items}
            return {"t": "dict", "v": items}
        registered = self._registered.get(t, _UNASKED)
        if registered is _UNASKED:
            registered = self._registered[t] = self._registry.get(t)
        if registered is not None:
            return self._encode_registered(value, registered, path)
        if isinstance(value, tuple) and _namedtuple_fields(value) is not None:
            return self._encode_namedtuple(value, path)
        codec = self._find_codec(value)
        if codec is not None:
            return self._encode_tensor(codec, value, path)
        for objects in self._objects:
            got = objects.get(value)
            if got is not None:
                kind, state, attrs = got
                return {"t": "object", "kind": kind, "attrs": attrs, "v": self._encode(state, path)}
        if is_stateful(value):
            cls = type(value)
            try:
                with gc_resumed():  # the program's code: it may block long while others make garbage
                    state = value.state_dict()
            except Exception as exc:
                raise UnsupportedTypeError(
                    f"{self._where(path)}: {cls.__qualname__}.state_dict() raised {exc!r}"
                ) from exc
            return {
                "t": "stateful",
                "type": f"{cls.__module__}.{cls.__qualname__}",
                "v": self._encode(state, path),
            }
        raise UnsupportedTypeError(self._unsupported_message(value, path))

    def _encode_namedtuple(self, value: tuple[Any, ...], path: tuple[PathPart, ...]) -> Node:
        """A namedtuple keeps its class name and fields; its children are named by field."""
        cls = type(value)
        fields = _namedtuple_fields(value) or ()
        return {
            "t": "namedtuple",
            "type": f"{cls.__module__}.{cls.__qualname__}",
            "fields": list(fields),
            "v": [self._encode(x, (*path, f)) for f, x in zip(fields, value, strict=True)],
        }

    def _encode_registered(self, value: Any, registered: Registration, path: tuple[PathPart, ...]) -> Node:
        """An instance of a class registered with ``runstate.register``: a ``stateful`` node."""
        cls = type(value)
        try:
            with gc_resumed():
                state = registered.get_state(value)
        except CheckpointError as exc:  # runstate's own refusal (a tf.data pipeline): say where, keep its kind
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (f"{self._where(path)}: {exc.args[0]}", *exc.args[1:])
            raise
        except Exception as exc:
            raise UnsupportedTypeError(
                f"{self._where(path)}: the get_state registered for {cls.__qualname__} raised {exc!r}"
            ) from exc
        return {"t": "stateful", "type": f"{cls.__module__}.{cls.__qualname__}", "v": self._encode(state, path)}

    def _encode_key(self, key: Any, path: tuple[PathPart, ...]) -> Any:
        t = type(key)
        if t is str:
            return key  # the common case stays readable: a plain JSON string
        if key is None or t in (bool, int, float, str, bytes) or t is tuple:
            return self._encode(key, path)
        raise UnsupportedTypeError(
            f"{self._where(path)}: a dict key of type {t.__qualname__} ({key!r}) cannot be "
            "stored without pickle; use str, int, float, bool, None, bytes or a tuple of them"
        )

    def _encode_tensor(self, codec: TensorCodec, value: Any, path: tuple[PathPart, ...]) -> Node:
        blob = codec.to_blob(value, self._where(path))
        if blob.identity is not None:
            first = self._names_by_identity.get(blob.identity)
            if first is not None:
                return {"t": "tensor", "name": first}
        name = self._tensor_name(path)
        self.blobs[name] = blob
        if blob.identity is not None:
            self._names_by_identity[blob.identity] = name
        return {"t": "tensor", "name": name}

    def _unsupported_message(self, value: Any, path: tuple[PathPart, ...]) -> str:
        where = self._where(path)
        if callable(value) and hasattr(value, "__code__"):
            return f"{where}: a function cannot be stored without pickle"
        if hasattr(value, "_fields"):
            return (
                f"{where}: a namedtuple ({type(value).__qualname__}) cannot be stored without "
                "pickle; convert it to a tuple or a dict"
            )
        for builtin in (bool, int, float, str, bytes, dict, list):
            if isinstance(value, builtin):
                return (
                    f"{where}: a {type(value).__qualname__} (a subclass of {builtin.__name__}) cannot be "
                    f"stored without pickle; convert it to a plain {builtin.__name__}"
                )
        return (
            f"{where}: a value of type {type(value).__module__}.{type(value).__qualname__} "
            "cannot be stored without pickle; give it state_dict()/load_state_dict() or "
            "convert it to plain values, arrays or tensors"
        )


class Decoder:
    """Decodes the nodes of one item; tensors are fetched by name from ``load_tensor``.

    Stateful objects decode to :class:`StatefulState`; generators decode to new objects.
    A tensor referenced twice decodes to the same object twice.
    """

    def __init__(self, item: str, load_tensor: Callable[[str], Any], objects: list[ObjectCodec]) -> None:
        self.item = item
        self._load_tensor = load_tensor
        self._objects = objects
        self._tensors: dict[str, Any] = {}
        self._depth = 0

    def decode(self, node: Any) -> Any:
        """Decode one node (and its children).

        Raises:
            CorruptCheckpointError: a malformed node, or a tree deeper than runstate writes
                (:data:`~runstate.format.depth.MAX_TREE_DEPTH`).
        """
        with stack_room():  # not gc_paused(): decoding reads the tensors (I/O)
            return self._decode(node, ())

    def _bad(self, path: tuple[PathPart, ...], what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"manifest.json: item {self.item!r} at {format_path((self.item, *path))}: {what}; "
            "the manifest is damaged, restore from another checkpoint",
            file="manifest.json",
        )

    def _decode(self, node: Any, path: tuple[PathPart, ...]) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_TREE_DEPTH:
                raise self._bad(path, f"the tree nests deeper than {MAX_TREE_DEPTH} levels (runstate never writes one)")
            return self._decode_node(node, path)
        finally:
            self._depth -= 1

    def _decode_node(self, node: Any, path: tuple[PathPart, ...]) -> Any:
        if not isinstance(node, dict) or "t" not in node:
            raise self._bad(path, f"expected a typed node, found {type(node).__name__}")
        t = node["t"]
        try:
            if t == "none":
                return None
            if t == "bool":
                if type(node["v"]) is not bool:
                    raise ValueError("not a bool")
                return node["v"]
            if t == "int":
                return int(node["v"], 0)
            if t == "float":
                return float(node["v"])
            if t == "str":
                if not isinstance(node["v"], str):
                    raise ValueError("not a str")
                return node["v"]
            if t == "bytes":
                return base64.b64decode(node["v"], validate=True)
            if t == "list":
                return [self._decode(x, (*path, i)) for i, x in enumerate(node["v"])]
            if t == "tuple":
                return tuple(self._decode(x, (*path, i)) for i, x in enumerate(node["v"]))
            if t == "dict":
                out: dict[Any, Any] = OrderedDict() if node.get("ordered") else {}
                for pair in node["v"]:
                    key = pair[0] if isinstance(pair[0], str) else self._decode(pair[0], path)
                    out[key] = self._decode(pair[1], (*path, key))
                return out
            if t == "tensor":
                name = node["name"]
                if name not in self._tensors:
                    self._tensors[name] = self._load_tensor(name)
                return self._tensors[name]
            if t == "stateful":
                return StatefulState(str(node["type"]), self._decode(node["v"], path), node.get("param_names"))
            if t == "namedtuple":
                return self._decode_namedtuple(node, path)
            if t == "object":
                state = self._decode(node["v"], path)
                for objects in self._objects:
                    try:
                        return objects.make(node["kind"], state, node.get("attrs", {}))
                    except KeyError:
                        continue
                raise UnsupportedTypeError(
                    f"{format_path((self.item, *path))}: objects of kind {node['kind']!r} need "
                    "a framework that is not installed (torch?); install it to load this value"
                )
        except (CorruptCheckpointError, UnsupportedTypeError):
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError, OverflowError) as exc:
            # RecursionError is a RuntimeError: absurdly deep trees are damage too.
            raise self._bad(path, f"malformed {t!r} node ({repr(exc)[:200]})") from exc
        raise self._bad(path, f"unknown node type {t!r}")

    def _decode_namedtuple(self, node: Node, path: tuple[PathPart, ...]) -> NamedTupleState:
        fields, values = node["fields"], node["v"]
        if not isinstance(node["type"], str):
            raise ValueError("type is not a string")
        if not isinstance(fields, list) or not all(type(f) is str for f in fields):
            raise ValueError("fields is not a list of strings")
        if not isinstance(values, list) or len(values) != len(fields):
            raise ValueError(f"{len(fields)} fields but {len(values) if isinstance(values, list) else 'no'} values")
        decoded = tuple(self._decode(x, (*path, f)) for f, x in zip(fields, values, strict=True))
        return NamedTupleState(node["type"], tuple(fields), decoded)
